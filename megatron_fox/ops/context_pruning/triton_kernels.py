"""Triton kernels of forgetting attention with learned context pruning's keep mask.

Weights w_ij = I_ij exp(s_ij), s_ij = sm_scale q_i.k_j + c_i - c_j, over the causal pairs of
one document, normalised per row (FlashAttention-2 structure: an online softmax in the
forward, dK/dV and dQ in two backward kernels). I [B, T, T] float32 is shared by the heads;
its gradient, dL/dI_ij = sum_h exp(s_ij - lse_i) (dP_ij - D_i) (finite also where I_ij = 0,
as in the materialised reference), comes from a third backward kernel, one program per
(query block, key block) looping over the heads, so each tile is written once (adding the
heads' shares with atomics from the dQ kernel cost four times that kernel's own time).
Natural exp throughout; c head-major [B, H, T] float32.

ACP's block skipping applies unchanged (BOUNDED): I <= 1 and the diagonal is always kept, so
a pair ACP prunes weighs no more under the mask than without it. BOUND holds, per (batch,
head), the first live key block of each query block (forward, dQ, dL/dI) or one past the
last query block that sees each key block (dK/dV), in the kernel's own tile sizes
(`forgetting_attn.boundary`); packed documents' starts and ends are in it too.
"""

import triton
import triton.language as tl

from ..forgetting_attn.triton_utils import mm
from .keep_mask_triton import pair_offsets

_EXP_CAP = tl.constexpr(80.0)  # exp(s - lse) of a dropped pair (I = 0), a gradient factor only: kept finite


@triton.jit
def _tile(X, b, h, s_b, s_t, s_h, offs, T, D: tl.constexpr):
    """Rows `offs` of head h of X [B, T, heads, D] (zeros past T)."""
    d = tl.arange(0, D)
    ptr = X + b.to(tl.int64) * s_b + h * s_h + offs[:, None] * s_t + d[None, :]
    return tl.load(ptr, mask=offs[:, None] < T, other=0.0)


@triton.jit
def _row(X, bh, offs, T):
    """Entries `offs` of row bh of a per-(batch, head) vector X [B * H, T] (zeros past T)."""
    return tl.load(X + bh.to(tl.int64) * T + offs, mask=offs < T, other=0.0)


@triton.jit
def _key_block(K, V, C, b, bh, g, s_kb, s_kt, s_kh, offs_n, T, D: tl.constexpr):
    """k, v of key/value head g and the keys' c at positions offs_n."""
    k = _tile(K, b, g, s_kb, s_kt, s_kh, offs_n, T, D)
    v = _tile(V, b, g, s_kb, s_kt, s_kh, offs_n, T, D)
    return k, v, _row(C, bh, offs_n, T)


@triton.jit
def _pairs(offs_m, offs_n, T, DOC, b, HAS_DOC: tl.constexpr):
    """Causal, in-range, same-document pairs [BM, BN]."""
    ok = (offs_n[None, :] <= offs_m[:, None]) & (offs_m[:, None] < T) & (offs_n[None, :] < T)
    if HAS_DOC:
        doc_m = tl.load(DOC + b * T + offs_m, mask=offs_m < T, other=-1)
        doc_n = tl.load(DOC + b * T + offs_n, mask=offs_n < T, other=-2)
        ok = ok & (doc_m[:, None] == doc_n[None, :])
    return ok


@triton.jit
def _bound(BOUND, bh, blk, T, B_ROWS: tl.constexpr):
    """Entry blk of row bh of BOUND [B * H, cdiv(T, B_ROWS)] int32."""
    return tl.load(BOUND + bh.to(tl.int64) * tl.cdiv(T, B_ROWS) + blk)


@triton.jit
def _keep_tile(KEEP, b, offs_m, offs_n, T):
    ptr = KEEP + pair_offsets(b, offs_m, offs_n, T)
    return tl.load(ptr, mask=(offs_m[:, None] < T) & (offs_n[None, :] < T), other=0.0)


