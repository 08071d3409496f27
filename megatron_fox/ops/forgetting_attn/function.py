"""Autograd function and public entry point of the Triton forgetting attention."""

from __future__ import annotations

import functools
import os
import warnings
from typing import Optional

import torch
import triton

from . import boundary
from .common import (
    LOG2E,
    AttentionStats,
    check_backward_pruning,
    check_inputs,
    doc_batch_stride,
    forget_prefix_sums,
    segmented_reverse_cumsum,
)
from .plan import _backward_delta, _backward_prunes_by_lse, _forward_delta, _Plan, _prepare
from .tiles import (
    _interpreting,
    _last_dim_contiguous,
    _prefix_rows,
    _prefix_source,
    _strides,
    _tiles,
    _tma_possible,
    _use_tma,
    kernel_config,
)
from .triton_bwd import bwd_preprocess_kernel, dkdv_kernel, dq_kernel
from .triton_fwd import fwd_kernel


# Hopper (sm_90) forward in Gluon with explicit warp roles (gluon_fwd.py): on by default where
# it applies (16-bit, causal, no packed documents, a head_dim in its TILES, TMA-able strides);
# MEGATRON_FOX_GLUON_FWD=0 or set_gluon_forward(False) keeps the Triton forward everywhere.
_gluon_fwd_on = os.environ.get("MEGATRON_FOX_GLUON_FWD", "1") != "0"


def set_gluon_forward(enabled: bool) -> bool:
    """Use the Gluon forward kernel on sm_90 where it applies (True, the default) or never;
    returns the previous setting."""
    global _gluon_fwd_on
    previous, _gluon_fwd_on = _gluon_fwd_on, bool(enabled)
    return previous


@functools.lru_cache(maxsize=None)
def _gluon_tiles() -> dict:
    """The Gluon forward's tiles, or {} where this Triton has no Gluon API it can build on
    (the kernel is written against Triton 3.6; the Triton forward then runs)."""
    try:
        from .gluon_fwd import TILES
    except (ImportError, AttributeError) as e:
        warnings.warn(f"megatron_fox: Gluon forward unavailable with triton {triton.__version__} ({e}); "
                      "using the Triton forward", stacklevel=2)
        return {}
    return TILES


def _gluon_forward_ok(q, k, v, plan: _Plan, causal: bool) -> bool:
    """The Gluon kernel applies here; it also needs the forward tile's block sizes (`start`
    and the stats are read in them)."""
    if not _gluon_fwd_on:
        return False
    fwd = plan.config.fwd
    blocks = _gluon_tiles().get(q.shape[-1], (0, 0))[:2]
    return (causal and plan.doc_start is None and q.is_cuda and not _interpreting()
            and q.dtype in (torch.float16, torch.bfloat16) and blocks == (fwd.block_m, fwd.block_n)
            and torch.cuda.get_device_capability(q.device) == (9, 0) and _tma_possible(q, k, v))


