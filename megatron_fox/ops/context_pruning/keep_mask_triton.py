"""Triton kernels of context pruning's keep mask I [B, T, T] (query n, key j), from the
interaction scores z_nj = q_int_n . k_int_j / sqrt(r) + beta, the keep probabilities
p_nj = sigmoid_alpha(z_nj) (float32 registers) and the running product down each key's
column, I_nj = prod_{j < n' <= n} p_n'j (ones on and above the diagonal).

The product runs down whole columns, so one program per column would leave the GPU idle
(B * T / 64 programs). Two passes over (query block, key block) tiles instead: the first
writes p into I and each tile's column products; the second multiplies each tile's running
product within the tile by the products of the tiles above it (a few vectors) in place.

Backward, two tile passes likewise: with g = dL/dI,
    dL/dp_mj = I_{m-1,j} sum_{n >= m} g_nj prod_{m < n' <= n} p_n'j = W_mj / p_mj,
    W_mj = sum_{n >= m} g_nj I_nj       (a reverse cumulative sum down the column),
valid wherever p_mj > 0; where p_mj = 0 the sparse sigmoid is clipped and its slope, hence
dz_mj, is 0 anyway. The first pass sums g I over each tile's columns; the second adds the
sums of the tiles below to the tile's reverse cumulative sum, recomputes p and its slope,
and adds dq_int = dz k_int / sqrt(r) and dk_int = dz^T q_int / sqrt(r) with atomics
(dz = dL/dp * slope); dbeta = sum dz per tile.
"""

import triton
import triton.language as tl

from .sparse_sigmoid_triton import sparse_sigmoid_root, sparse_sigmoid_slope

SIGMOID, SPARSE, STEP = 0, 1, 2  # MODE: alpha 1, 1 < alpha < inf, alpha inf (no gradient)


@triton.jit
def _rows(X, b, offs, T, R: tl.constexpr):
    """Rows `offs` of X [B, T, R] at batch b in float32 (zeros past T)."""
    r = tl.arange(0, R)
    ptr = X + b.to(tl.int64) * T * R + offs[:, None] * R + r[None, :]
    return tl.load(ptr, mask=offs[:, None] < T, other=0.0).to(tl.float32)


@triton.jit
def pair_offsets(b, offs_m, offs_n, T):
    """Offsets [BM, BN] of the pairs (offs_m, offs_n) of batch b in a [B, T, T] tensor, in
    int64 (offs_m * T passes 2^31 from T = 46341 on)."""
    return b.to(tl.int64) * T * T + offs_m[:, None].to(tl.int64) * T + offs_n[None, :]


@triton.jit
def _block_row(b, m, T, BM: tl.constexpr):
    """Offset of row (b, query block m) of BLK [B, cdiv(T, BM), T], in int64."""
    return (b * tl.cdiv(T, BM) + m).to(tl.int64) * T


@triton.jit
def _probabilities(qi, ki, beta, inv_sqrt_r, a, offs_m, offs_n, MODE: tl.constexpr, STEPS: tl.constexpr,
                   NEWTON: tl.constexpr):
    """(p, slope) [BM, BN] of the pairs, p = 1 and slope = 0 where the key is not before the query."""
    z = tl.dot(qi, tl.trans(ki), input_precision="ieee") * inv_sqrt_r + beta
    if MODE == 0:
        p = tl.sigmoid(z)
        slope = p * (1.0 - p)
    elif MODE == 1:
        p = sparse_sigmoid_root(a * z, a, STEPS, NEWTON)
        slope = sparse_sigmoid_slope(p, a)
    else:
        p = tl.where(z > 0.0, 1.0, 0.0)
        slope = tl.zeros_like(p)
    later = offs_m[:, None] > offs_n[None, :]
    return tl.where(later, p, 1.0), tl.where(later, slope, 0.0)


@triton.jit
def _tile_ids(BM: tl.constexpr, BN: tl.constexpr, T):
    """(query block, key block, batch, on or below the diagonal) of this program; grid
    (query blocks * key blocks, B)."""
    pid, b = tl.program_id(0), tl.program_id(1)
    n_kb = tl.cdiv(T, BN)
    pid_m, pid_n = pid // n_kb, pid % n_kb
    return pid_m, pid_n, b, pid_m * BM + BM > pid_n * BN


@triton.jit
def keep_probs_kernel(QI, KI, BETA, KEEP, BLK, T, inv_sqrt_r, a, R: tl.constexpr, BM: tl.constexpr,
                      BN: tl.constexpr, MODE: tl.constexpr, STEPS: tl.constexpr, NEWTON: tl.constexpr):
    """Pass 1: p of one tile into KEEP [B, T, T] (ones above the diagonal) and the tile's
    column products into BLK [B, query blocks, T]."""
    pid_m, pid_n, b, lower = _tile_ids(BM, BN, T)
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_n = pid_n * BN + tl.arange(0, BN)
    ptr = KEEP + pair_offsets(b, offs_m, offs_n, T)
    ok = (offs_m[:, None] < T) & (offs_n[None, :] < T)
    if lower:
        p, _ = _probabilities(_rows(QI, b, offs_m, T, R), _rows(KI, b, offs_n, T, R), tl.load(BETA), inv_sqrt_r, a,
                              offs_m, offs_n, MODE, STEPS, NEWTON)
        p = tl.where(offs_m[:, None] < T, p, 1.0)
        tl.store(ptr, p, mask=ok)
        # a column's running product only falls (p <= 1), so its smallest entry is the last
        tl.store(BLK + _block_row(b, pid_m, T, BM) + offs_n, tl.min(tl.cumprod(p, axis=0), 0),
                 mask=offs_n < T)
    else:
        tl.store(ptr, tl.full([BM, BN], 1.0, tl.float32), mask=ok)


