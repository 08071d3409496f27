"""Reductions of q and k behind the pruning plan, each one read of the tensors: the largest
row norm of each (batch, head), for the data bound U = sm_scale * max||q|| * max||k|| of ACP
(and of exact FoX's zero blocks); the diagonal logits sm_scale * q_i . k_i, a lower bound of
each row's log-sum-exp that the forward prunes by."""

import torch
import triton
import triton.language as tl

from .tiles import _last_dim_contiguous


@triton.jit
def _tile_rows(BLOCK_T: tl.constexpr):
    """The sequence rows of this program's tile (grid axis 0 walks the sequence)."""
    return tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)


@triton.jit
def _rows_f32(X, b, h, rows, T, s_b, s_t, s_h, HEAD_DIM: tl.constexpr):
    """X[b, rows, h, :] as a float32 [BLOCK_T, HEAD_DIM] tile, rows >= T read as zero."""
    cols = tl.arange(0, HEAD_DIM)
    ptrs = X + b.to(tl.int64) * s_b + h * s_h + rows[:, None].to(tl.int64) * s_t + cols[None, :]
    return tl.load(ptrs, mask=rows[:, None] < T, other=0.0).to(tl.float32)


@triton.jit
def max_sq_norm_kernel(X, OUT, T, H, s_b, s_t, s_h, HEAD_DIM: tl.constexpr, BLOCK_T: tl.constexpr):
    """OUT[b*H + h] = max over this program's rows t of sum_d X[b, t, h, d]^2 (atomic max:
    OUT starts at zero, squares are >= 0, and max is order-free, so the result is exact)."""
    bh = tl.program_id(1)
    x = _rows_f32(X, bh // H, bh % H, _tile_rows(BLOCK_T), T, s_b, s_t, s_h, HEAD_DIM)
    tl.atomic_max(OUT + bh, tl.max(tl.sum(x * x, 1), 0))


def max_row_norm(x: torch.Tensor) -> torch.Tensor:
    """x [B, T, H, D] (last dim contiguous, D a power of two) -> max_t ||x[b, t, h]||, float32 [B, H]."""
    B, T, H, D = x.shape
    x = _last_dim_contiguous(x)
    out = torch.zeros(B * H, dtype=torch.float32, device=x.device)
    block_t = 64
    max_sq_norm_kernel[(triton.cdiv(T, block_t), B * H)](x, out, T, H, x.stride(0), x.stride(1), x.stride(2),
                                                         HEAD_DIM=D, BLOCK_T=block_t)
    return out.view(B, H).sqrt()


@triton.jit
def diagonal_logit_kernel(Q, K, OUT, QSQ, KSQ, T, H, sm_scale, s_qb, s_qt, s_qh, s_kb, s_kt, s_kh,
                          GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_T: tl.constexpr, NORMS: tl.constexpr):
    """OUT[b, h, t] = sm_scale * sum_d Q[b, t, h, d] * K[b, t, h // GROUP, d] in float32; with
    NORMS also QSQ[b*H + h] and KSQ[b*Hkv + h // GROUP] = the largest squared row norms (atomic
    max from zero, as in max_sq_norm_kernel), from the same read."""
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    rows = _tile_rows(BLOCK_T)
    q = _rows_f32(Q, b, h, rows, T, s_qb, s_qt, s_qh, HEAD_DIM)
    k = _rows_f32(K, b, h // GROUP, rows, T, s_kb, s_kt, s_kh, HEAD_DIM)
    tl.store(OUT + bh.to(tl.int64) * T + rows, tl.sum(q * k, 1) * sm_scale, mask=rows < T)
    if NORMS:
        tl.atomic_max(QSQ + bh, tl.max(tl.sum(q * q, 1), 0))
        tl.atomic_max(KSQ + b * (H // GROUP) + h // GROUP, tl.max(tl.sum(k * k, 1), 0))


def diagonal_logits(q: torch.Tensor, k: torch.Tensor, sm_scale: float, norms: bool = False):
    """q [B, T, H, D], k [B, T, Hkv, D] (last dims contiguous, D a power of two) ->
    sm_scale * q_i . k_i with k of the head's key/value group, float32 [B, H, T]; with norms
    also max_t ||q[b, t, h]|| [B, H] and max_t ||k[b, t, g]|| [B, Hkv] from the same read."""
    B, T, H, D = q.shape
    Hkv = k.shape[2]
    q, k = _last_dim_contiguous(q), _last_dim_contiguous(k)
    out = torch.empty((B, H, T), dtype=torch.float32, device=q.device)
    qsq = torch.zeros(B * H if norms else 1, dtype=torch.float32, device=q.device)
    ksq = torch.zeros(B * Hkv if norms else 1, dtype=torch.float32, device=q.device)
    block_t = 64
    diagonal_logit_kernel[(triton.cdiv(T, block_t), B * H)](
        q, k, out, qsq, ksq, T, H, sm_scale, q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1),
        k.stride(2), GROUP=H // Hkv, HEAD_DIM=D, BLOCK_T=block_t, NORMS=norms)
    if not norms:
        return out
    return out, qsq.view(B, H).sqrt(), ksq.view(B, Hkv).sqrt()