def _forward(q, k, v, cq, ck, cq_kern, ck_kern, plan: _Plan, causal: bool = True):
    """Launch the forward kernel. cq/ck: prefix sums [B, H, T] at query/key positions for the
    pruning decisions; cq_kern/ck_kern: the (document-restarted) ones added to the logits."""
    if _gluon_forward_ok(q, k, v, plan, causal):
        from .gluon_fwd import launch_forward

        block_m, block_n, _ = _gluon_tiles()[q.shape[-1]]
        start = boundary.key_block_start(cq, ck, _forward_delta(plan, block_m), plan.doc_start, block_m, block_n)
        o, lse2 = launch_forward(q, k, v, cq_kern, _prefix_rows(ck_kern), start, plan.sm_scale * LOG2E)
        return o, lse2, start
    B, T, H, D = q.shape
    group = H // k.shape[2]
    tile = plan.config.fwd
    start = boundary.key_block_start(cq, ck, _forward_delta(plan, tile.block_m), plan.doc_start, tile.block_m,
                                     tile.block_n)
    o = torch.empty_like(q)  # q's memory order: [s, b] views give an [s, b]-ordered o
    lse2 = torch.empty((B, H, T), dtype=torch.float32, device=q.device)
    nbm = triton.cdiv(T, tile.block_m)
    dummy = start  # never read when VARLEN is off
    tma = _use_tma(tile, q, k, v)
    fwd_kernel[(nbm, B * H)](
        *_tiles(tma, (q, tile.block_m), (k, tile.block_n), (v, tile.block_n)),
        cq_kern, _prefix_source(tma, ck_kern, tile.block_n), start,
        plan.doc_start if plan.doc_start is not None else dummy, o, lse2,
        *_strides(q), *_strides(k), *_strides(v), *_strides(o),
        T, H, nbm, plan.sm_scale * LOG2E, doc_batch_stride(plan.doc_start, B),
        GROUP=group, HEAD_DIM=D, BLOCK_M=tile.block_m, BLOCK_N=tile.block_n,
        VARLEN=plan.doc_start is not None, DOT_PREC=_dot_precision(q), CAUSAL=causal, TMA=tma,
        num_warps=tile.num_warps, num_stages=tile.num_stages,
    )
    return o, lse2, start


def _dot_precision(q):
    if _interpreting():
        return "upcast"
    return "ieee" if q.dtype == torch.float32 else "tf32"


def _dq_start(plan: _Plan, cq, ck, lse2):
    """First key block of each query block of the dQ kernel's tile, by the backward's threshold."""
    t = plan.config.dq
    return boundary.key_block_start(cq, ck, _backward_delta(plan, lse2, t.block_m), plan.doc_start,
                                    t.block_m, t.block_n)


def _backward(q, k, v, o, do, dlse, lse2, cq, ck, cq_kern, ck_kern, plan: _Plan, causal: bool = True,
              fwd_start=None):
    """Launch the backward kernels -> dq, dk, dv, row sums and column sums of dS [B, H, T].
    fwd_start: the forward's key_block_start, reused by the dQ kernel when its tile and
    threshold match."""
    B, T, H, D = q.shape
    Hkv = k.shape[2]
    group = H // Hkv
    cfg = plan.config
    varlen = plan.doc_start is not None
    do = _last_dim_contiguous(do)
    dlt = torch.empty((B, H, T), dtype=torch.float32, device=q.device)
    row = torch.empty((B, H, T), dtype=torch.float32, device=q.device)
    pre_block = 64
    bwd_preprocess_kernel[(triton.cdiv(T, pre_block), B * H)](
        o, do, dlse if dlse is not None else dlt, cq_kern, lse2, dlt, row, *_strides(o), *_strides(do), T, H,
        HEAD_DIM=D, BLOCK=pre_block, HAS_DLSE=dlse is not None,
    )
    # each gradient in its input's memory order (the kernels take strides; dv shares dk's)
    dq = torch.empty_like(q)
    dk = torch.empty_like(k)
    dv = torch.empty_like(dk)
    dcol = torch.empty((B, H, T), dtype=torch.float32, device=q.device)
    drow = torch.empty((B, H, T), dtype=torch.float32, device=q.device)
    qk_scale = plan.sm_scale * LOG2E
    prec = _dot_precision(q)

    t = cfg.dkdv
    end = boundary.query_block_end(cq, ck, _backward_delta(plan, lse2, t.block_m), plan.doc_end, t.block_m,
                                   t.block_n)
    nbn = triton.cdiv(T, t.block_n)
    tma = _use_tma(t, q, k, v, do)
    doc_start = plan.doc_start if varlen else end
    doc_end = plan.doc_end if varlen else end
    dkdv_kernel[(nbn, B * Hkv)](
        *_tiles(tma, (q, t.block_m), (k, t.block_n), (v, t.block_n), (do, t.block_m)),
        ck_kern, row, dlt, end, doc_start, doc_end, dk, dv, dcol,
        *_strides(q), *_strides(k), *_strides(v), *_strides(do), *_strides(dk),
        T, H, nbn, qk_scale, plan.sm_scale, doc_batch_stride(plan.doc_start, B),
        GROUP=group, HEAD_DIM=D, BLOCK_M=t.block_m, BLOCK_N=t.block_n, VARLEN=varlen, DOT_PREC=prec,
        CAUSAL=causal, TMA=tma, num_warps=t.num_warps, num_stages=t.num_stages,
    )
    t = cfg.dq
    if (fwd_start is not None and not _backward_prunes_by_lse(plan)
            and (t.block_m, t.block_n) == (cfg.fwd.block_m, cfg.fwd.block_n)):
        start = fwd_start
    else:
        start = _dq_start(plan, cq, ck, lse2)
    nbm = triton.cdiv(T, t.block_m)
    tma = _use_tma(t, q, k, v, do)
    dq_kernel[(nbm, B * H)](
        *_tiles(tma, (q, t.block_m), (k, t.block_n), (v, t.block_n), (do, t.block_m)),
        cq_kern, _prefix_source(tma, ck_kern, t.block_n), row, dlt, start, plan.doc_start if varlen else start, dq, drow,
        *_strides(q), *_strides(k), *_strides(v), *_strides(do), *_strides(dq),
        T, H, nbm, qk_scale, plan.sm_scale, doc_batch_stride(plan.doc_start, B),
        GROUP=group, HEAD_DIM=D, BLOCK_M=t.block_m, BLOCK_N=t.block_n, VARLEN=varlen, DOT_PREC=prec,
        CAUSAL=causal, TMA=tma, num_warps=t.num_warps, num_stages=t.num_stages,
    )
    return dq, dk, dv, drow, dcol


