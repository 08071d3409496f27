"""Profile: keep mask (reference vs fused) and the pruned-attention kernels one by one."""
import sys, torch, triton
sys.path.insert(0, "tools"); sys.path.insert(0, ".")
from bench_attention import bench, gate_spectrum, make_inputs
from bench_context_pruning import keep_inputs
from megatron_fox.ops.context_pruning import keep_mask, keep_mask_reference
import megatron_fox.ops.context_pruning.function as fn
from megatron_fox.ops.context_pruning.triton_kernels import (pruned_fwd_kernel, pruned_bwd_dkdv_kernel,
                                                             pruned_bwd_dq_kernel, pruned_bwd_dkeep_kernel)
from megatron_fox.ops.forgetting_attn.common import forget_prefix_sums
dev = torch.device("cuda"); H, D = 16, 128
print(torch.cuda.get_device_name())
CFG = [(64, 64, 4, 2), (64, 64, 4, 3), (128, 64, 8, 2), (128, 64, 8, 3), (64, 32, 4, 2), (128, 32, 8, 2), (64, 128, 8, 2), (128, 128, 8, 2)]
for L in (1024, 4096):
    B = 16384 // L
    qi, ki, beta = keep_inputs(B, L, dev, 0.2)
    qi = qi + 0.3 * torch.randn_like(qi)  # scores spread over the ramp, not only at its ends
    qi.requires_grad_(); ki.requires_grad_(); beta = beta.reshape(1).requires_grad_()
    for alpha in (8.0, 1.5):
        g = torch.rand(B, L, L, device=dev)
        def ref():
            m = keep_mask_reference(qi, ki, beta, alpha); torch.autograd.grad(m, (qi, ki, beta), g)
        def fused():
            m = keep_mask(qi, ki, beta, alpha); torch.autograd.grad(m, (qi, ki, beta), g)
        with torch.no_grad():
            tf = bench(lambda: keep_mask(qi, ki, beta, alpha))
        k0 = keep_mask_reference(qi, ki, beta, alpha); k1 = keep_mask(qi, ki, beta, alpha)
        err = (k0 - k1).abs().max().item()
        g0 = torch.autograd.grad(k0, (qi, ki, beta), g); g1 = torch.autograd.grad(k1, (qi, ki, beta), g)
        gerr = [((a.double() - b.double()).norm() / b.double().norm()).item() for a, b in zip(g1, g0)]
        print(f"L {L} alpha {alpha}: kept {float(k0.mean()):.3f}; mask ref fwd+bwd {bench(ref):.2f} ms, fused fwd {tf:.2f} "
              f"fwd+bwd {bench(fused):.2f} ms; max|dI| {err:.1e} grad norm rel {max(gerr):.1e}", flush=True)
    del g
    q, k, v = make_inputs(B, L, H, D, dev)
    log_f = gate_spectrum(B, L, H, 4, 4096, dev)
    keep = keep_mask(qi.detach(), ki.detach(), beta.detach(), 8.0)
    _, c = forget_prefix_sums(log_f, None); c = c.contiguous()
    o = torch.empty_like(q); lse = torch.empty(B, H, L, device=dev)
    do = torch.randn_like(q); delta = torch.randn(B, H, L, device=dev)
    dkh, dvh, dq = torch.empty_like(q), torch.empty_like(q), torch.empty_like(q)
    dcol, drow = torch.empty_like(lse), torch.empty_like(lse); dkeep = torch.empty_like(keep)
    for BM, BN, w, s in CFG:
        fn._BM, fn._BN = BM, BN
        meta = fn._meta(q, k, None, D ** -0.5)
        kw = dict(num_warps=w, num_stages=s)
        row = []
        for name, launch in [
            ("fwd", lambda: pruned_fwd_kernel[(triton.cdiv(L, BM), B * H)](q, k, v, c, keep, c, o, lse, *meta, **kw)),
            ("dkdv", lambda: pruned_bwd_dkdv_kernel[(triton.cdiv(L, BN), B * H)](q, k, v, c, keep, c, do, lse, delta, dkh, dvh, dcol, *meta, **kw)),
            ("dq", lambda: pruned_bwd_dq_kernel[(triton.cdiv(L, BM), B * H)](q, k, v, c, keep, c, do, lse, delta, dq, drow, *meta, **kw)),
            ("dkeep", lambda: pruned_bwd_dkeep_kernel[(triton.cdiv(L, BM) * triton.cdiv(L, BN), B)](q, k, v, c, c, do, lse, delta, dkeep, *meta, **kw))]:
            try:
                row.append(f"{name} {bench(launch):.2f}")
            except Exception as e:
                row.append(f"{name} {type(e).__name__}")
        print(f"  L {L} BM {BM} BN {BN} w{w} s{s}: " + ", ".join(row), flush=True)
    fn._BM, fn._BN = 64, 64
    torch.cuda.empty_cache()
