"""Triton backward kernels of forgetting attention with block pruning.

With P = softmax(S), dP = dO V^T, D_i = rowsum(dO_i * O_i) - dLSE_i:
    dS = P * (dP - D),  dQ = sm_scale dS K,  dK = sm_scale dS^T Q,  dV = P^T dO,
    dc_i = sum_j dS_ij - sum_i' dS_i'i            (s_ij holds + c_i - c_j)
and d log f follows from dc by a reverse cumulative sum (done by the caller).
Two kernels, as in FlashAttention-2: key-major for dK, dV and the column sums of dS
(looping over the query heads of a key/value group), query-major for dQ and the row
sums. Both skip the blocks that the forward pruning rule skips. P is recomputed as exp2(x - (c_j - r) + (c_i - r -
lse_i)) with r a per-program reference prefix sum: one multiply-add and one add per
logit, on small numbers. The row term c_i - lse_i is formed once per row by the
preprocessing kernel, so the key-major loop loads two row vectors (it and D) per block.
"""

import triton
import triton.language as tl

from .triton_utils import head_prefix, head_rows, key_ranges, load_key_block, load_rows, mm, visible


@triton.jit
def bwd_preprocess_kernel(O, DO, DLSE, CQ, LSE, DLT, ROW, s_ob, s_ot, s_oh, s_db, s_dt, s_dh, T, H,
                          HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr, HAS_DLSE: tl.constexpr):
    """DLT[bh, t] = sum_d O*dO - dLSE and ROW[bh, t] = c_t log2(e) - LSE (base 2), both
    float32 [B*H, T]; CQ the prefix sums at the query positions (natural log)."""
    pid_t = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = pid_bh % H
    offs_t = pid_t * BLOCK + tl.arange(0, BLOCK)
    offs_d = tl.arange(0, HEAD_DIM)
    ok = offs_t < T
    o = tl.load(O + b * s_ob + h * s_oh + offs_t[:, None] * s_ot + offs_d[None, :], mask=ok[:, None], other=0.0)
    do = tl.load(DO + b * s_db + h * s_dh + offs_t[:, None] * s_dt + offs_d[None, :], mask=ok[:, None], other=0.0)
    dlt = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    if HAS_DLSE:
        dlt -= tl.load(DLSE + pid_bh.to(tl.int64) * T + offs_t, mask=ok, other=0.0)
    tl.store(DLT + pid_bh.to(tl.int64) * T + offs_t, dlt, mask=ok)
    base = pid_bh.to(tl.int64) * T + offs_t
    row = tl.load(CQ + base, mask=ok, other=0.0) * 1.4426950408889634 - tl.load(LSE + base, mask=ok, other=0.0)
    tl.store(ROW + base, row, mask=ok)


@triton.jit
def _dkdv_block_range(dk, dv, dcol, k, v, ck, c_ref, offs_n, q_src, do_src, b, h, row_base, dlt_base,
                      DOCSTART, s_qt, s_dt, lo, hi, T, qk_scale,
                      BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr, MASKED: tl.constexpr,
                      VARLEN: tl.constexpr, DOT_PREC: tl.constexpr, CAUSAL: tl.constexpr, TMA: tl.constexpr):
    for mb in range(lo, hi):
        offs_m = mb * BLOCK_M + tl.arange(0, BLOCK_M)
        q = load_rows(q_src, b, h, mb * BLOCK_M, s_qt, T, BLOCK_M, HEAD_DIM, TMA, MASKED)
        do = load_rows(do_src, b, h, mb * BLOCK_M, s_dt, T, BLOCK_M, HEAD_DIM, TMA, MASKED)
        if MASKED:
            row_ok = offs_m < T
            row = tl.load(row_base + offs_m, mask=row_ok, other=float("-inf")) - c_ref  # c_i - lse_i - r
            dlt = tl.load(dlt_base + offs_m, mask=row_ok, other=0.0)
        else:
            row = tl.load(row_base + offs_m) - c_ref
            dlt = tl.load(dlt_base + offs_m)
        p_t = tl.exp2(mm(k, tl.trans(q), DOT_PREC) * qk_scale - ck[:, None] + row[None, :])
        if MASKED and (CAUSAL or VARLEN):  # (else rows past T have row = -inf, so p = 0)
            if CAUSAL:
                ok = offs_m[None, :] >= offs_n[:, None]
            else:
                ok = (offs_m >= 0)[None, :] & (offs_n >= 0)[:, None]
            if VARLEN:
                dstart = tl.load(DOCSTART + offs_m, mask=row_ok, other=0)
                ok = ok & (offs_n[:, None] >= dstart[None, :])
            p_t = tl.where(ok, p_t, 0.0)
        dp_t = mm(v, tl.trans(do), DOT_PREC)
        # dV after dP^T: Triton waits for every MMA in flight after a fresh product, so dV
        # issued here runs on under the dS arithmetic instead of being waited for with dP^T.
        dv += mm(p_t.to(do.dtype), do, DOT_PREC)
        ds_t = p_t * (dp_t - dlt[None, :])
        dk += mm(ds_t.to(q.dtype), q, DOT_PREC)
        dcol += tl.sum(ds_t, 1)
    return dk, dv, dcol


