"""Probe (2026-11-26, H100): exact FoX through cuDNN SDPA with the decay bias folded into three extra
head dims, and a hybrid (ACP Triton op on pruned heads, folded cuDNN on the rest). Result: slower
(cuDNN at head_dim 136 runs a slow kernel) and d log f 10x less precise; see docs/kernel_notes.md step 20.
Run from the repository root: python docs/results/attn_fold_cudnn_2026-11-26/probe.py

The folding (exact FoX through a dense causal attention kernel (torch SDPA, cuDNN on Hopper)):

The decay bias needs no kernel of its own. Softmax ignores a per-row constant, so
    s_ij = sm_scale q_i.k_j + c_i - c_j  ~  sm_scale q_i.k_j - c_j,
and -c_j is a dot product once q and k carry extra columns:
    q'_i = [q_i, -1, -1, -1, 0...],  k'_j = [k_j, x1_j, x2_j, x3_j, 0...],
    x1 + x2 + x3 = (c_j - r) / sm_scale,
so sm_scale q'_i.k'_j = sm_scale q_i.k_j - c_j + r (r a per-(batch, head) constant, dropped
by the softmax). A 16-bit x would round c to 8 bits of mantissa (an error of ~8 at
|c| = 2000), so x is split into three bfloat16 parts (hi, mid, lo: ~24 bits together);
the tensor cores multiply them by -1 exactly and accumulate in float32. r = the mean of c's
first and last value halves the largest |c - r|. The head dim grows by 3, padded to a
multiple of 8 (128 -> 136: ~6% more FLOPs in the q.k products).

Gradients come from the dense kernel's own backward: dq and dk are the first D columns,
dc_j = -sum_i dS_ij reaches c through the hi column (the parts are a split of one value,
mid and lo are constants to autograd), then log f through the cumulative sum.
"""
import contextlib
import json
import math
import sys

import torch
import torch.nn.functional as F
sys.path.insert(0, "tools")  # repository root as cwd
from bench_attention import bench, gate_spectrum, make_inputs, flops_fwd
from torch.nn.attention import SDPBackend, sdpa_kernel
from megatron_fox.ops import forgetting_attention, forgetting_attention_reference, set_data_checks
set_data_checks(False)


PARTS = 3


