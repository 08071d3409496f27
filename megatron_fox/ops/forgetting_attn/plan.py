"""What a call computes once and its backward reuses: the pruning thresholds of the forward
and of the backward (ACP's rule, the rows' lse, exact FoX's zero blocks)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import torch

from . import boundary
from .common import LOG2E, document_maps, logit_bound_per_head, pruning_threshold
from .row_norm import max_row_norm
from .tiles import KernelConfig


@dataclass
class _Plan:
    """What forward computes once and backward reuses (not tensors of the graph)."""

    sm_scale: float
    delta: Optional[torch.Tensor]  # [B, H] ACP threshold, None for exact
    doc_start: Optional[torch.Tensor]  # [T] int32
    doc_end: Optional[torch.Tensor]
    config: KernelConfig
    bound: Optional[torch.Tensor] = None  # [B, H] logit bound U (behind delta; exact FoX: for zero blocks)
    backward_pruning: str = "bound"  # "lse": the backward prunes by boundary.lse_threshold


def _prepare(q, k, log_fgate, sm_scale, log_eps, logit_bound, cu_seqlens, config, backward_pruning="bound"):
    T = q.shape[1]
    if cu_seqlens is not None:
        doc_start, doc_end = document_maps(cu_seqlens, T, q.device)
    else:
        doc_start = doc_end = None
    delta = U = None
    if log_eps is not None or _skip_zero_on:
        with torch.no_grad():
            U = logit_bound_per_head(q, k, sm_scale, logit_bound, max_norm=max_row_norm if q.is_cuda else None)
    if log_eps is not None:
        delta = pruning_threshold(U, T, log_eps)
    return _Plan(sm_scale, delta, doc_start, doc_end, config, U, backward_pruning)


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


def _backward_delta(plan: _Plan, lse2, block_m: int):
    """The threshold a backward kernel with query blocks of block_m rows prunes by, from the
    rows' log-sum-exp (lse2 [B, H, T], base 2) where it can: with backward_pruning="lse" the
    ACP rule of `boundary.lse_threshold`; for exact FoX only weights that are zero in float32
    (delta = -2U + ZERO_LOG_WEIGHT, the forward's rule at log_eps - log L = ZERO_LOG_WEIGHT);
    else the forward's delta [B, H] (None: nothing)."""
    if not _backward_prunes_by_lse(plan):
        return plan.delta
    delta = plan.delta if plan.delta is not None else ZERO_LOG_WEIGHT - 2.0 * plan.bound
    return boundary.lse_threshold(delta, plan.bound, lse2 * (1.0 / LOG2E), block_m)
