import sys, re, triton, triton.language as tl, subprocess, tempfile, os
from triton.backends.compiler import GPUTarget
sys.path.insert(0, '/work/main/tools')

@triton.jit
def fa_fwd(Qd, Kd, Vd, CK, O, T, qk_scale, BM: tl.constexpr, BN: tl.constexpr, D: tl.constexpr, WS: tl.constexpr,
           CKLOAD: tl.constexpr, D4: tl.constexpr, TWO: tl.constexpr):
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    m0 = pid * BM
    if D4:
        q = tl.reshape(Qd.load([0, m0, bh, 0]), [BM, D])
    else:
        q = Qd.load([bh * T + m0, 0])
    m_i = tl.full([BM], -1.0e30, tl.float32)
    l_i = tl.zeros([BM], tl.float32)
    acc = tl.zeros([BM, D], tl.float32)
    nloops: tl.constexpr = 2 if TWO == 1 else 1
    for it in tl.static_range(nloops):
        lo = 0 if it == 0 else m0 // BN
        hi = (m0 // BN if TWO != 3 else (m0 + BM) // BN) if it == 0 else (m0 + BM) // BN
        for nb in tl.range(lo, hi, warp_specialize=WS and (it == 0)):
            if D4:
                k = tl.reshape(Kd.load([0, nb * BN, bh, 0]), [BN, D])
                v = tl.reshape(Vd.load([0, nb * BN, bh, 0]), [BN, D])
            else:
                k = Kd.load([bh * T + nb * BN, 0])
                v = Vd.load([bh * T + nb * BN, 0])
            s = tl.dot(q, tl.trans(k)) * qk_scale
            if CKLOAD:
                if CKLOAD == 2:
                    ck = CK.load([bh * T + nb * BN])
                else:
                    ck = tl.load(CK + bh * T + nb * BN + tl.arange(0, BN))
                s = s - ck[None, :]
            if TWO == 3:
                s = tl.where(nb * BN + tl.arange(0, BN)[None, :] <= m0 + tl.arange(0, BM)[:, None], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None]
            acc = tl.dot(p.to(tl.bfloat16), v, acc)
            m_i = m_new
    if TWO == 2:
        nb = m0 // BN
        k = Kd.load([bh * T + nb * BN, 0])
        v = Vd.load([bh * T + nb * BN, 0])
        s = tl.dot(q, tl.trans(k)) * qk_scale
        ck = CK.load([bh * T + nb * BN])
        s = s - ck[None, :]
        s = tl.where(nb * BN + tl.arange(0, BN)[None, :] <= m0 + tl.arange(0, BM)[:, None], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(tl.bfloat16), v, acc)
        m_i = m_new
    o = acc / l_i[:, None]
    offs = m0 + tl.arange(0, BM)
    tl.store(O + (bh * T + offs)[:, None] * D + tl.arange(0, D)[None, :], o.to(tl.bfloat16))

def comp(ws, nw, ns, BM=128, BN=128, ckload=False, d4=False, two=False):
    if d4:
        dq, dk = f"tensordesc<bf16[1,{BM},1,128]>", f"tensordesc<bf16[1,{BN},1,128]>"
    else:
        dq, dk = f"tensordesc<bf16[{BM},128]>", f"tensordesc<bf16[{BN},128]>"
    sig = dict(Qd=dq, Kd=dk, Vd=dk, CK=f"tensordesc<fp32[{BN}]>" if ckload == 2 else "*fp32",
               O="*bf16", T="i32", qk_scale="fp32", BM="constexpr", BN="constexpr", D="constexpr", WS="constexpr",
               CKLOAD="constexpr", D4="constexpr", TWO="constexpr")
    names = fa_fwd.arg_names
    const = {(names.index(k),): v for k, v in dict(BM=BM, BN=BN, D=128, WS=ws, CKLOAD=ckload, D4=d4, TWO=two).items()}
    attrs = {(names.index(k),): [["tt.divisibility", 16]] for k in (["O", "T"] if ckload == 2 else ["CK", "O", "T"])}
    src = triton.compiler.ASTSource(fn=fa_fwd, signature=sig, constexprs=const, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=nw, num_stages=ns))

import kernel_report as kr
for kw in [eval(sys.argv[1])]:
    try:
        c = comp(True, 4, 2, **kw)
        ir = c.asm["ttgir"]
        print(kw, "ws ops", ir.count("ttg.warp_specialize("), "warps", c.metadata.num_warps, "smem", c.metadata.shared, kr._resources(c.asm["cubin"]))
    except Exception as e:
        m = re.findall(r"UNREACHABLE.*|error:.*", str(e))
        print(kw, "ERR", m[:2])