@triton.jit
def pruned_fwd_kernel(Q, K, V, C, KEEP, DOC, OUT, LSE, BOUND, s_qb, s_qt, s_qh, s_kb, s_kt, s_kh, T, H, GROUP,
                      sm_scale, D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, HAS_DOC: tl.constexpr,
                      DOT_PREC: tl.constexpr, BOUNDED: tl.constexpr):
    """One query block of one (batch, head): O and the rows' log-sum-exp LSE [B, H, T]."""
    pid_m, bh = tl.program_id(0), tl.program_id(1)
    b, h = bh // H, bh % H
    offs_m = pid_m * BM + tl.arange(0, BM)
    q = _tile(Q, b, h, s_qb, s_qt, s_qh, offs_m, T, D)
    c_m = _row(C, bh, offs_m, T)
    m_i = tl.full([BM], float("-inf"), tl.float32)
    l_i = tl.zeros([BM], tl.float32)
    acc = tl.zeros([BM, D], tl.float32)
    first = _bound(BOUND, bh, pid_m, T, BM) * BN if BOUNDED else 0
    for start_n in range(first, tl.minimum((pid_m + 1) * BM, T), BN):
        offs_n = start_n + tl.arange(0, BN)
        k, v, c_n = _key_block(K, V, C, b, bh, h // GROUP, s_kb, s_kt, s_kh, offs_n, T, D)
        keep = _keep_tile(KEEP, b, offs_m, offs_n, T)
        s = mm(q, tl.trans(k), DOT_PREC) * sm_scale + c_m[:, None] - c_n[None, :]
        ok = _pairs(offs_m, offs_n, T, DOC, b, HAS_DOC) & (keep > 0)
        m_new = tl.maximum(m_i, tl.max(tl.where(ok, s, float("-inf")), 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # no kept pair yet: nothing to scale
        p = keep * tl.exp(tl.where(ok, s - m_use[:, None], float("-inf")))  # no inf * 0 off the pairs
        scale = tl.exp(m_i - m_use)
        l_i = l_i * scale + tl.sum(p, 1)
        acc = acc * scale[:, None] + mm(p.to(v.dtype), v, DOT_PREC)
        m_i = m_new
    l_safe = tl.where(l_i > 0, l_i, 1.0)
    d = tl.arange(0, D)
    o_ptr = OUT + b.to(tl.int64) * s_qb + h * s_qh + offs_m[:, None] * s_qt + d[None, :]
    tl.store(o_ptr, (acc / l_safe[:, None]).to(OUT.dtype.element_ty), mask=offs_m[:, None] < T)
    tl.store(LSE + bh.to(tl.int64) * T + offs_m, tl.where(m_i == float("-inf"), 0.0, m_i) + tl.log(l_safe),
             mask=offs_m < T)


@triton.jit
def _probabilities(q, k, c_m, c_n, lse_m, keep, ok, sm_scale, DOT_PREC: tl.constexpr):
    """(e, p): e = exp(s - lse) on the pairs (capped), p = I e the attention weights."""
    s = mm(q, tl.trans(k), DOT_PREC) * sm_scale + c_m[:, None] - c_n[None, :]
    e = tl.where(ok, tl.exp(tl.minimum(s - lse_m[:, None], _EXP_CAP)), 0.0)
    return e, keep * e


@triton.jit
def pruned_bwd_dkdv_kernel(Q, K, V, C, KEEP, DOC, DO, LSE, DELTA, DK, DV, DCOL, BOUND, s_qb, s_qt, s_qh, s_kb, s_kt,
                           s_kh, T, H, GROUP, sm_scale, D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                           HAS_DOC: tl.constexpr, DOT_PREC: tl.constexpr, BOUNDED: tl.constexpr):
    """One key block of one (batch, query head): dK, dV of that query head ([B, T, H, D],
    summed over the group afterwards) and the column sums of dS (DCOL [B, H, T])."""
    pid_n, bh = tl.program_id(0), tl.program_id(1)
    b, h = bh // H, bh % H
    offs_n = pid_n * BN + tl.arange(0, BN)
    k, v, c_n = _key_block(K, V, C, b, bh, h // GROUP, s_kb, s_kt, s_kh, offs_n, T, D)
    dk = tl.zeros([BN, D], tl.float32)
    dv = tl.zeros([BN, D], tl.float32)
    dcol = tl.zeros([BN], tl.float32)
    last = tl.minimum(_bound(BOUND, bh, pid_n, T, BN) * BM, T) if BOUNDED else T
    for start_m in range((pid_n * BN) // BM * BM, last, BM):
        offs_m = start_m + tl.arange(0, BM)
        q = _tile(Q, b, h, s_qb, s_qt, s_qh, offs_m, T, D)
        do = _tile(DO, b, h, s_qb, s_qt, s_qh, offs_m, T, D)
        c_m = _row(C, bh, offs_m, T)
        lse_m = _row(LSE, bh, offs_m, T)
        delta_m = _row(DELTA, bh, offs_m, T)
        keep = _keep_tile(KEEP, b, offs_m, offs_n, T)
        e, p = _probabilities(q, k, c_m, c_n, lse_m, keep, _pairs(offs_m, offs_n, T, DOC, b, HAS_DOC), sm_scale,
                              DOT_PREC)
        dv += mm(tl.trans(p.to(do.dtype)), do, DOT_PREC)
        ds = p * (mm(do, tl.trans(v), DOT_PREC) - delta_m[:, None])
        dk += mm(tl.trans(ds.to(q.dtype)), q, DOT_PREC)
        dcol += tl.sum(ds, 0)
    d = tl.arange(0, D)
    off = b.to(tl.int64) * s_qb + h * s_qh + offs_n[:, None] * s_qt + d[None, :]
    tl.store(DK + off, (dk * sm_scale).to(DK.dtype.element_ty), mask=offs_n[:, None] < T)
    tl.store(DV + off, dv.to(DV.dtype.element_ty), mask=offs_n[:, None] < T)
    tl.store(DCOL + bh.to(tl.int64) * T + offs_n, dcol, mask=offs_n < T)


@triton.jit
def pruned_bwd_dq_kernel(Q, K, V, C, KEEP, DOC, DO, LSE, DELTA, DQ, DROW, BOUND, s_qb, s_qt, s_qh, s_kb, s_kt, s_kh,
                         T, H, GROUP, sm_scale, D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                         HAS_DOC: tl.constexpr, DOT_PREC: tl.constexpr, BOUNDED: tl.constexpr):
    """One query block of one (batch, head): dQ and the row sums of dS (DROW [B, H, T])."""
    pid_m, bh = tl.program_id(0), tl.program_id(1)
    b, h = bh // H, bh % H
    offs_m = pid_m * BM + tl.arange(0, BM)
    q = _tile(Q, b, h, s_qb, s_qt, s_qh, offs_m, T, D)
    do = _tile(DO, b, h, s_qb, s_qt, s_qh, offs_m, T, D)
    c_m = _row(C, bh, offs_m, T)
    lse_m = _row(LSE, bh, offs_m, T)
    delta_m = _row(DELTA, bh, offs_m, T)
    dq = tl.zeros([BM, D], tl.float32)
    drow = tl.zeros([BM], tl.float32)
    first = _bound(BOUND, bh, pid_m, T, BM) * BN if BOUNDED else 0
    for start_n in range(first, tl.minimum((pid_m + 1) * BM, T), BN):
        offs_n = start_n + tl.arange(0, BN)
        k, v, c_n = _key_block(K, V, C, b, bh, h // GROUP, s_kb, s_kt, s_kh, offs_n, T, D)
        keep = _keep_tile(KEEP, b, offs_m, offs_n, T)
        _, p = _probabilities(q, k, c_m, c_n, lse_m, keep, _pairs(offs_m, offs_n, T, DOC, b, HAS_DOC), sm_scale,
                              DOT_PREC)
        ds = p * (mm(do, tl.trans(v), DOT_PREC) - delta_m[:, None])
        dq += mm(ds.to(k.dtype), k, DOT_PREC)
        drow += tl.sum(ds, 1)
    d = tl.arange(0, D)
    off = b.to(tl.int64) * s_qb + h * s_qh + offs_m[:, None] * s_qt + d[None, :]
    tl.store(DQ + off, (dq * sm_scale).to(DQ.dtype.element_ty), mask=offs_m[:, None] < T)
    tl.store(DROW + bh.to(tl.int64) * T + offs_m, drow, mask=offs_m < T)


@triton.jit
def pruned_bwd_dkeep_kernel(Q, K, V, C, DOC, DO, LSE, DELTA, DKEEP, BOUND, s_qb, s_qt, s_qh, s_kb, s_kt, s_kh, T, H,
                            GROUP, sm_scale, D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                            HAS_DOC: tl.constexpr, DOT_PREC: tl.constexpr, BOUNDED: tl.constexpr):
    """dL/dI of one (query block, key block) tile of one batch, summed over the heads, into
    DKEEP [B, T, T] (zeros above the diagonal and where every head skips the tile: a
    skipped pair has no weight, so no gradient); grid (query blocks * key blocks, B)."""
    pid, b = tl.program_id(0), tl.program_id(1)
    n_kb = tl.cdiv(T, BN)
    pid_m, pid_n = pid // n_kb, pid % n_kb
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_n = pid_n * BN + tl.arange(0, BN)
    acc = tl.zeros([BM, BN], tl.float32)
    if pid_m * BM + BM > pid_n * BN:
        ok = _pairs(offs_m, offs_n, T, DOC, b, HAS_DOC)
        for h in range(H):
            bh = b * H + h
            if BOUNDED:
                live = pid_n >= _bound(BOUND, bh, pid_m, T, BM)
            else:
                live = True
            if live:
                q = _tile(Q, b, h, s_qb, s_qt, s_qh, offs_m, T, D)
                do = _tile(DO, b, h, s_qb, s_qt, s_qh, offs_m, T, D)
                k, v, c_n = _key_block(K, V, C, b, bh, h // GROUP, s_kb, s_kt, s_kh, offs_n, T, D)
                e, _ = _probabilities(q, k, _row(C, bh, offs_m, T), c_n, _row(LSE, bh, offs_m, T), 1.0, ok, sm_scale,
                                      DOT_PREC)
                acc += e * (mm(do, tl.trans(v), DOT_PREC) - _row(DELTA, bh, offs_m, T)[:, None])
    ptr = DKEEP + pair_offsets(b, offs_m, offs_n, T)
    tl.store(ptr, acc, mask=(offs_m[:, None] < T) & (offs_n[None, :] < T))