@triton.jit
def dkdv_kernel(Q, K, V, DO, CK, ROW, DLT, END, DOCSTART, DOCEND, DK, DV, DCOL,
                s_qb, s_qt, s_qh, s_kb, s_kt, s_kh, s_vb, s_vt, s_vh, s_db, s_dt, s_dh,
                s_dkb, s_dkt, s_dkh,
                T, H, NBN, qk_scale, sm_scale, s_docb,
                GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                VARLEN: tl.constexpr, DOT_PREC: tl.constexpr, CAUSAL: tl.constexpr, TMA: tl.constexpr):
    """One program per (key block, batch*kv_head). DK, DV are [B, T, Hkv, D] with the
    same strides (s_dk*); DCOL [B*H, T] gets the column sums of dS per query head; ROW and
    DLT from `bwd_preprocess_kernel`; DOCSTART, DOCEND [T] (s_docb 0) or [B, T] (s_docb T).
    TMA: Q, K, V, DO are 4-d descriptors (see fwd_kernel)."""
    pid_n = tl.program_id(0)
    pid_bk = tl.program_id(1)
    HKV = H // GROUP
    b32 = pid_bk // HKV
    b = b32.to(tl.int64)
    DOCSTART += b * s_docb
    DOCEND += b * s_docb
    hk = pid_bk % HKV
    n0 = pid_n * BLOCK_N
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    key_ok = offs_n < T
    k = load_rows(head_rows(K, b32, hk, s_kb, s_kh, TMA), b32, hk, n0, s_kt, T, BLOCK_N, HEAD_DIM, TMA, True)
    v = load_rows(head_rows(V, b32, hk, s_vb, s_vh, TMA), b32, hk, n0, s_vt, T, BLOCK_N, HEAD_DIM, TMA, True)
    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)

    if CAUSAL:
        m_lo = n0 // BLOCK_M
        # first query block whose every row is >= every key of this block
        m_causal_full = (n0 + BLOCK_N - 1 + BLOCK_M - 1) // BLOCK_M
    else:
        m_lo = 0
        m_causal_full = 0
    if VARLEN:
        m_doc_full = tl.load(DOCEND + n0) // BLOCK_M  # blocks below hold rows of this key's document only
    else:
        m_doc_full = T // BLOCK_M
    for g in range(GROUP):
        h = hk * GROUP + g
        bh = b * H + h
        c_ref = tl.load(CK + bh * T + n0) * 1.4426950408889634
        ck = tl.load(CK + bh * T + offs_n, mask=key_ok, other=0.0) * 1.4426950408889634 - c_ref
        q_src = head_rows(Q, b32, h, s_qb, s_qh, TMA)
        do_src = head_rows(DO, b32, h, s_db, s_dh, TMA)
        m_hi = tl.load(END + bh * NBN + pid_n)
        a = m_lo
        b_ = tl.minimum(tl.maximum(m_causal_full, a), m_hi)
        c_ = tl.minimum(tl.maximum(m_doc_full, b_), m_hi)
        dcol = tl.zeros([BLOCK_N], dtype=tl.float32)
        dk, dv, dcol = _dkdv_block_range(dk, dv, dcol, k, v, ck, c_ref, offs_n, q_src, do_src, b32, h,
                                         ROW + bh * T, DLT + bh * T, DOCSTART, s_qt, s_dt, a, b_, T, qk_scale,
                                         BLOCK_M, HEAD_DIM, True, VARLEN, DOT_PREC, CAUSAL, TMA)
        dk, dv, dcol = _dkdv_block_range(dk, dv, dcol, k, v, ck, c_ref, offs_n, q_src, do_src, b32, h,
                                         ROW + bh * T, DLT + bh * T, DOCSTART, s_qt, s_dt, b_, c_, T, qk_scale,
                                         BLOCK_M, HEAD_DIM, False, VARLEN, DOT_PREC, CAUSAL, TMA)
        dk, dv, dcol = _dkdv_block_range(dk, dv, dcol, k, v, ck, c_ref, offs_n, q_src, do_src, b32, h,
                                         ROW + bh * T, DLT + bh * T, DOCSTART, s_qt, s_dt, c_, m_hi, T, qk_scale,
                                         BLOCK_M, HEAD_DIM, True, VARLEN, DOT_PREC, CAUSAL, TMA)
        tl.store(DCOL + bh * T + offs_n, dcol, mask=key_ok)
    out = b * s_dkb + hk * s_dkh + offs_n[:, None] * s_dkt + offs_d[None, :]
    tl.store(DK + out, (dk * sm_scale).to(DK.dtype.element_ty), mask=key_ok[:, None])
    tl.store(DV + out, dv.to(DV.dtype.element_ty), mask=key_ok[:, None])


