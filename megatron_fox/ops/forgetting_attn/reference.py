"""Plain-PyTorch forgetting attention: materialised logits, ground truth for tests.

O(T^2) memory; meant for tests, CPU fallback at small sizes, and measuring the
softmax weight that pruning removes.
"""

from __future__ import annotations

from typing import Optional

import torch

from .common import (
    AttentionStats,
    check_inputs,
    input_document_maps,
    logit_bound_per_head,
    pruning_threshold,
)


def reference_logits(q, k, log_fgate, sm_scale, cu_seqlens=None, dtype=torch.float32):
    """Logits s_ij = sm_scale q_i.k_j + c_i - c_j, -inf outside causal/document.

    q [B, T, H, D], k [B, T, Hkv, D], log_fgate [B, T, H] -> s [B, H, T, T] in `dtype`,
    and the global prefix sums c [B, H, T] (float64 when dtype is float64).
    """
    B, T, H, _ = q.shape
    group = H // k.shape[2]
    qf = q.to(dtype).transpose(1, 2)  # [B, H, T, D]
    kf = k.to(dtype).transpose(1, 2).repeat_interleave(group, dim=1)
    c = torch.cumsum(log_fgate.to(dtype).transpose(1, 2), dim=-1)  # [B, H, T]
    s = sm_scale * qf @ kf.transpose(-1, -2) + c[..., :, None] - c[..., None, :]
    s = s.masked_fill(~allowed_pairs(T, cu_seqlens, q.device, B), float("-inf"))
    return s, c


def allowed_pairs(T, cu_seqlens, device, B=1):
    """bool, key j visible to query i (causal, same document): [T, T], or [B, 1, T, T] where
    B > 1 and cu_seqlens holds offsets over the batch-major B * T tokens (documents per row)."""
    i = torch.arange(T, device=device)
    allowed = i[None, :] <= i[:, None]
    doc_start, _ = input_document_maps(cu_seqlens, B, T, device)
    if doc_start is not None:
        first = doc_start.long()[..., :, None]  # [T, 1], or [B, T, 1]: then [B, 1, T, 1] beside the heads
        allowed = allowed & (i >= (first if first.dim() == 2 else first[:, None]))
    return allowed


def forgetting_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_fgate: torch.Tensor,
    *,
    sm_scale: Optional[float] = None,
    log_eps: Optional[float] = None,
    logit_bound=None,
    cu_seqlens: Optional[torch.Tensor] = None,
    return_stats: bool = False,
    dtype: torch.dtype = torch.float32,
):
    """Reference FoX attention, same arguments as `forgetting_attention`.

    With log_eps set, every pair below the ACP threshold is dropped individually (pair
    granularity; the kernel drops whole blocks, a subset of these pairs), so both
    differ from exact FoX by at most exp(log_eps) softmax weight per row.
    Computes in `dtype` (float32 or float64), returns o in q.dtype, [B, T, H, D].
    With return_stats also an AttentionStats (pair-granular; query_block_start is
    the first unpruned key of each query, block_m = block_n = 1).
    """
    sm_scale, logit_bound = check_inputs(q, k, v, log_fgate, sm_scale, log_eps, logit_bound, cu_seqlens,
                                         per_sample=True)
    o, _, stats = reference_attention_with_lse(q, k, v, log_fgate, sm_scale=sm_scale, log_eps=log_eps,
                                               logit_bound=logit_bound, cu_seqlens=cu_seqlens, dtype=dtype)
    return (o, stats) if return_stats else o


def reference_attention_with_lse(q, k, v, log_fgate, *, sm_scale, log_eps=None, logit_bound=None,
                                 cu_seqlens=None, dtype=torch.float32):
    """Reference on checked inputs: (o [B, T, H, D], lse [B, H, T] float32, AttentionStats)."""
    B, T, H, D = q.shape
    group = H // k.shape[2]
    s, c = reference_logits(q, k, log_fgate, sm_scale, cu_seqlens, dtype)
    allowed = torch.isfinite(s)
    if log_eps is not None:
        U = logit_bound_per_head(q, k, sm_scale, logit_bound).to(dtype)
        delta = pruning_threshold(U, T, log_eps)  # [B, H]
        pruned = (c[..., :, None] - c[..., None, :]) < delta[..., None, None]
        s = s.masked_fill(pruned, float("-inf"))  # delta < 0: never the diagonal
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - lse[..., None])
    vf = v.to(dtype).transpose(1, 2).repeat_interleave(group, dim=1)
    o = (p @ vf).transpose(1, 2).to(q.dtype)
    kept = torch.isfinite(s)
    total = allowed.sum(dim=(-1, -2)).to(torch.float64)  # [B, H]
    skipped = (allowed & ~kept).sum(dim=(-1, -2)).to(torch.float64)
    first_kept = torch.where(kept, torch.arange(T, device=q.device), T).amin(dim=-1)
    stats = AttentionStats.of(
        skipped_fraction=skipped.sum() / total.sum(),
        skipped_fraction_per_head=skipped.sum(0) / total.sum(0),
        query_block_start=first_kept,
        block_m=1,
        block_n=1,
    )
    return o, lse.float(), stats


def softmax_weight_before(q, k, log_fgate, key_start, *, sm_scale=None, cu_seqlens=None):
    """Largest exact-softmax weight that a row puts on keys before `key_start`.

    key_start [B, H, T] (first computed key per query row). Returns [B, H] float64:
    max over rows of sum_{j < key_start_i} softmax(s_i)_j, the mass ACP removed.
    """
    D = q.shape[-1]
    sm_scale = 1.0 / D**0.5 if sm_scale is None else sm_scale
    s, _ = reference_logits(q, k, log_fgate, sm_scale, cu_seqlens, torch.float64)
    p = torch.softmax(s, dim=-1)
    T = q.shape[1]
    before = torch.arange(T, device=q.device)[None, None, None, :] < key_start[..., :, None]
    return (p * before).sum(-1).amax(-1)
