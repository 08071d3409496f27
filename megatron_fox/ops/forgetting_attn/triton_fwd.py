"""Triton forward kernel of forgetting attention with block pruning.

One program per (query block, batch*head). Logits in base 2:
    s2_ij = log2(e) * (sm_scale q_i.k_j + c_i - c_j).
Softmax ignores a constant per row, so the loop runs on s2_ij - log2(e) (c_i - r) with r
the first row's c: one fused multiply-add per logit (sm_scale q.k - (c_j - r)); the row
term comes back only in the log-sum-exp. Keeping c_j - r small also keeps float32 exact
far into long sequences. The key loop starts at the block given
by `START` (document start and ACP boundary) and is split into ranges that need a mask
(document edge, diagonal) and one that needs none.
"""

import triton
import triton.language as tl

from .triton_utils import head_prefix, head_rows, key_ranges, load_key_block, load_rows, mm, visible

LOG2E = 1.4426950408889634


@triton.jit
def _fwd_block_range(acc, m_i, l_i, q, c_ref, offs_m, dstart, c_src, c_off, k_src, v_src, b, hk, s_kt, s_vt,
                     lo, hi, T, qk_scale,
                     BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, MASKED: tl.constexpr,
                     VARLEN: tl.constexpr, DOT_PREC: tl.constexpr, CAUSAL: tl.constexpr, TMA: tl.constexpr):
    for nb in range(lo, hi):
        offs_n = nb * BLOCK_N + tl.arange(0, BLOCK_N)
        k, v, ck = load_key_block(k_src, v_src, c_src, c_off, b, hk, nb * BLOCK_N, s_kt, s_vt, T, c_ref,
                                  BLOCK_N, HEAD_DIM, TMA, MASKED)
        s = mm(q, tl.trans(k), DOT_PREC) * qk_scale - ck[None, :]
        if MASKED:
            ok = visible(offs_m, offs_n, dstart, T, CAUSAL, VARLEN)
            s = tl.where(ok, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + mm(p.to(v.dtype), v, DOT_PREC)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def fwd_kernel(Q, K, V, CQ, CK, START, DOCSTART, O, LSE,
               s_qb, s_qt, s_qh, s_kb, s_kt, s_kh, s_vb, s_vt, s_vh, s_ob, s_ot, s_oh,
               T, H, NBM, qk_scale, s_docb,
               GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
               VARLEN: tl.constexpr, DOT_PREC: tl.constexpr, CAUSAL: tl.constexpr, TMA: tl.constexpr):
    """Q [B,T,H,D], K/V [B,T,H/GROUP,D] (strided; TMA: 4-d descriptors with blocks [1,
    BLOCK_M or BLOCK_N, 1, D]), CQ/CK [B*H, T] prefix sums of the query and key positions
    (natural log; the same tensor for self-attention; TMA: CK a [B*H, T] descriptor with
    [1, BLOCK_N] blocks), START [B*H, NBM] first key block,
    DOCSTART [T] (s_docb 0) or [B, T] (s_docb T) -> O like Q, LSE [B*H, T] (base 2).
    CAUSAL=False: every key of the block is visible (a past chunk of context parallelism)."""
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)  # longest rows first: shorter tail
    pid_bh = tl.program_id(1)
    b32 = pid_bh // H
    b = b32.to(tl.int64)
    DOCSTART += b * s_docb
    h = pid_bh % H
    hk = h // GROUP
    m0 = pid_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < T
    q = load_rows(head_rows(Q, b32, h, s_qb, s_qh, TMA), b32, h, m0, s_qt, T, BLOCK_M, HEAD_DIM, TMA, True)
    cq = tl.load(CQ + pid_bh.to(tl.int64) * T + offs_m, mask=row_ok, other=0.0) * 1.4426950408889634
    c_ref = tl.load(CQ + pid_bh.to(tl.int64) * T + m0) * 1.4426950408889634
    c_src, c_off = head_prefix(CK, pid_bh, T, TMA)
    k_src = head_rows(K, b32, hk, s_kb, s_kh, TMA)
    v_src = head_rows(V, b32, hk, s_vb, s_vh, TMA)

    a, b_, c_, n_hi, dstart = key_ranges(START, DOCSTART, pid_bh, NBM, pid_m, m0, offs_m, row_ok, T,
                                         BLOCK_M, BLOCK_N, CAUSAL, VARLEN)

    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    if VARLEN:
        acc, m_i, l_i = _fwd_block_range(acc, m_i, l_i, q, c_ref, offs_m, dstart, c_src, c_off, k_src, v_src,
                                         b32, hk, s_kt, s_vt, a, b_, T, qk_scale, BLOCK_N, HEAD_DIM, True,
                                         VARLEN, DOT_PREC, CAUSAL, TMA)
    acc, m_i, l_i = _fwd_block_range(acc, m_i, l_i, q, c_ref, offs_m, dstart, c_src, c_off, k_src, v_src,
                                     b32, hk, s_kt, s_vt, b_, c_, T, qk_scale, BLOCK_N, HEAD_DIM, False,
                                     VARLEN, DOT_PREC, CAUSAL, TMA)
    acc, m_i, l_i = _fwd_block_range(acc, m_i, l_i, q, c_ref, offs_m, dstart, c_src, c_off, k_src, v_src,
                                     b32, hk, s_kt, s_vt, c_, n_hi, T, qk_scale, BLOCK_N, HEAD_DIM, True,
                                     VARLEN, DOT_PREC, CAUSAL, TMA)
    # A past chunk (CAUSAL=False) can be pruned whole for a query block: o = 0, lse = -inf.
    seen = l_i > 0.0
    o = acc / tl.where(seen, l_i, 1.0)[:, None]
    tl.store(O + b * s_ob + h * s_oh + offs_m[:, None] * s_ot + offs_d[None, :], o.to(O.dtype.element_ty),
             mask=row_ok[:, None])
    lse = tl.where(seen, m_i + tl.log2(tl.where(seen, l_i, 1.0)) + (cq - c_ref), float("-inf"))
    tl.store(LSE + pid_bh.to(tl.int64) * T + offs_m, lse, mask=row_ok)
