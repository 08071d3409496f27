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
def load_key_block(k_base, v_base, c_base, offs_n, s_kt, s_vt, T,
                   HEAD_DIM: tl.constexpr, MASKED: tl.constexpr):
    """K, V tiles [BLOCK_N, D] and the keys' prefix sums in base 2 [BLOCK_N]; MASKED guards
    the sequence end (unmasked tiles are known to be inside it)."""
    offs_d = tl.arange(0, HEAD_DIM)
    if MASKED:
        in_seq = offs_n < T
        k = tl.load(k_base + offs_n[:, None] * s_kt + offs_d[None, :], mask=in_seq[:, None], other=0.0)
        v = tl.load(v_base + offs_n[:, None] * s_vt + offs_d[None, :], mask=in_seq[:, None], other=0.0)
        ck = tl.load(c_base + offs_n, mask=in_seq, other=0.0) * 1.4426950408889634
    else:
        k = tl.load(k_base + offs_n[:, None] * s_kt + offs_d[None, :])
        v = tl.load(v_base + offs_n[:, None] * s_vt + offs_d[None, :])
        ck = tl.load(c_base + offs_n) * 1.4426950408889634
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
