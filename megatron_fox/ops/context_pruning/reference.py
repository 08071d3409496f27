"""Learned dynamic context pruning (Anagnostidis et al. 2023) on forgetting attention,
plain PyTorch with materialised [T, T] masks: the CPU path, and the ground truth of the
Triton kernels (`keep_mask`, `pruned_forgetting_attention`) and of the decoding cache.

Interaction scores of query position n and key position j (one set per layer, shared by its
heads): z_nj = q_int_n . k_int_j / sqrt(r) + beta, with q_int, k_int [T, r] projections of
the layer input. Token n keeps token j with probability sigmoid_alpha(z_nj); a token once
dropped stays dropped, so query k sees key j < k with
    I_kj = prod_{n=j+1..k} sigmoid_alpha(z_nj),    I_kk = 1,
and attention multiplies the FoX weights by it:
    o_k = sum_j I_kj exp(s_kj) v_j / sum_j I_kj exp(s_kj),   s_kj = sm_scale q_k.k_j + c_k - c_j.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from ..forgetting_attn.common import check_batch_offsets, check_inputs, row_document_maps
from ..forgetting_attn.reference import reference_logits
from .sparse_sigmoid import sparse_sigmoid


def keep_probabilities(q_int: torch.Tensor, k_int: torch.Tensor, beta, alpha: float) -> torch.Tensor:
    """sigmoid_alpha(z) of every (query n, key j) pair: q_int [B, Tq, r], k_int [B, Tk, r],
    beta a float or 0-dim tensor -> [B, Tq, Tk] float32 (float64 for float64 inputs)."""
    dtype = torch.promote_types(q_int.dtype, torch.float32)
    z = torch.einsum("bnr,bjr->bnj", q_int.to(dtype), k_int.to(dtype)) / math.sqrt(q_int.shape[-1]) + beta
    return sparse_sigmoid(z, alpha)


def check_interaction(q_int: torch.Tensor, k_int: torch.Tensor) -> None:
    """ValueError naming q_int and k_int unless both are [batch, seq, r] of one shape."""
    if q_int.dim() != 3 or q_int.shape != k_int.shape:
        raise ValueError(f"q_int and k_int must both be [batch, seq, r], got {tuple(q_int.shape)} and "
                         f"{tuple(k_int.shape)}")


def keep_mask_reference(q_int: torch.Tensor, k_int: torch.Tensor, beta, alpha: float) -> torch.Tensor:
    """I [B, T, T] float32 or float64 (query, key): the product over the queries n in (j, k] of the keep
    probabilities, 1 on and above the diagonal (the causal mask of the attention removes the
    part above it). q_int, k_int [B, T, r]."""
    check_interaction(q_int, k_int)
    T = q_int.shape[1]
    p = keep_probabilities(q_int, k_int, beta, alpha)
    later = torch.ones(T, T, dtype=torch.bool, device=p.device).tril(-1)  # n > j
    return torch.cumprod(torch.where(later, p, torch.ones_like(p)), dim=1)


def kept_fraction(keep: torch.Tensor, cu_seqlens: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Mean over the samples of each one's mean of I over the pairs pruning can remove (key
    strictly before the query, same document): keep [B, T, T] -> 0-dim float32,
    differentiable (the sparsity penalty). cu_seqlens: document offsets over the batch's
    B * T tokens, batch-major, holding every sample's start (as `pruned_forgetting_attention`'s).
    Its backward keeps no [B, T, T] tensor: the pairs are rebuilt from the documents' starts."""
    B, T = keep.shape[:2]
    if cu_seqlens is None:
        start = torch.zeros(B, T, dtype=torch.int32, device=keep.device)
    else:
        check_batch_offsets(cu_seqlens, B, T)
        start, _ = row_document_maps(cu_seqlens, B, T, keep.device)
    return _PerSampleMean.apply(keep, start).mean()


def _prunable_pairs(start: torch.Tensor) -> torch.Tensor:
    """[B, T, T] bool: key strictly before the query, both in one document (start [B, T])."""
    T = start.shape[1]
    later = torch.ones(T, T, dtype=torch.bool, device=start.device).tril(-1)
    return later & (start[:, :, None] == start[:, None, :])


class _PerSampleMean(torch.autograd.Function):
    """keep [B, T, T], start [B, T] -> [B]: each sample's mean of keep over its prunable pairs."""

    @staticmethod
    def forward(ctx, keep, start):
        pairs = _prunable_pairs(start)
        count = pairs.sum((1, 2)).clamp(min=1).to(keep.dtype)
        ctx.save_for_backward(start, count)
        return torch.where(pairs, keep, 0).sum((1, 2)) / count

    @staticmethod
    def backward(ctx, grad):
        start, count = ctx.saved_tensors
        return _prunable_pairs(start) * (grad / count)[:, None, None], None


def pruned_forgetting_attention_reference(q, k, v, log_fgate, keep, *, sm_scale: Optional[float] = None,
                                          cu_seqlens: Optional[torch.Tensor] = None,
                                          dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """FoX attention with the learned keep mask, differentiable in all inputs and `keep`.

    q [B, T, H, D], k, v [B, T, Hkv, D], log_fgate [B, T, H] float32 as in
    `forgetting_attention` (q, k, v also float64, for gradient checks); keep [B, T, T]
    (shared by the heads) or [B, H, T, T], values in [0, 1] with ones on the diagonal;
    cu_seqlens with batch > 1: offsets over the batch's B * T tokens, batch-major, holding
    every sample's start. Returns o [B, T, H, D] in q.dtype.
    """
    checked = [t.float() if t.dtype == torch.float64 else t for t in (q, k, v)]
    sm_scale, _ = check_inputs(*checked, log_fgate, sm_scale, None, None, cu_seqlens, per_sample=True)
    B, T, H, _ = q.shape
    if keep.shape not in ((B, T, T), (B, H, T, T)):
        raise ValueError(f"keep must be [batch, seq, seq] or [batch, heads, seq, seq] = ({B}, {T}, {T}) or "
                         f"({B}, {H}, {T}, {T}), got {tuple(keep.shape)}")
    keep = keep.to(dtype)
    if keep.dim() == 3:
        keep = keep[:, None]
    if cu_seqlens is not None and B > 1:
        # pairs across documents weigh 0 through the mask; within one, c_i - c_j is the same
        # whether c restarts at the document or not
        start, _ = row_document_maps(cu_seqlens, B, T, q.device)
        keep = keep * (start[:, None, :, None] == start[:, None, None, :]).to(dtype)
        cu_seqlens = None
    s, _ = reference_logits(q, k, log_fgate, sm_scale, cu_seqlens, dtype)  # [B, H, T, T], -inf outside
    # the row maximum over kept pairs only (the diagonal is always kept): w sums to >= 1
    m = s.masked_fill(keep <= 0, float("-inf")).amax(-1, keepdim=True).detach()
    w = torch.exp(s - m) * keep
    p = w / w.sum(-1, keepdim=True)
    vf = v.to(dtype).transpose(1, 2).repeat_interleave(H // k.shape[2], dim=1)
    return (p @ vf).transpose(1, 2).to(q.dtype)