@triton.jit
def keep_scan_kernel(KEEP, BLK, T, BM: tl.constexpr, BN: tl.constexpr):
    """Pass 2: I of one tile in place, the running product of its p times the column
    products of the tiles above it (from the diagonal's tile on)."""
    pid_m, pid_n, b, lower = _tile_ids(BM, BN, T)
    if lower:
        offs_m = pid_m * BM + tl.arange(0, BM)
        offs_n = pid_n * BN + tl.arange(0, BN)
        carry = tl.full([BN], 1.0, tl.float32)
        for m in range((pid_n * BN) // BM, pid_m):
            carry *= tl.load(BLK + _block_row(b, m, T, BM) + offs_n, mask=offs_n < T, other=1.0)
        ptr = KEEP + pair_offsets(b, offs_m, offs_n, T)
        ok = (offs_m[:, None] < T) & (offs_n[None, :] < T)
        p = tl.load(ptr, mask=ok, other=1.0)
        tl.store(ptr, tl.cumprod(p, axis=0) * carry[None, :], mask=ok)


@triton.jit
def keep_bwd_sums_kernel(KEEP, G, BLK, T, BM: tl.constexpr, BN: tl.constexpr):
    """Backward pass 1: the column sums of g I of one tile into BLK [B, query blocks, T]."""
    pid_m, pid_n, b, lower = _tile_ids(BM, BN, T)
    if lower:
        offs_m = pid_m * BM + tl.arange(0, BM)
        offs_n = pid_n * BN + tl.arange(0, BN)
        off = pair_offsets(b, offs_m, offs_n, T)
        ok = (offs_m[:, None] < T) & (offs_n[None, :] < T)
        gk = tl.load(G + off, mask=ok, other=0.0) * tl.load(KEEP + off, mask=ok, other=0.0)
        tl.store(BLK + _block_row(b, pid_m, T, BM) + offs_n, tl.sum(gk, 0), mask=offs_n < T)


@triton.jit
def keep_bwd_kernel(QI, KI, BETA, KEEP, G, BLK, DQI, DKI, DBETA, T, inv_sqrt_r, a, R: tl.constexpr,
                    BM: tl.constexpr, BN: tl.constexpr, MODE: tl.constexpr, STEPS: tl.constexpr,
                    NEWTON: tl.constexpr):
    """Backward pass 2 of one tile: its shares of dq_int and dk_int (added into DQI, DKI
    [B, T, R] float32) and of dbeta (DBETA [B, tiles], zero where the tile is above)."""
    pid_m, pid_n, b, lower = _tile_ids(BM, BN, T)
    dbeta = tl.zeros([BN], tl.float32)
    if lower:
        offs_m = pid_m * BM + tl.arange(0, BM)
        offs_n = pid_n * BN + tl.arange(0, BN)
        below = tl.zeros([BN], tl.float32)
        for m in range(pid_m + 1, tl.cdiv(T, BM)):
            below += tl.load(BLK + _block_row(b, m, T, BM) + offs_n, mask=offs_n < T, other=0.0)
        off = pair_offsets(b, offs_m, offs_n, T)
        ok = (offs_m[:, None] < T) & (offs_n[None, :] < T)
        gk = tl.load(G + off, mask=ok, other=0.0) * tl.load(KEEP + off, mask=ok, other=0.0)
        w = tl.cumsum(gk, axis=0, reverse=True) + below[None, :]
        qi, ki = _rows(QI, b, offs_m, T, R), _rows(KI, b, offs_n, T, R)
        p, slope = _probabilities(qi, ki, tl.load(BETA), inv_sqrt_r, a, offs_m, offs_n, MODE, STEPS, NEWTON)
        dz = tl.where(p > 0.0, w / tl.where(p > 0.0, p, 1.0), 0.0) * slope
        dbeta += tl.sum(dz, 0)
        dz = dz * inv_sqrt_r
        r = tl.arange(0, R)
        rows = b.to(tl.int64) * T * R + r[None, :]
        tl.atomic_add(DKI + rows + offs_n[:, None] * R, tl.dot(tl.trans(dz), qi, input_precision="ieee"),
                      mask=offs_n[:, None] < T)
        tl.atomic_add(DQI + rows + offs_m[:, None] * R, tl.dot(dz, ki, input_precision="ieee"),
                      mask=offs_m[:, None] < T)
    tl.store(DBETA + b * tl.num_programs(0) + tl.program_id(0), tl.sum(dbeta, 0))
