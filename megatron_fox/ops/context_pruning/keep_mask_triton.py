"""Triton kernels of context pruning's keep mask I [B, T, T] (query n, key j), fused: the
interaction scores z_nj = q_int_n . k_int_j / sqrt(r) + beta, the keep probabilities
p_nj = sigmoid_alpha(z_nj) (float32 registers), and the running product down each key's
column, I_nj = prod_{j < n' <= n} p_n'j (ones on and above the diagonal), in one pass that
writes I once. One program per (key block, batch), walking the query blocks downwards and
carrying the product of the rows above.

Backward (one program per key block again, query blocks upwards): with g = dL/dI,
    dL/dp_mj = I_{m-1,j} sum_{n >= m} g_nj prod_{m < n' <= n} p_n'j = W_mj / p_mj,
    W_mj = sum_{n >= m} g_nj I_nj       (a reverse cumulative sum down the column),
valid wherever p_mj > 0; where p_mj = 0 the sparse sigmoid is clipped and its slope, hence
dz_mj, is 0 anyway. Then dz = dL/dp * slope, dq_int = dz k_int / sqrt(r) (atomics over the
key blocks), dk_int = dz^T q_int / sqrt(r), dbeta = sum dz.
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
def keep_fwd_kernel(QI, KI, BETA, KEEP, T, inv_sqrt_r, a, R: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                    MODE: tl.constexpr, STEPS: tl.constexpr, NEWTON: tl.constexpr):
    """Columns pid_n * BN.. of I at batch b; BM divides BN."""
    pid_n, b = tl.program_id(0), tl.program_id(1)
    offs_n = pid_n * BN + tl.arange(0, BN)
    ki = _rows(KI, b, offs_n, T, R)
    beta = tl.load(BETA)
    base = KEEP + b.to(tl.int64) * T * T
    first = pid_n * BN
    for start_m in range(0, first, BM):  # rows wholly above the diagonal
        offs_m = start_m + tl.arange(0, BM)
        tl.store(base + offs_m[:, None] * T + offs_n[None, :], tl.full([BM, BN], 1.0, tl.float32),
                 mask=offs_n[None, :] < T)
    carry = tl.full([BN], 1.0, tl.float32)
    for start_m in range(first, T, BM):
        offs_m = start_m + tl.arange(0, BM)
        p, _ = _probabilities(_rows(QI, b, offs_m, T, R), ki, beta, inv_sqrt_r, a, offs_m, offs_n, MODE, STEPS,
                              NEWTON)
        keep = tl.cumprod(p, axis=0) * carry[None, :]
        tl.store(base + offs_m[:, None] * T + offs_n[None, :], keep, mask=(offs_m[:, None] < T) & (offs_n[None, :] < T))
        carry = tl.min(keep, 0)  # the last row: a column's product only falls


@triton.jit
def keep_bwd_kernel(QI, KI, BETA, KEEP, G, DQI, DKI, DBETA, T, inv_sqrt_r, a, R: tl.constexpr, BM: tl.constexpr,
                    BN: tl.constexpr, MODE: tl.constexpr, STEPS: tl.constexpr, NEWTON: tl.constexpr):
    """dk_int of key block pid_n (DKI [B, T, R] float32), its share of dq_int (added into DQI
    [B, T, R] float32) and of dbeta (DBETA [B, key blocks])."""
    pid_n, b = tl.program_id(0), tl.program_id(1)
    offs_n = pid_n * BN + tl.arange(0, BN)
    ki = _rows(KI, b, offs_n, T, R)
    beta = tl.load(BETA)
    keep_base = KEEP + b.to(tl.int64) * T * T
    g_base = G + b.to(tl.int64) * T * T
    below = tl.zeros([BN], tl.float32)  # W of the row under the current block
    dki = tl.zeros([BN, R], tl.float32)
    dbeta = tl.zeros([BN], tl.float32)
    first = pid_n * BN
    n_blocks = tl.cdiv(T - first, BM)
    for i in range(n_blocks):
        start_m = first + (n_blocks - 1 - i) * BM
        offs_m = start_m + tl.arange(0, BM)
        ok = (offs_m[:, None] < T) & (offs_n[None, :] < T)
        off = offs_m[:, None] * T + offs_n[None, :]
        gk = tl.load(g_base + off, mask=ok, other=0.0) * tl.load(keep_base + off, mask=ok, other=0.0)
        w = tl.cumsum(gk, axis=0, reverse=True) + below[None, :]
        below += tl.sum(gk, 0)
        qi = _rows(QI, b, offs_m, T, R)
        p, slope = _probabilities(qi, ki, beta, inv_sqrt_r, a, offs_m, offs_n, MODE, STEPS, NEWTON)
        dz = tl.where(p > 0.0, w / tl.where(p > 0.0, p, 1.0), 0.0) * slope
        dbeta += tl.sum(dz, 0)
        dz = dz * inv_sqrt_r
        dki += tl.dot(tl.trans(dz), qi, input_precision="ieee")
        r = tl.arange(0, R)
        tl.atomic_add(DQI + b.to(tl.int64) * T * R + offs_m[:, None] * R + r[None, :], tl.dot(dz, ki, input_precision="ieee"),
                      mask=offs_m[:, None] < T)
    r = tl.arange(0, R)
    tl.store(DKI + b.to(tl.int64) * T * R + offs_n[:, None] * R + r[None, :], dki, mask=offs_n[:, None] < T)
    tl.store(DBETA + b * tl.num_programs(0) + pid_n, tl.sum(dbeta, 0))