def folded_head_dim(head_dim: int) -> int:
    """Head dim of q' and k': head_dim + 3 parts, padded to a multiple of 8."""
    return -(-(head_dim + PARTS) // 8) * 8


def _split3(x: torch.Tensor, dtype: torch.dtype):
    """x float32 -> three `dtype` tensors summing to x within float32 rounding. Gradient flows
    to x through the first part only (the other two are its rounding residues)."""
    hi = x.to(dtype)
    rest = x.detach() - hi.detach().float()
    mid = rest.to(dtype)
    lo = (rest - mid.float()).to(dtype)
    return hi, mid, lo


def fold_decay_bias(q: torch.Tensor, k: torch.Tensor, c: torch.Tensor, sm_scale: float):
    """q, k [B, T, H, D] (k already one head per query head), c [B, T, H] float32 prefix
    sums of log f -> q', k' [B, T, H, D'] with sm_scale q'_i.k'_j = sm_scale q_i.k_j - c_j + r_bh,
    D' = folded_head_dim(D). Differentiable in q, k and c."""
    B, T, H, D = q.shape
    pad = folded_head_dim(D) - D - PARTS
    r = 0.5 * (c[:, :1] + c[:, -1:]).detach()
    parts = _split3((c - r) * (1.0 / sm_scale), q.dtype)
    ones = q.new_full((B, T, H, PARTS), -1.0)
    q_f = torch.cat([q, ones, q.new_zeros(B, T, H, pad)], dim=-1)
    k_f = torch.cat([k, *(p.unsqueeze(-1) for p in parts), k.new_zeros(B, T, H, pad)], dim=-1)
    return q_f, k_f


def folded_forgetting_attention(q, k, v, log_fgate, sm_scale: float, backend=None):
    """Exact FoX (no pruning, one document per row) by a dense causal SDPA kernel.

    q [B, T, H, D]; k, v [B, T, Hkv, D]; log_fgate [B, T, H] float32 -> o [B, T, H, D].
    backend: a torch.nn.attention.SDPBackend (or list) to force, None lets torch choose.
    Differentiable in q, k, v and log_fgate."""
    H, Hkv = q.shape[2], k.shape[2]
    if Hkv != H:
        k = k.repeat_interleave(H // Hkv, dim=2)
        v = v.repeat_interleave(H // Hkv, dim=2)
    c = torch.cumsum(log_fgate.float(), dim=1)
    q_f, k_f = fold_decay_bias(q, k, c, sm_scale)
    args = (q_f.transpose(1, 2), k_f.transpose(1, 2), v.transpose(1, 2))
    if backend is None:
        o = F.scaled_dot_product_attention(*args, is_causal=True, scale=sm_scale)
    else:
        from torch.nn.attention import sdpa_kernel

        with sdpa_kernel(backend):
            o = F.scaled_dot_product_attention(*args, is_causal=True, scale=sm_scale)
    return o.transpose(1, 2)

dev = torch.device("cuda")
print(torch.cuda.get_device_name(), torch.__version__, "cudnn", torch.backends.cudnn.version(), flush=True)
CUDNN = SDPBackend.CUDNN_ATTENTION

def fold_cudnn(q, k, v, g):
    return folded_forgetting_attention(q, k, v, g, q.shape[-1] ** -0.5, backend=CUDNN)

def fold_vpad(q, k, v, g):
    D = v.shape[-1]
    vp = F.pad(v, (0, 8))
    return folded_forgetting_attention(q, k, vp, g, D ** -0.5, backend=CUDNN)[..., :D]

# --- precision
for (B, L, H, Hkv, D, spec) in [(1, 4096, 16, 16, 128, "b"), (2, 1000, 4, 2, 128, "rand"), (2, 1000, 4, 4, 64, "rand")]:
    torch.manual_seed(0)
    q, k, v = make_inputs(B, L, H, D, dev)
    k, v = k[:, :, :Hkv].contiguous(), v[:, :, :Hkv].contiguous()
    g = gate_spectrum(B, L, H, 4, 4096, dev) if spec == "b" else F.logsigmoid(torch.randn(B, L, H, device=dev) + 1.0)
    ins = [t.detach().requires_grad_() for t in (q, k, v, g)]
    r = forgetting_attention_reference(*ins, dtype=torch.float64)
    do = torch.randn_like(r)
    gr = torch.autograd.grad(r, ins, do)
    impls = (("triton", lambda a, b, c, d: forgetting_attention(a, b, c, d)), ("fold_cudnn", fold_cudnn),
             ("fold_vpad", fold_vpad))
    for name, fn in impls:
        try:
            o = fn(*ins)
            ga = torch.autograd.grad(o, ins, do)
        except Exception as e:
            print(name, "FAILED", repr(e)[:300], flush=True)
            continue
        errs = [((a.double() - b.double()).norm() / b.double().norm()).item() for a, b in zip([o, *ga], [r, *gr])]
        print(f"prec B={B} L={L} H={H}/{Hkv} D={D} {spec} {name}: o dq dk dv dlogf",
              " ".join(f"{e:.2e}" for e in errs), flush=True)
    del r, gr
    torch.cuda.empty_cache()

# --- timing
def measure(run, inputs):
    for t in inputs:
        t.requires_grad_(True)
    with torch.no_grad():
        tf = bench(lambda: run(*inputs))
    out = run(*inputs)
    dout = torch.randn_like(out)

    def step():
        o = run(*inputs)
        torch.autograd.grad(o, inputs, dout)

    return tf, bench(step)

def hybrid_fn(dense_heads, sparse_heads, bound):
    def run(q, k, v, g):
        o = torch.zeros_like(q)
        if len(sparse_heads):
            s = sparse_heads
            os_ = forgetting_attention(q[:, :, s], k[:, :, s], v[:, :, s], g[:, :, s], log_eps=-10.0, logit_bound=bound)
            o = o.index_copy(2, s, os_)
        if len(dense_heads):
            d = dense_heads
            od = fold_cudnn(q[:, :, d], k[:, :, d], v[:, :, d], g[:, :, d])
            o = o.index_copy(2, d, od)
        return o
    return run

H, D = 16, 128
rows = []
for L in (4096, 16384, 32768):
    B = 65536 // L
    fl = flops_fwd(B, L, H, D)
    q, k, v = make_inputs(B, L, H, D, dev)
    g = gate_spectrum(B, L, H, 4, 4096, dev)
    bound = math.sqrt(D)
    _, st = forgetting_attention(q, k, v, g, log_eps=-10.0, logit_bound=bound, return_stats=True)
    per_head = st.skipped_fraction_per_head.float().cpu()
    print("L", L, "skipped", round(st.skipped_fraction.item(), 3), "per head",
          [round(x, 3) for x in per_head.tolist()], flush=True)
    qh, kh, vh = (t.transpose(1, 2).contiguous() for t in (q, k, v))
    cands = [("sdpa_cudnn", lambda a, b, c: F.scaled_dot_product_attention(a, b, c, is_causal=True), [qh, kh, vh])]
    cands += [("fold_cudnn", fold_cudnn, [q, k, v, g]), ("fold_vpad", fold_vpad, [q, k, v, g]),
              ("fox_exact", lambda a, b, c, d: forgetting_attention(a, b, c, d), [q, k, v, g]),
              ("fox_acp_b", lambda a, b, c, d: forgetting_attention(a, b, c, d, log_eps=-10.0, logit_bound=bound),
               [q, k, v, g])]
    for thr in (0.0, 0.1, 0.2, 0.3):
        dense = torch.nonzero(per_head <= thr).flatten().to(dev)
        sparse = torch.nonzero(per_head > thr).flatten().to(dev)
        cands.append((f"hybrid_thr{thr}_dense{len(dense)}", hybrid_fn(dense, sparse, bound), [q, k, v, g]))
    for name, fn, ins in cands:
        ctx = sdpa_kernel(CUDNN) if name == "sdpa_cudnn" else contextlib.nullcontext()
        try:
            with ctx:
                tf, ta = measure(fn, ins)
        except Exception as e:
            print(L, name, "FAILED", repr(e)[:300], flush=True)
            continue
        r = {"impl": name, "L": L, "fwd_ms": round(tf, 3), "fwdbwd_ms": round(ta, 3),
             "fwdbwd_tflops": round(3.5 * fl / ta / 1e9, 1)}
        rows.append(r)
        print(json.dumps(r), flush=True)
    del q, k, v, g, qh, kh, vh
    torch.cuda.empty_cache()
