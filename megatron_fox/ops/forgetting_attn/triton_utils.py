"""Small Triton helpers shared by the forward and backward kernels."""

import triton
import triton.language as tl


@triton.jit
def mm(a, b, DOT_PREC: tl.constexpr):
    """a @ b with float32 accumulation. DOT_PREC "ieee"/"tf32" go to tl.dot; "upcast"
    computes in float32 (the Triton 3.6 interpreter multiplies bf16 operands as raw bits)."""
    if DOT_PREC == "upcast":
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a, b, input_precision=DOT_PREC)


@triton.jit
def head_rows(X, b, h, s_b, s_h, TMA: tl.constexpr):
    """Where one (batch, head) of X [B, T, H, D] is read from: X itself when it is a TMA
    descriptor (TMA), else a pointer to row 0 of that head."""
    if TMA:
        src = X
    else:
        src = X + b.to(tl.int64) * s_b + h * s_h
    return src


@triton.jit
def head_prefix(C, bh, T, TMA: tl.constexpr):
    """Where the prefix sums of one (batch, head) of C [B*H, T] are read from, as (source,
    row): (C, bh) when C is a 2-d TMA descriptor with [1, BLOCK_N] blocks (TMA), else
    (pointer to the row, 0)."""
    if TMA:
        src = C
        off = bh
    else:
        src = C + bh.to(tl.int64) * T
        off = 0
    return src, off


@triton.jit
def load_rows(src, b, h, t0, s_t, T, BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr,
              TMA: tl.constexpr, MASKED: tl.constexpr):
    """Rows t0 .. t0 + BLOCK of one head, [BLOCK, D], zero past T. src from `head_rows`;
    the descriptor's block is [1, BLOCK, 1, D] and its bounds zero-fill. MASKED guards the
    sequence end on the pointer path (unmasked tiles are known to be inside it)."""
    if TMA:
        x = tl.reshape(src.load([b, t0, h, 0]), [BLOCK, HEAD_DIM])
    else:
        offs = t0 + tl.arange(0, BLOCK)
        ptrs = src + offs[:, None] * s_t + tl.arange(0, HEAD_DIM)[None, :]
        if MASKED:
            x = tl.load(ptrs, mask=(offs < T)[:, None], other=0.0)
        else:
            x = tl.load(ptrs)
    return x


@triton.jit
def load_key_block(k_src, v_src, c_src, c_off, b, hk, n0, s_kt, s_vt, T, c_ref,
                   BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, TMA: tl.constexpr, MASKED: tl.constexpr):
    """K, V tiles [BLOCK_N, D] of keys n0 .. n0 + BLOCK_N and their prefix sums in base 2
    minus c_ref [BLOCK_N] (c_src, c_off from `head_prefix`; TMA zero-fills past T)."""
    k = load_rows(k_src, b, hk, n0, s_kt, T, BLOCK_N, HEAD_DIM, TMA, MASKED)
    v = load_rows(v_src, b, hk, n0, s_vt, T, BLOCK_N, HEAD_DIM, TMA, MASKED)
    offs_n = n0 + tl.arange(0, BLOCK_N)
    if TMA:
        ck = tl.reshape(c_src.load([c_off, n0]), [BLOCK_N]) * 1.4426950408889634 - c_ref
    elif MASKED:
        ck = tl.load(c_src + offs_n, mask=offs_n < T, other=0.0) * 1.4426950408889634 - c_ref
    else:
        ck = tl.load(c_src + offs_n) * 1.4426950408889634 - c_ref
    return k, v, ck


@triton.jit
def visible(offs_m, offs_n, dstart, T, CAUSAL: tl.constexpr, VARLEN: tl.constexpr):
    """[BLOCK_M, BLOCK_N] bool: key visible to query (causal or inside the chunk, same document)."""
    if CAUSAL:
        ok = offs_n[None, :] <= offs_m[:, None]
    else:
        ok = (offs_n < T)[None, :] & (offs_m >= 0)[:, None]
    if VARLEN:
        ok = ok & (offs_n[None, :] >= dstart[:, None])
    return ok


@triton.jit
def key_ranges(START, DOCSTART, bh, NBM, pid_m, m0, offs_m, row_ok, T,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, VARLEN: tl.constexpr):
    """Split a query block's key blocks [START, n_hi) into [a, b) masked (document edge),
    [b, c) unmasked, [c, n_hi) masked (diagonal / sequence end). Also returns each row's
    document start (dstart)."""
    row_last = tl.minimum(m0 + BLOCK_M, T) - 1
    n_lo = tl.load(START + bh * NBM + pid_m)
    if CAUSAL:
        n_hi = (row_last + BLOCK_N) // BLOCK_N
        n_full = (m0 + 1) // BLOCK_N  # blocks below this hold only keys <= every row
    else:
        n_hi = (T + BLOCK_N - 1) // BLOCK_N
        n_full = T // BLOCK_N  # every full block; the partial last one is masked
    if VARLEN:
        dstart = tl.load(DOCSTART + offs_m, mask=row_ok, other=0)
        n_doc_full = (tl.load(DOCSTART + row_last) + BLOCK_N - 1) // BLOCK_N
    else:
        dstart = offs_m
        n_doc_full = 0
    b = tl.minimum(tl.maximum(n_doc_full, n_lo), n_hi)
    c = tl.minimum(tl.maximum(n_full, b), n_hi)
    return n_lo, b, c, n_hi, dstart