@triton.jit
def _dq_block_range(dq, drow, q, do, c_ref, row, dlt, offs_m, dstart, c_src, c_off, k_src, v_src, b, hk, s_kt, s_vt,
                    lo, hi, T, qk_scale,
                    BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, MASKED: tl.constexpr,
                    VARLEN: tl.constexpr, DOT_PREC: tl.constexpr, CAUSAL: tl.constexpr, TMA: tl.constexpr):
    for nb in range(lo, hi):
        offs_n = nb * BLOCK_N + tl.arange(0, BLOCK_N)
        k, v, ck = load_key_block(k_src, v_src, c_src, c_off, b, hk, nb * BLOCK_N, s_kt, s_vt, T, c_ref,
                                  BLOCK_N, HEAD_DIM, TMA, MASKED)
        p = tl.exp2(mm(q, tl.trans(k), DOT_PREC) * qk_scale - ck[None, :] + row[:, None])
        if MASKED:
            ok = visible(offs_m, offs_n, dstart, T, CAUSAL, VARLEN)
            p = tl.where(ok, p, 0.0)
        dp = mm(do, tl.trans(v), DOT_PREC)
        ds = p * (dp - dlt[:, None])
        dq += mm(ds.to(k.dtype), k, DOT_PREC)
        drow += tl.sum(ds, 1)
    return dq, drow


@triton.jit
def dq_kernel(Q, K, V, DO, CQ, CK, ROW, DLT, START, DOCSTART, DQ, DROW,
              s_qb, s_qt, s_qh, s_kb, s_kt, s_kh, s_vb, s_vt, s_vh, s_db, s_dt, s_dh,
              s_dqb, s_dqt, s_dqh,
              T, H, NBM, qk_scale, sm_scale, s_docb,
              GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              VARLEN: tl.constexpr, DOT_PREC: tl.constexpr, CAUSAL: tl.constexpr, TMA: tl.constexpr):
    """One program per (query block, batch*head); DROW [B*H, T] gets the row sums of dS.
    TMA: Q, K, V, DO are 4-d descriptors and CK a 2-d one (see fwd_kernel)."""
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)  # longest rows first: shorter tail
    pid_bh = tl.program_id(1)
    b32 = pid_bh // H
    b = b32.to(tl.int64)
    DOCSTART += b * s_docb
    h = pid_bh % H
    hk = h // GROUP
    bh = pid_bh.to(tl.int64)
    m0 = pid_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < T
    q = load_rows(head_rows(Q, b32, h, s_qb, s_qh, TMA), b32, h, m0, s_qt, T, BLOCK_M, HEAD_DIM, TMA, True)
    do = load_rows(head_rows(DO, b32, h, s_db, s_dh, TMA), b32, h, m0, s_dt, T, BLOCK_M, HEAD_DIM, TMA, True)
    c_ref = tl.load(CQ + bh * T + m0) * 1.4426950408889634
    c_src, c_off = head_prefix(CK, pid_bh, T, TMA)
    row = tl.load(ROW + bh * T + offs_m, mask=row_ok, other=float("-inf")) - c_ref  # c_i - lse_i - r, base 2
    dlt = tl.load(DLT + bh * T + offs_m, mask=row_ok, other=0.0)
    k_src = head_rows(K, b32, hk, s_kb, s_kh, TMA)
    v_src = head_rows(V, b32, hk, s_vb, s_vh, TMA)

    a, b_, c_, n_hi, dstart = key_ranges(START, DOCSTART, bh, NBM, pid_m, m0, offs_m, row_ok, T,
                                         BLOCK_M, BLOCK_N, CAUSAL, VARLEN)
    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    drow = tl.zeros([BLOCK_M], dtype=tl.float32)
    if VARLEN:
        dq, drow = _dq_block_range(dq, drow, q, do, c_ref, row, dlt, offs_m, dstart, c_src, c_off, k_src, v_src,
                                   b32, hk, s_kt, s_vt, a, b_, T, qk_scale, BLOCK_N, HEAD_DIM, True, VARLEN,
                                   DOT_PREC, CAUSAL, TMA)
    dq, drow = _dq_block_range(dq, drow, q, do, c_ref, row, dlt, offs_m, dstart, c_src, c_off, k_src, v_src,
                               b32, hk, s_kt, s_vt, b_, c_, T, qk_scale, BLOCK_N, HEAD_DIM, False, VARLEN,
                               DOT_PREC, CAUSAL, TMA)
    dq, drow = _dq_block_range(dq, drow, q, do, c_ref, row, dlt, offs_m, dstart, c_src, c_off, k_src, v_src,
                               b32, hk, s_kt, s_vt, c_, n_hi, T, qk_scale, BLOCK_N, HEAD_DIM, True, VARLEN,
                               DOT_PREC, CAUSAL, TMA)
    tl.store(DQ + b * s_dqb + h * s_dqh + offs_m[:, None] * s_dqt + offs_d[None, :],
             (dq * sm_scale).to(DQ.dtype.element_ty), mask=row_ok[:, None])
    tl.store(DROW + bh * T + offs_m, drow, mask=row_ok)
