"""`pruned_forgetting_attention`: the Triton kernels of forgetting attention with learned
context pruning's keep mask, as a differentiable op (the plain-PyTorch reference is
`pruned_forgetting_attention_reference`, ground truth of its tests and its CPU fallback)."""

from __future__ import annotations

from typing import Optional

import torch
import triton

from ..forgetting_attn.boundary import key_block_start, lse_threshold, query_block_end, skipped_pairs
from ..forgetting_attn.common import (AttentionStats, check_backward_pruning, check_inputs,
                                      forget_prefix_sums, logit_bound_per_head, pruning_threshold,
                                      row_document_maps)
from ..forgetting_attn.function import _dot_precision
from ..forgetting_attn.tiles import _interpreting

# (query block, key block, warps, stages) of each kernel, the fastest of a sweep on an H200 at
# head_dim 128, 1k and 4k tokens (docs/benchmarks.md, learned context pruning); two stages keep
# head_dim 128's tiles in shared memory
_CONFIG = {"fwd": (64, 64, 4, 2), "dkdv": (128, 64, 8, 2), "dq": (64, 64, 4, 2), "dkeep": (64, 128, 8, 2)}


class _PrunedAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, c, keep, doc, sm_scale, bounds, lse_rule):
        B, T, H, D = q.shape
        o = torch.empty_like(q)
        lse = torch.empty(B, H, T, device=q.device, dtype=torch.float32)
        from .triton_kernels import pruned_fwd_kernel

        _launch(pruned_fwd_kernel, "fwd", lambda bm, bn: (triton.cdiv(T, bm), B * H), q, k, v, c, keep,
                _doc_arg(doc, c), o, lse, meta=(q, k, doc, sm_scale, bounds))
        ctx.save_for_backward(q, k, v, c, keep, doc, o, lse)
        ctx.sm_scale, ctx.bounds, ctx.lse_rule = sm_scale, bounds, lse_rule
        return o

    @staticmethod
    def backward(ctx, do):
        from .triton_kernels import pruned_bwd_dkdv_kernel, pruned_bwd_dkeep_kernel, pruned_bwd_dq_kernel

        q, k, v, c, keep, doc, o, lse = ctx.saved_tensors
        B, T, H, D = q.shape
        do = do.contiguous()
        delta = (do.float() * o.float()).sum(-1).transpose(1, 2).contiguous()  # D_i = dO_i . O_i, [B, H, T]
        bounds = ctx.bounds
        if ctx.lse_rule is not None:  # (delta, U, doc maps, c_global): tighter boundaries now that lse is known
            threshold, bound, docs_se, c_global = ctx.lse_rule
            names = ("dkdv", "dq") + (("dkeep",) if ctx.needs_input_grad[4] else ())
            bounds = _block_bounds(c_global, threshold, docs_se, names, lse=(bound, lse))
        meta = (q, k, doc, ctx.sm_scale, bounds)
        dk_h, dv_h = torch.empty_like(q), torch.empty_like(q)  # per query head, summed over groups below
        dcol, drow = torch.empty_like(lse), torch.empty_like(lse)
        dq = torch.empty_like(q)
        docs = _doc_arg(doc, c)
        _launch(pruned_bwd_dkdv_kernel, "dkdv", lambda bm, bn: (triton.cdiv(T, bn), B * H), q, k, v, c, keep, docs, do,
                lse, delta, dk_h, dv_h, dcol, meta=meta)
        _launch(pruned_bwd_dq_kernel, "dq", lambda bm, bn: (triton.cdiv(T, bm), B * H), q, k, v, c, keep, docs, do, lse,
                delta, dq, drow, meta=meta)
        dkeep = None
        if ctx.needs_input_grad[4]:
            dkeep = torch.empty_like(keep)
            _launch(pruned_bwd_dkeep_kernel, "dkeep", lambda bm, bn: (triton.cdiv(T, bm) * triton.cdiv(T, bn), B), q, k,
                    v, c, docs, do, lse, delta, dkeep, meta=meta)
        G = k.shape[2]
        dk = dk_h.view(B, T, G, H // G, D).sum(3, dtype=torch.float32).to(k.dtype)
        dv = dv_h.view(B, T, G, H // G, D).sum(3, dtype=torch.float32).to(v.dtype)
        # s_ij holds c_i - c_j: dc_i = (row sums of dS)_i - (column sums of dS)_i
        return dq, dk, dv, drow - dcol, dkeep, None, None, None, None


def kernel_supports(head_dim: int) -> bool:
    """Whether the Triton kernels take this head dim (a power of two in [16, 128])."""
    return head_dim & (head_dim - 1) == 0 and 16 <= head_dim <= 128


def _launch(kernel, name, grid, *tensors, meta):
    """kernel[grid(BM, BN)](*tensors, BOUND, strides and sizes, BM, BN, ...) in the _CONFIG of
    `name`; meta = (q, k, doc, sm_scale, bounds), bounds None or {name: [B, H, blocks] int32}."""
    bm, bn, warps, stages = _CONFIG[name]
    q, k, doc, sm_scale, bounds = meta
    H, D = q.shape[2], q.shape[3]
    bound = tensors[0] if bounds is None else bounds[name]  # a placeholder pointer where not BOUNDED
    kernel[grid(bm, bn)](*tensors, bound, q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1),
                         k.stride(2), q.shape[1], H, H // k.shape[2], float(sm_scale), D, bm, bn, doc is not None,
                         _dot_precision(q), bounds is not None, num_warps=warps, num_stages=stages)


def _block_bounds(c_global, delta, docs_se, names, lse=None):
    """BOUND (see triton_kernels) of each kernel in `names`, from the non-increasing gate sums
    c_global [B, H, T], the ACP threshold delta [B, H] (None: nothing pruned) and the
    documents (docs_se: `row_document_maps`' (start, end) [B, T], or None); None where neither skips
    anything. lse = (U [B, H], the forward's rows' lse [B, H, T]): the backward's
    per-query-block thresholds instead (`boundary.lse_threshold`: pairs below weigh < eps / T
    each, the mask only lowers them). Kernels of one tile shape share one search."""
    if delta is None and docs_se is None:
        return None
    doc_start, doc_end = (None, None) if docs_se is None else docs_se
    thresholds, searched, bounds = {}, {}, {}
    for name in names:
        bm, bn = _CONFIG[name][:2]
        if bm not in thresholds:
            thresholds[bm] = delta if lse is None or delta is None else lse_threshold(delta, lse[0], lse[1], bm)
        key = (name == "dkdv", bm, bn)  # dK/dV loops over query blocks: its bound is the end
        if key not in searched:
            search, doc = (query_block_end, doc_end) if name == "dkdv" else (key_block_start, doc_start)
            searched[key] = search(c_global, c_global, thresholds[bm], doc, bm, bn)
        bounds[name] = searched[key]
    return bounds


def _stats(bounds, B, T, H, doc_start, device) -> AttentionStats:
    """What the forward skipped (AttentionStats, computed on first access)."""
    bm, bn = _CONFIG["fwd"][:2]

    def compute():
        if bounds is None:  # every block computed
            return (torch.zeros((), dtype=torch.float64, device=device),
                    torch.zeros(H, dtype=torch.float64, device=device),
                    torch.zeros(B, H, triton.cdiv(T, bm), dtype=torch.int64, device=device))
        start = bounds["fwd"]
        skipped, total = skipped_pairs(start, bm, bn, T, doc_start)
        return skipped.sum() / total.sum(), skipped.sum(0) / total.sum(0), start.long() * bn

    return AttentionStats(compute, bm, bn)


def _doc_arg(doc, c):
    return doc if doc is not None else c  # a placeholder pointer where HAS_DOC is False


def pruned_forgetting_attention(q, k, v, log_fgate, keep, *, sm_scale: Optional[float] = None,
                                log_eps: Optional[float] = None, logit_bound=None,
                                cu_seqlens: Optional[torch.Tensor] = None, return_stats: bool = False,
                                backward_pruning: str = "bound"):
    """FoX attention with the learned keep mask: weights I_ij exp(s_ij) normalised per row.

    q [B, T, H, D], k, v [B, T, Hkv, D] (bf16, fp16 or fp32; D 16-128, a power of two),
    log_fgate [B, T, H] float32, keep I [B, T, T] float32 (query, key; shared by the heads,
    in [0, 1], ones on the diagonal); log_eps, logit_bound and cu_seqlens as in
    `forgetting_attention`, except that cu_seqlens may also cover a batch > 1 (offsets over
    its B * T tokens, batch-major, holding every sample's start): with log_eps the kernels
    skip the blocks ACP prunes (their pairs weigh at most eps per row without the mask, so
    no more with it); backward_pruning "lse" lets the backward skip by the rows'
    log-sum-exp as there, "bound" as the forward.
    Returns o [B, T, H, D] in q.dtype, and with return_stats an `AttentionStats` of the
    forward's skipping;
    differentiable in q, k, v, log_fgate and keep (keep's gradient also where I_ij = 0, as
    the reference's; 0 where ACP skips). Triton on CUDA and under TRITON_INTERPRET=1;
    elsewhere the plain-PyTorch reference (exact: nothing skipped).
    """
    from .reference import pruned_forgetting_attention_reference

    sm_scale, logit_bound = check_inputs(q, k, v, log_fgate, sm_scale, log_eps, logit_bound, cu_seqlens,
                                         per_sample=True)
    check_backward_pruning(backward_pruning)
    B, T, H, D = q.shape
    if keep.shape != (B, T, T):
        raise ValueError(f"keep must be [batch, seq, seq] = ({B}, {T}, {T}), got {tuple(keep.shape)}")
    if q.device.type != "cuda" and not _interpreting():
        o = pruned_forgetting_attention_reference(q, k, v, log_fgate, keep, sm_scale=sm_scale, cu_seqlens=cu_seqlens)
        return (o, _stats(None, B, T, H, None, q.device)) if return_stats else o
    if not kernel_supports(D):
        raise ValueError(f"head_dim must be a power of two in [16, 128] here, got {D}")
    docs_se = None if cu_seqlens is None else row_document_maps(cu_seqlens, B, T, q.device)  # (start, end) [B, T]
    doc = None if docs_se is None else docs_se[0]  # each token's document start in its row
    # c for the logits restarts at documents (small values, float32 precision); the block
    # boundaries need c_global, non-increasing over the whole row as their searches assume
    c_global, c = forget_prefix_sums(log_fgate, doc)  # [B, H, T] each
    c, c_global = c.contiguous(), c_global.detach()
    delta = lse_rule = None
    if log_eps is not None:
        with torch.no_grad():
            U = logit_bound_per_head(q.detach(), k.detach(), sm_scale, logit_bound)
            delta = pruning_threshold(U, T, log_eps)
        lse_rule = (delta, U, docs_se, c_global) if backward_pruning == "lse" else None
    # with the lse rule the backward finds its own boundaries: the forward's only here
    bounds = _block_bounds(c_global, delta, docs_se, ("fwd",) if lse_rule is not None else tuple(_CONFIG))
    q, k, v = (t.contiguous() for t in (q, k, v))
    o = _PrunedAttention.apply(q, k, v, c, keep.float().contiguous(), doc, sm_scale, bounds, lse_rule)
    return (o, _stats(bounds, B, T, H, doc, q.device)) if return_stats else o
