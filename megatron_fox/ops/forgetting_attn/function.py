"""Autograd function and public entry point of the Triton forgetting attention."""

from __future__ import annotations

import functools
import os
import warnings
from dataclasses import dataclass
from typing import Optional

import torch
import triton

from . import boundary
from .common import (
    AttentionStats,
    check_inputs,
    document_maps,
    forget_prefix_sums,
    logit_bound_per_head,
    pruning_threshold,
    segmented_reverse_cumsum,
)
from .row_norm import max_row_norm
from .triton_bwd import bwd_preprocess_kernel, dkdv_kernel, dq_kernel
from .triton_fwd import fwd_kernel

LOG2E = 1.4426950408889634


@dataclass(frozen=True)
class Tile:
    """A kernel's tile shape and launch parameters; tma: load q/k/v/dO tiles through TMA
    descriptors on GPUs that have them (Hopper and newer)."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    tma: bool = False


@dataclass(frozen=True)
class KernelConfig:
    """Tiles of the three kernels: forward, key-major backward (dK/dV), query-major backward (dQ).
    Every gradient is deterministic (no atomics)."""

    fwd: Tile
    dkdv: Tile
    dq: Tile


# Tuned on an H100 (tools/bench_attention.py --sweep); see docs/benchmarks.md and docs/kernel_notes.md
# (step 18: the dK/dV tile at head_dim 128). 16-bit inputs.
# TMA loads pay off in the forward and dQ kernels; the dK/dV kernel is faster without.
_GPU_CONFIGS = {
    64: KernelConfig(fwd=Tile(128, 64, 4, 3, tma=True), dkdv=Tile(64, 64, 4, 2), dq=Tile(64, 64, 4, 3, tma=True)),
    128: KernelConfig(fwd=Tile(128, 128, 8, 3, tma=True), dkdv=Tile(64, 64, 4, 2), dq=Tile(128, 64, 8, 3, tma=True)),
}
# float32 tiles take twice the shared memory: smaller tiles, two stages (fits 227 KB at d = 128).
_GPU_FP32_CONFIG = KernelConfig(fwd=Tile(64, 64, 4, 2), dkdv=Tile(32, 64, 4, 2), dq=Tile(64, 32, 4, 2))
# Small tiles for the Triton interpreter (CPU tests): several blocks at tiny lengths.
_INTERPRET_CONFIG = KernelConfig(fwd=Tile(16, 16, 1, 1), dkdv=Tile(16, 32, 1, 1), dq=Tile(32, 16, 1, 1))
_override: Optional[KernelConfig] = None


def set_kernel_config(config: Optional[KernelConfig]) -> None:
    """Force the tiles of every kernel (None: back to the per-head_dim defaults)."""
    global _override
    _override = config


def kernel_config(head_dim: int, device: torch.device, dtype: torch.dtype = torch.bfloat16) -> KernelConfig:
    """Tiles used for this head_dim and input dtype on this device."""
    if _override is not None:
        return _override
    if device.type != "cuda":
        return _INTERPRET_CONFIG
    if dtype == torch.float32:
        return _GPU_FP32_CONFIG
    return _GPU_CONFIGS[64 if head_dim <= 64 else 128]


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# TMA (tensor-memory-accelerator) loads of the q/k/v/dO tiles: where the kernel's Tile asks
# for them, on Hopper and newer GPUs; MEGATRON_FOX_TMA=0 turns them off everywhere, =1 forces
# them for every kernel (also under the interpreter).
_TMA_ENV = os.environ.get("MEGATRON_FOX_TMA", "")
_tma_override: Optional[bool] = None if _TMA_ENV == "" else _TMA_ENV == "1"


def set_tma(enabled: Optional[bool]) -> None:
    """Force TMA tile loads on (True) or off (False) in every kernel; None: as the tiles say."""
    global _tma_override
    _tma_override = enabled


def _tma_possible(*tensors) -> bool:
    """A 4-d descriptor needs a 16-byte aligned base and 16-byte multiples as strides."""
    for t in tensors:
        size = t.element_size()
        if t.data_ptr() % 16 or any((st * size) % 16 for st in t.stride()[:-1]) or t.stride(-1) != 1:
            return False
    return True


def _use_tma(tile: Tile, *tensors) -> bool:
    if _tma_override is not None:
        return _tma_override and _tma_possible(*tensors)
    if not tile.tma or _interpreting() or not tensors[0].is_cuda:
        return False
    return torch.cuda.get_device_capability(tensors[0].device)[0] >= 9 and _tma_possible(*tensors)


def _tiles(tma: bool, *pairs):
    """(tensor, rows per tile) -> the kernel argument: a [1, rows, 1, D] descriptor or the tensor."""
    if not tma:
        return [t for t, _ in pairs]
    from triton.tools.tensor_descriptor import TensorDescriptor

    return [TensorDescriptor(t, list(t.shape), list(t.stride()), [1, rows, 1, t.shape[-1]]) for t, rows in pairs]


def _prefix_source(tma: bool, c, block: int):
    """Prefix sums [B, H, T] (contiguous float32) as the kernels read them: with TMA a
    [B*H, T] descriptor with [1, block] blocks, else the tensor. TMA wants a 16-byte
    aligned base and row stride: where T is not a multiple of 4 (or the view is
    misaligned) the rows go to a padded copy (B*H*T floats, negligible next to attention)."""
    if not tma:
        return c
    from triton.tools.tensor_descriptor import TensorDescriptor

    rows = _prefix_rows(c)
    return TensorDescriptor(rows, list(rows.shape), [rows.stride(0), 1], [1, block])


def _prefix_rows(c):
    """[B, H, T] -> [B*H, T] view with a 16-byte aligned base and row stride (TMA's terms)."""
    rows = c.reshape(-1, c.shape[-1])
    T = rows.shape[1]
    if T % 4 or rows.data_ptr() % 16:
        padded = torch.zeros(rows.shape[0], -(-T // 4) * 4, dtype=rows.dtype, device=rows.device)
        padded[:, :T] = rows
        rows = padded[:, :T]
    return rows


def _strides(t):
    return t.stride(0), t.stride(1), t.stride(2)


def _last_dim_contiguous(t):
    return t if t.stride(-1) == 1 else t.contiguous()


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


def _backward_delta(plan: _Plan, lse2, block_m: int):
    """The threshold a backward kernel with query blocks of block_m rows prunes by, from the
    rows' log-sum-exp (lse2 [B, H, T], base 2) where it can: with backward_pruning="lse" the
    ACP rule of `boundary.lse_threshold`; for exact FoX only weights that are zero in float32
    (delta = -2U + ZERO_LOG_WEIGHT, the forward's rule at log_eps - log L = ZERO_LOG_WEIGHT);
    else the forward's delta [B, H] (None: nothing)."""
    if plan.delta is None and plan.bound is not None:
        return boundary.lse_threshold(ZERO_LOG_WEIGHT - 2.0 * plan.bound, plan.bound, lse2 * (1.0 / LOG2E), block_m)
    if plan.delta is None or plan.backward_pruning != "lse":
        return plan.delta
    return boundary.lse_threshold(plan.delta, plan.bound, lse2 * (1.0 / LOG2E), block_m)


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
        start = boundary.key_block_start(cq, ck, plan.delta, plan.doc_start, block_m, block_n)
        o, lse2 = launch_forward(q, k, v, cq_kern, _prefix_rows(ck_kern), start, plan.sm_scale * LOG2E)
        return o, lse2, start
    B, T, H, D = q.shape
    group = H // k.shape[2]
    tile = plan.config.fwd
    start = boundary.key_block_start(cq, ck, plan.delta, plan.doc_start, tile.block_m, tile.block_n)
    o = torch.empty((B, T, H, D), dtype=q.dtype, device=q.device)
    lse2 = torch.empty((B, H, T), dtype=torch.float32, device=q.device)
    nbm = triton.cdiv(T, tile.block_m)
    dummy = start  # never read when VARLEN is off
    tma = _use_tma(tile, q, k, v)
    fwd_kernel[(nbm, B * H)](
        *_tiles(tma, (q, tile.block_m), (k, tile.block_n), (v, tile.block_n)),
        cq_kern, _prefix_source(tma, ck_kern, tile.block_n), start,
        plan.doc_start if plan.doc_start is not None else dummy, o, lse2,
        *_strides(q), *_strides(k), *_strides(v), *_strides(o),
        T, H, nbm, plan.sm_scale * LOG2E,
        GROUP=group, HEAD_DIM=D, BLOCK_M=tile.block_m, BLOCK_N=tile.block_n,
        VARLEN=plan.doc_start is not None, DOT_PREC=_dot_precision(q), CAUSAL=causal, TMA=tma,
        num_warps=tile.num_warps, num_stages=tile.num_stages,
    )
    return o, lse2, start


def _dot_precision(q):
    if _interpreting():
        return "upcast"
    return "ieee" if q.dtype == torch.float32 else "tf32"


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
    dq = torch.empty((B, T, H, D), dtype=q.dtype, device=q.device)
    dk = torch.empty((B, T, Hkv, D), dtype=k.dtype, device=q.device)
    dv = torch.empty((B, T, Hkv, D), dtype=v.dtype, device=q.device)
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
        T, H, nbn, qk_scale, plan.sm_scale,
        GROUP=group, HEAD_DIM=D, BLOCK_M=t.block_m, BLOCK_N=t.block_n, VARLEN=varlen, DOT_PREC=prec,
        CAUSAL=causal, TMA=tma, num_warps=t.num_warps, num_stages=t.num_stages,
    )
    t = cfg.dq
    delta = _backward_delta(plan, lse2, t.block_m)
    if fwd_start is not None and delta is plan.delta and (t.block_m, t.block_n) == (cfg.fwd.block_m, cfg.fwd.block_n):
        start = fwd_start
    else:
        start = boundary.key_block_start(cq, ck, delta, plan.doc_start, t.block_m, t.block_n)
    nbm = triton.cdiv(T, t.block_m)
    tma = _use_tma(t, q, k, v, do)
    dq_kernel[(nbm, B * H)](
        *_tiles(tma, (q, t.block_m), (k, t.block_n), (v, t.block_n), (do, t.block_m)),
        cq_kern, _prefix_source(tma, ck_kern, t.block_n), row, dlt, start, plan.doc_start if varlen else start, dq, drow,
        *_strides(q), *_strides(k), *_strides(v), *_strides(do), *_strides(dq),
        T, H, nbm, qk_scale, plan.sm_scale,
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
    with c = cumsum(log_fgate), restarted at each document of cu_seqlens (batch 1, int32
    offsets [0, ..., T]). log_eps=None computes exact FoX; otherwise key blocks whose
    pairs all have c_i - c_j < -(2U + log T) + log_eps are skipped (U = logit_bound, a
    float or [H] tensor, else sm_scale * max||q|| * max||k|| per batch and head).
    Exact FoX still skips, in the backward, key blocks whose weights all round to zero in
    float32 (`ZERO_LOG_WEIGHT`; the same gradients to the bit; `set_zero_block_skipping`).
    backward_pruning="lse" lets the backward, which knows each row's log-sum-exp, skip also
    the pairs with c_i - c_j < lse_i - U - log T + log_eps (weight < eps / T each, the same
    guarantee; `boundary.lse_threshold`); "bound" (default) prunes it like the forward.

    Returns o [B, T, H, D] (dtype of q); then, if asked, the row log-sum-exp [B, H, T]
    float32 (return_lse, differentiable) and an AttentionStats (return_stats).
    Runs the Triton kernels on CUDA and under TRITON_INTERPRET=1; on other devices it
    falls back to the plain-PyTorch reference.
    """
    sm_scale, logit_bound = check_inputs(q, k, v, log_fgate, sm_scale, log_eps, logit_bound, cu_seqlens)
    if backward_pruning not in ("bound", "lse"):
        raise ValueError(f"backward_pruning must be 'bound' or 'lse', got {backward_pruning!r}")
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
        bwd_start = boundary.key_block_start(c, c, _backward_delta(plan, lse * LOG2E, t.block_m), plan.doc_start,
                                             t.block_m, t.block_n)
        skipped, total = boundary.skipped_pairs(bwd_start, t.block_m, t.block_n, T, plan.doc_start)
        return skipped.sum() / total.sum()

    lse_pruning = plan.bound is not None and (plan.delta is None or plan.backward_pruning == "lse")
    return AttentionStats(compute, tile.block_m, tile.block_n, backward if lse_pruning else None)


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
