import sys, triton, triton.language as tl

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


import torch, math, json
from triton.tools.tensor_descriptor import TensorDescriptor
from triton.testing import do_bench

def run(q, k, v, ck, BM, BN, ws, nw, ns, two=int(sys.argv[4]), ckl=int(sys.argv[3])):
    BH, T, D = q.shape
    o = torch.empty_like(q)
    qd = TensorDescriptor.from_tensor(q.view(BH * T, D), [BM, D])
    kd = TensorDescriptor.from_tensor(k.view(BH * T, D), [BN, D])
    vd = TensorDescriptor.from_tensor(v.view(BH * T, D), [BN, D])
    cd = TensorDescriptor.from_tensor(ck.view(BH * T), [BN]) if ckl == 2 else ck
    grid = (T // BM, BH)
    fn = lambda: fa_fwd[grid](qd, kd, vd, cd, o, T, 1.4426950408889634 / math.sqrt(D), BM=BM, BN=BN, D=D, WS=ws,
                              CKLOAD=ckl, D4=False, TWO=two, num_warps=nw, num_stages=ns)
    return o, fn

triton.set_allocator(lambda size, align, stream: torch.empty(size, dtype=torch.int8, device="cuda"))
torch.manual_seed(0)
out = {}
T = int(sys.argv[1]); sel = sys.argv[2]
if True:
    B = 65536 // T
    q, k, v = (torch.randn(B * 16, T, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    ck = torch.zeros(B * 16, T, device="cuda")
    ref = torch.nn.functional.scaled_dot_product_attention(q.view(B, 16, T, 128), k.view(B, 16, T, 128), v.view(B, 16, T, 128), is_causal=True).view(B * 16, T, 128)
    flops = 4 * B * 16 * T * T / 2 * 128
    for name, BM, BN, ws, nw, ns in [("nows_8w3s", 128, 128, False, 8, 3), ("nows_8w2s", 128, 128, False, 8, 2),
                                     ("ws_4w2s", 128, 128, True, 4, 2), ("ws_4w3s", 128, 128, True, 4, 3),
                                     ("ws_4w2s_bn64", 128, 64, True, 4, 2), ("ws_4w3s_bn64", 128, 64, True, 4, 3),
                                     ("ws_4w4s_bn64", 128, 64, True, 4, 4)]:
        if name != sel:
            continue
        try:
            o, fn = run(q, k, v, ck, BM, BN, ws, nw, ns)
            fn(); torch.cuda.synchronize()
            err = (o.float() - ref.float()).abs().max().item()
            ms = min(do_bench(fn, warmup=20, rep=100) for _ in range(3))
            out[f"{T}_{name}"] = dict(ms=ms, tflops=flops / ms / 1e9, err=err)
        except Exception as e:
            out[f"{T}_{name}"] = dict(error=str(e)[-300:])
        print(T, name, out[f"{T}_{name}"], flush=True)
    if sel != "base":
        sys.exit(0)
    fn = lambda: torch.nn.functional.scaled_dot_product_attention(q.view(B, 16, T, 128), k.view(B, 16, T, 128), v.view(B, 16, T, 128), is_causal=True)
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.CUDNN_ATTENTION):
        ms = min(do_bench(fn, warmup=20, rep=100) for _ in range(3))
    print(T, "cudnn", ms, flops / ms / 1e9, flush=True)
    from megatron_fox.ops import forgetting_attention
    q4, k4, v4 = (x.view(B, 16, T, 128).transpose(1, 2) for x in (q, k, v))
    g = torch.full((B, T, 16), -1e-4, device="cuda")
    with torch.no_grad():
        fn = lambda: forgetting_attention(q4, k4, v4, g)
        ms = min(do_bench(fn, warmup=20, rep=100) for _ in range(3))
    print(T, "ours_fwd_exact", ms, flops / ms / 1e9, flush=True)
