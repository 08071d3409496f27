"""What a call computes once and its backward reuses: the pruning thresholds of the forward
and of the backward (ACP's rule, the rows' lse or the diagonal logits below it, exact FoX's
zero blocks)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import torch

from . import boundary
from .common import LOG2E, input_document_maps, logit_bound_per_head, pruning_threshold
from .row_norm import diagonal_logits, max_row_norm
from .tiles import KernelConfig


@dataclass
class _Plan:
    """What forward computes once and backward reuses (not tensors of the graph)."""

    sm_scale: float
    delta: Optional[torch.Tensor]  # [B, H] ACP threshold, None for exact
    doc_start: Optional[torch.Tensor]  # [T] int32, or [B, T] (per batch row)
    doc_end: Optional[torch.Tensor]
    config: KernelConfig
    bound: Optional[torch.Tensor] = None  # [B, H] logit bound U (behind delta; exact FoX: for zero blocks)
    backward_pruning: str = "bound"  # "lse": the backward prunes by boundary.lse_threshold
    diagonal: Optional[torch.Tensor] = None  # [B, H, T] sm_scale q_i.k_i: exact FoX's forward prunes by it
    # block_m -> the backward's lse threshold; a dict the caller may share between
    # calls with the same rows (lse, U, delta), e.g. a ring's key chunks of one query chunk
    backward_thresholds: Optional[dict] = None


def _prepare(q, k, log_fgate, sm_scale, log_eps, logit_bound, cu_seqlens, config, backward_pruning="bound"):
    B, T = q.shape[:2]
    doc_start, doc_end = input_document_maps(cu_seqlens, B, T, q.device)
    delta = U = diagonal = None
    with torch.no_grad():
        if skips_zero_blocks(log_eps) and _forward_by_diagonal_on:
            U, diagonal = _bound_and_diagonal(q, k, sm_scale, logit_bound)
        elif log_eps is not None or _skip_zero_on:
            U = logit_bound_per_head(q, k, sm_scale, logit_bound, max_norm=max_row_norm if q.is_cuda else None)
    if log_eps is not None:
        delta = pruning_threshold(U, T, log_eps)
    return _Plan(sm_scale, delta, doc_start, doc_end, config, U, backward_pruning, diagonal)


def skips_zero_blocks(log_eps) -> bool:
    """Whether a call with this log_eps skips exact FoX's blocks that are zero in float32."""
    return log_eps is None and _skip_zero_on


def forward_diagonal(q, k, sm_scale) -> Optional[torch.Tensor]:
    """The diagonal logits sm_scale q_i.k_i [B, H, T] float32 that exact FoX's forward finds
    its zero blocks by (q [B, T, H, D], k [B, T, Hkv, D] at the same positions); None where
    MEGATRON_FOX_FWD_DIAGONAL=0."""
    if not _forward_by_diagonal_on:
        return None
    with torch.no_grad():
        if q.is_cuda:
            return diagonal_logits(q, k, sm_scale)
        group = q.shape[2] // k.shape[2]
        return sm_scale * torch.einsum("bthd,bthd->bht", q.float(), k.float().repeat_interleave(group, 2))


def _bound_and_diagonal(q, k, sm_scale, logit_bound):
    """U [B, H] as `logit_bound_per_head` gives it and the diagonal logits [B, H, T], on CUDA
    from one read of q and k (the row norms of the data bound come with the diagonal)."""
    if not q.is_cuda or logit_bound is not None:
        return logit_bound_per_head(q, k, sm_scale, logit_bound), forward_diagonal(q, k, sm_scale)
    diagonal, qn, kn = diagonal_logits(q, k, sm_scale, norms=True)
    return sm_scale * qn * kn.repeat_interleave(q.shape[2] // k.shape[2], dim=1), diagonal


# Exact FoX: the backward skips the key blocks in which every weight p_ij = exp(s_ij + c_i -
# c_j - lse_i) < exp(ZERO_LOG_WEIGHT) = 2^-158.7, below float32's smallest denormal (2^-149)
# with room for the rounding of the exponent: each such p is +0.0 in the kernels, adds exactly
# nothing to dQ, dK, dV or the dS sums, so the gradients are the same to the bit.
ZERO_LOG_WEIGHT = -110.0
_skip_zero_on = os.environ.get("MEGATRON_FOX_SKIP_ZERO", "1") != "0"


def set_zero_block_skipping(enabled: bool) -> bool:
    """Let the exact (log_eps=None) backward skip blocks whose weights are all zero in float32
    (True, the default; MEGATRON_FOX_SKIP_ZERO=0 turns it off); returns the previous setting."""
    global _skip_zero_on
    previous, _skip_zero_on = _skip_zero_on, bool(enabled)
    return previous


def _backward_prunes_by_lse(plan: _Plan) -> bool:
    """Whether the backward's threshold comes from the rows' lse: ACP with backward_pruning
    "lse", or exact FoX skipping its zero blocks (U known)."""
    return plan.bound is not None and (plan.delta is None or plan.backward_pruning == "lse")


# Exact FoX's forward skips its zero blocks by a lower bound of the rows' lse (unknown
# before the forward): lse_i >= s_ii = sm_scale q_i.k_i (the diagonal term is always
# computed). MEGATRON_FOX_FWD_DIAGONAL=0 keeps the exact forward on every block (A/B runs).
# ACP's forward stays on delta: there the extra read of q and k cost what it saved (H100,
# docs/kernel_notes.md step 27).
_forward_by_diagonal_on = os.environ.get("MEGATRON_FOX_FWD_DIAGONAL", "1") != "0"


def _forward_delta(plan: _Plan, block_m: int):
    """The threshold a forward with query blocks of block_m rows prunes by: delta [B, H]
    (None: nothing), or, with the diagonal logits known, `boundary.lse_threshold` of them:
    a skipped pair's weight is exp(s_ij + c_i - c_j - lse_i) <= exp(U + c_i - c_j - s_ii),
    below the float32 zero of ZERO_LOG_WEIGHT as in the backward."""
    if plan.diagonal is None:
        return plan.delta
    return boundary.lse_threshold(_lse_base(plan), plan.bound, plan.diagonal, block_m)


def _lse_base(plan: _Plan) -> torch.Tensor:
    """The delta that `boundary.lse_threshold` lifts by U + lse: ACP's, or exact FoX's float32
    zero (-2U + ZERO_LOG_WEIGHT, the ACP rule at log_eps - log L = ZERO_LOG_WEIGHT)."""
    return plan.delta if plan.delta is not None else ZERO_LOG_WEIGHT - 2.0 * plan.bound


def _backward_delta(plan: _Plan, lse2, block_m: int):
    """The threshold a backward kernel with query blocks of block_m rows prunes by, from the
    rows' log-sum-exp (lse2 [B, H, T], base 2) where it can: with backward_pruning="lse" the
    ACP rule of `boundary.lse_threshold`; for exact FoX only weights that are zero in float32
    (delta = -2U + ZERO_LOG_WEIGHT, the forward's rule at log_eps - log L = ZERO_LOG_WEIGHT);
    else the forward's delta [B, H] (None: nothing). It depends on the rows alone (not on c),
    so plan.backward_thresholds may carry it from one call to the next."""
    if not _backward_prunes_by_lse(plan):
        return plan.delta
    cache = plan.backward_thresholds
    if cache is not None and block_m in cache:
        return cache[block_m]
    thr = boundary.lse_threshold(_lse_base(plan), plan.bound, lse2 * (1.0 / LOG2E), block_m)
    if cache is not None:
        cache[block_m] = thr
    return thr