class ForgettingAttentionFunction(torch.autograd.Function):
    """o, lse = FoX attention (q, k, v, log_fgate); lse natural log, [B, H, T]."""

    @staticmethod
    def forward(ctx, q, k, v, log_fgate, plan: _Plan):
        q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
        c_global, c_doc = forget_prefix_sums(log_fgate, plan.doc_start)
        o, lse2, start = _forward(q, k, v, c_global, c_global, c_doc, c_doc, plan)
        ctx.save_for_backward(q, k, v, o, lse2, c_global, c_doc)
        ctx.plan = plan
        ctx.start = start
        ctx.mark_non_differentiable(start)
        return o, lse2 * (1.0 / LOG2E), start

    @staticmethod
    def backward(ctx, do, dlse, _dstart):
        q, k, v, o, lse2, c_global, c_doc = ctx.saved_tensors
        if dlse is not None:
            dlse = dlse.contiguous()
        dq, dk, dv, drow, dcol = _backward(q, k, v, o, do, dlse, lse2, c_global, c_global, c_doc, c_doc, ctx.plan,
                                           fwd_start=ctx.start)
        # dc_i = rowsum_i(dS) - colsum_i(dS); d log f_l = sum_{i >= l, same document} dc_i.
        # In exact arithmetic rowsum_i(dS) = dlse_i, but D comes from the rounded o: the
        # computed row sums carry the same rounding as the column sums, and the two cancel
        # in the reverse sum (taking dlse instead triples the bf16 error of d log f).
        dlogf = segmented_reverse_cumsum(drow - dcol, ctx.plan.doc_end)
        return dq, dk, dv, dlogf.transpose(1, 2), None


