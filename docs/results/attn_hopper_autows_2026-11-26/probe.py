"""Probe of Triton 3.6's automatic warp specialisation on Hopper (see README.md).

    python probe.py compile "dict(ckload=2, two=3)"   # CPU is enough: compiles for sm_90
    python probe.py gpu 16384 ws_4w2s 2 3              # on an H100/H200, under `timeout`

A FlashAttention forward loop over 2-d TMA descriptors [B*H*T, D]; variants: c_j loads
(CKLOAD 0 none, 1 pointer, 2 1-d descriptor), D4 (4-d descriptors, our layout), loop form
(TWO 0 plain, 1 two loops, 2 diagonal after the loop, 3 mask on every block).
"""
import sys

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget

@triton.jit
def _step(q, k, v, ck, m_i, l_i, acc, s_mask, qk_scale, USE_CK: tl.constexpr, MASK: tl.constexpr):
    s = tl.dot(q, tl.trans(k)) * qk_scale
    if USE_CK:
        s = s - ck[None, :]
    if MASK:
        s = tl.where(s_mask, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    acc = tl.dot(p.to(tl.bfloat16), v, acc)
    return m_new, l_i, acc


@triton.jit
def fa_fwd(Qd, Kd, Vd, CK, Out, T, qk_scale, BM: tl.constexpr, BN: tl.constexpr, D: tl.constexpr, WS: tl.constexpr,
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
            ck = tl.zeros([BN], tl.float32)
            if CKLOAD == 2:
                ck = CK.load([bh * T + nb * BN])
            elif CKLOAD == 1:
                ck = tl.load(CK + bh * T + nb * BN + tl.arange(0, BN))
            causal = nb * BN + tl.arange(0, BN)[None, :] <= m0 + tl.arange(0, BM)[:, None]
            m_i, l_i, acc = _step(q, k, v, ck, m_i, l_i, acc, causal, qk_scale, CKLOAD > 0, TWO == 3)
    if TWO == 2:
        nb = m0 // BN
        k = Kd.load([bh * T + nb * BN, 0])
        v = Vd.load([bh * T + nb * BN, 0])
        ck = CK.load([bh * T + nb * BN])
        causal = nb * BN + tl.arange(0, BN)[None, :] <= m0 + tl.arange(0, BM)[:, None]
        m_i, l_i, acc = _step(q, k, v, ck, m_i, l_i, acc, causal, qk_scale, True, True)
    o = acc / l_i[:, None]
    offs = m0 + tl.arange(0, BM)
    tl.store(Out + (bh * T + offs)[:, None] * D + tl.arange(0, D)[None, :], o.to(tl.bfloat16))


VARIANTS = {  # name: (block_m, block_n, warp_specialize, num_warps, num_stages)
    "nows_8w3s": (128, 128, False, 8, 3), "ws_4w2s": (128, 128, True, 4, 2), "ws_4w3s": (128, 128, True, 4, 3),
    "ws_4w2s_bn64": (128, 64, True, 4, 2), "ws_4w3s_bn64": (128, 64, True, 4, 3), "ws_4w4s_bn64": (128, 64, True, 4, 4),
}


def compile_sm90(ckload=0, d4=False, two=0, BM=128, BN=128, ws=True, nw=4, ns=2):
    """Compile one variant for sm_90 (no GPU needed); returns the compiled kernel."""
    if d4:
        dq, dk = f"tensordesc<bf16[1,{BM},1,128]>", f"tensordesc<bf16[1,{BN},1,128]>"
    else:
        dq, dk = f"tensordesc<bf16[{BM},128]>", f"tensordesc<bf16[{BN},128]>"
    sig = dict(Qd=dq, Kd=dk, Vd=dk, CK=f"tensordesc<fp32[{BN}]>" if ckload == 2 else "*fp32", Out="*bf16", T="i32",
               qk_scale="fp32", BM="constexpr", BN="constexpr", D="constexpr", WS="constexpr", CKLOAD="constexpr",
               D4="constexpr", TWO="constexpr")
    names = fa_fwd.arg_names
    const = {(names.index(k),): v for k, v in dict(BM=BM, BN=BN, D=128, WS=ws, CKLOAD=ckload, D4=d4, TWO=two).items()}
    attrs = {(names.index(k),): [["tt.divisibility", 16]] for k in (["Out", "T"] if ckload == 2 else ["CK", "Out", "T"])}
    src = triton.compiler.ASTSource(fn=fa_fwd, signature=sig, constexprs=const, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=nw, num_stages=ns))


def gpu(T, name, ckload, two):
    """Time one variant at length T (64k tokens, 16 heads, d 128, bf16) against SDPA's output."""
    import math

    import torch
    from triton.testing import do_bench
    from triton.tools.tensor_descriptor import TensorDescriptor

    triton.set_allocator(lambda size, align, stream: torch.empty(size, dtype=torch.int8, device="cuda"))
    BM, BN, ws, nw, ns = VARIANTS[name]
    B = 65536 // T
    q, k, v = (torch.randn(B * 16, T, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    ck = torch.zeros(B * 16, T, device="cuda")
    ref = torch.nn.functional.scaled_dot_product_attention(*(x.view(B, 16, T, 128) for x in (q, k, v)), is_causal=True)
    o = torch.empty_like(q)
    descs = [TensorDescriptor.from_tensor(x.view(-1, 128), [rows, 128]) for x, rows in ((q, BM), (k, BN), (v, BN))]
    cd = TensorDescriptor.from_tensor(ck.view(-1), [BN]) if ckload == 2 else ck

    def fn():
        fa_fwd[(T // BM, B * 16)](*descs, cd, o, T, 1.4426950408889634 / math.sqrt(128), BM=BM, BN=BN, D=128, WS=ws,
                                  CKLOAD=ckload, D4=False, TWO=two, num_warps=nw, num_stages=ns)

    fn()
    torch.cuda.synchronize()
    err = (o.view(B, 16, T, 128).float() - ref.float()).abs().max().item()
    ms = min(do_bench(fn, warmup=20, rep=100) for _ in range(3))
    print(T, name, dict(ms=ms, tflops=4 * B * 16 * T * T / 2 * 128 / ms / 1e9, err=err), flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "compile":
        c = compile_sm90(**eval(sys.argv[2]))
        print(sys.argv[2], "warp_specialize ops:", c.asm["ttgir"].count("ttg.warp_specialize("),
              "warps:", c.metadata.num_warps, "shared bytes:", c.metadata.shared)
    else:
        gpu(int(sys.argv[2]), sys.argv[3], int(sys.argv[4]), int(sys.argv[5]))