def forgetting_attention(
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
    return_lse: bool = False,
    backward_pruning: str = "bound",
):
    """Forgetting attention (FoX) with optional Adaptive Computation Pruning.

    q [B, T, H, D]; k, v [B, T, Hkv, D] (H a multiple of Hkv); log_fgate [B, T, H] float32
    (log of the forget gate, <= 0). o_i = sum_{j <= i} softmax_j(sm_scale q_i.k_j + c_i - c_j) v_j
    with c = cumsum(log_fgate), restarted at each document of cu_seqlens: int32 offsets
    [0, ..., T] of packed documents in one row (batch 1), or for B > 1 offsets over the
    B * T tokens in batch-major order holding every row's start (as Megatron packs a
    micro-batch; each row then keeps its own T, and q, k, v may be [s, b] memory-order
    views: nothing is copied, and o and the gradients follow q's memory order).
    log_eps=None computes exact FoX; otherwise key blocks whose pairs all have
    c_i - c_j < -(2U + log T) + log_eps are skipped (U = logit_bound, a float or [H] tensor,
    else sm_scale * max||q|| * max||k|| per batch and head).
    Exact FoX still skips key blocks whose weights all round to zero in float32
    (`ZERO_LOG_WEIGHT`; the same output and gradients to the bit; `set_zero_block_skipping`),
    found with U = logit_bound where given (it must bound the logits here too) or the data.
    backward_pruning="lse" lets the backward, which knows each row's log-sum-exp, skip also
    the pairs with c_i - c_j < lse_i - U - log T + log_eps (weight < eps / T each, the same
    guarantee; `boundary.lse_threshold`); "bound" (default) prunes it like the forward.
    (The exact forward, before lse is known, finds its zero blocks by the lower bound
    lse_i >= s_ii = sm_scale q_i.k_i.)

    Returns o [B, T, H, D] (dtype of q); then, if asked, the row log-sum-exp [B, H, T]
    float32 (return_lse, differentiable) and an AttentionStats (return_stats).
    Runs the Triton kernels on CUDA and under TRITON_INTERPRET=1; on other devices it
    falls back to the plain-PyTorch reference.
    """
    sm_scale, logit_bound = check_inputs(q, k, v, log_fgate, sm_scale, log_eps, logit_bound, cu_seqlens,
                                         per_sample=True)
    check_backward_pruning(backward_pruning)
    if q.device.type != "cuda" and not _interpreting():
        return _reference_fallback(q, k, v, log_fgate, sm_scale, log_eps, logit_bound, cu_seqlens,
                                   return_stats, return_lse)
    config = kernel_config(q.shape[-1], q.device, q.dtype)
    plan = _prepare(q, k, log_fgate, sm_scale, log_eps, logit_bound, cu_seqlens, config, backward_pruning)
    o, lse, start = ForgettingAttentionFunction.apply(q, k, v, log_fgate, plan)
    out = [o]
    if return_lse:
        out.append(lse)
    if return_stats:
        out.append(_stats(start, plan, q.shape[1], log_fgate.detach(), lse.detach()))
    return out[0] if len(out) == 1 else tuple(out)


def _stats(start, plan: _Plan, T: int, log_fgate, lse) -> AttentionStats:
    tile = plan.config.fwd

    def compute():
        skipped, total = boundary.skipped_pairs(start, tile.block_m, tile.block_n, T, plan.doc_start)
        return skipped.sum() / total.sum(), skipped.sum(0) / total.sum(0), start.long() * tile.block_n

    def backward():  # the dQ kernel's boundary, as _backward finds it
        t = plan.config.dq
        c, _ = forget_prefix_sums(log_fgate, plan.doc_start)
        skipped, total = boundary.skipped_pairs(_dq_start(plan, c, c, lse * LOG2E), t.block_m, t.block_n, T,
                                                plan.doc_start)
        return skipped.sum() / total.sum()

    return AttentionStats(compute, tile.block_m, tile.block_n, backward if _backward_prunes_by_lse(plan) else None)


def _reference_fallback(q, k, v, log_fgate, sm_scale, log_eps, logit_bound, cu_seqlens, return_stats, return_lse):
    from .reference import reference_attention_with_lse

    o, lse, stats = reference_attention_with_lse(q, k, v, log_fgate, sm_scale=sm_scale, log_eps=log_eps,
                                                 logit_bound=logit_bound, cu_seqlens=cu_seqlens)
    out = [o]
    if return_lse:
        out.append(lse)
    if return_stats:
        out.append(stats)
    return out[0] if len(out) == 1 else tuple(out)
