"""The block boundaries of boundary.py in one Triton launch per call (instead of ~15 small
torch ops: corner gathers, negations, the running max, searchsorted, casts).

One program per (batch, head) holds every query block's reach_m = c[m0] - delta_m
(running max from the right where delta is per query block, as in `boundary._reach`) and
binary-searches each boundary over the block corners: the first key block with
c[ne] <= reach_m (`key_block_start`), or the number of query blocks with reach_m >= c[ne]
(`query_block_end`). The comparisons are the torch path's, in float32, so both give the same
integers.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .common import doc_batch_stride


@triton.jit
def _max_combine(a, b):
    return tl.maximum(a, b)


@triton.jit
def _key_end(n, T, BLOCK_N):
    """Last column of key block n."""
    return tl.minimum((n + 1) * BLOCK_N, T) - 1


@triton.jit
def block_boundary_kernel(CQ, CK, DELTA, DOC, REACH, OUT, T, H, nbm, nbn, iters,
                          s_cqb, s_cqh, s_ckb, s_ckh, s_db, s_dh, s_dm, s_docb,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, NB_P2: tl.constexpr,
                          DELTA_DIM: tl.constexpr, HAS_DOC: tl.constexpr, END: tl.constexpr):
    """OUT[b, h, :] (int32): per query block the first key block (END=False, nbm entries) or
    per key block one past the last live query block (END=True, nbn entries).

    DELTA_DIM 0: no pruning (documents only); 2: DELTA [B, H]; 3: DELTA [B, H, nbm].
    DOC: doc_start (END=False) or doc_end (END=True), int32 [T] (s_docb 0) or [B, T]. REACH: float32 scratch of
    NB_P2 per program, used only by END with DELTA_DIM 3. NB_P2 >= nbm and >= nbn.
    """
    bh = tl.program_id(0)
    b = bh // H
    h = bh % H
    idx = tl.arange(0, NB_P2)
    cq = CQ + b.to(tl.int64) * s_cqb + h * s_cqh
    ck = CK + b.to(tl.int64) * s_ckb + h * s_ckh
    n_out = nbn if END else nbm
    valid = idx < n_out
    DOC += b.to(tl.int64) * s_docb
    if END:
        result = tl.full([NB_P2], 0, tl.int32) + nbm
        if HAS_DOC:
            doc = tl.load(DOC + _key_end(idx, T, BLOCK_N), mask=valid, other=0)
            result = tl.minimum(result, (doc + BLOCK_M - 1) // BLOCK_M)
    else:
        result = tl.zeros([NB_P2], tl.int32)
        if HAS_DOC:
            doc = tl.load(DOC + idx * BLOCK_M, mask=valid, other=0)
            result = doc // BLOCK_N
    if DELTA_DIM != 0:
        if DELTA_DIM == 2:
            d = tl.load(DELTA + b * s_db + h * s_dh)
        else:
            d = tl.load(DELTA + b * s_db + h * s_dh + idx * s_dm, mask=idx < nbm, other=0.0)
        mvalid = idx < nbm
        reach = tl.load(cq + idx * BLOCK_M, mask=mvalid, other=0.0) - d
        if DELTA_DIM == 3:  # running max from the right keeps reach non-increasing (boundary._reach)
            reach = tl.associative_scan(tl.where(mvalid, reach, float("-inf")), 0, _max_combine, reverse=True)
        lo = tl.zeros([NB_P2], tl.int32)
        if END:
            if DELTA_DIM == 3:
                tl.store(REACH + bh * NB_P2 + idx, reach)
                tl.debug_barrier()
            c_end = tl.load(ck + _key_end(idx, T, BLOCK_N), mask=valid, other=0.0)
            hi = tl.zeros([NB_P2], tl.int32) + nbm
            for _ in range(iters):  # the live query blocks: reach_m >= c[ne], a prefix in m
                active = lo < hi
                mid = (lo + hi) // 2
                if DELTA_DIM == 3:
                    r = tl.load(REACH + bh * NB_P2 + mid, mask=valid & active, other=0.0, cache_modifier=".cg")
                else:
                    r = tl.load(cq + mid * BLOCK_M, mask=valid & active, other=0.0) - d
                live = r >= c_end
                lo = tl.where(active & live, mid + 1, lo)
                hi = tl.where(active & ~live, mid, hi)
            result = tl.minimum(result, lo)
        else:
            hi = tl.zeros([NB_P2], tl.int32) + nbn
            for _ in range(iters):  # the pruned key blocks: c[ne] > reach_m, a prefix in n
                active = lo < hi
                mid = (lo + hi) // 2
                c_mid = tl.load(ck + _key_end(mid, T, BLOCK_N), mask=valid & active, other=0.0)
                pruned = c_mid > reach
                lo = tl.where(active & pruned, mid + 1, lo)
                hi = tl.where(active & ~pruned, mid, hi)
            result = tl.maximum(result, lo)
    tl.store(OUT + bh * n_out + idx, result, mask=valid)


def block_boundaries(c_q: torch.Tensor, c_k: torch.Tensor, delta: Optional[torch.Tensor],
                     doc: Optional[torch.Tensor], block_m: int, block_n: int, end: bool) -> torch.Tensor:
    """`boundary.key_block_start` (end=False, doc = doc_start) or `boundary.query_block_end`
    (end=True, doc = doc_end) in one launch: int32 [B, H, cdiv(T, block_m or block_n)].
    c_q, c_k [B, H, T] float32 with unit stride along T; delta None, [B, H] or [B, H, nbm]."""
    B, H, T = c_q.shape
    nbm, nbn = triton.cdiv(T, block_m), triton.cdiv(T, block_n)
    nb_p2 = triton.next_power_of_2(max(nbm, nbn))
    out = torch.empty((B, H, nbn if end else nbm), dtype=torch.int32, device=c_q.device)
    ddim = 0 if delta is None else delta.dim()
    if ddim == 3 and delta.shape[-1] != nbm:
        raise ValueError(f"delta: expected {nbm} query blocks in the last dim, got {tuple(delta.shape)}")
    dsrc = delta.float() if delta is not None else c_q
    ds = (dsrc.stride(0), dsrc.stride(1), dsrc.stride(2) if ddim == 3 else 0) if delta is not None else (0, 0, 0)
    reach = torch.empty(B * H * nb_p2 if (end and ddim == 3) else 1, dtype=torch.float32, device=c_q.device)
    if c_q.stride(-1) != 1 or c_k.stride(-1) != 1:
        c_q, c_k = c_q.contiguous(), c_k.contiguous()
    search = (nbm if end else nbn).bit_length()  # halvings until the range is empty
    block_boundary_kernel[(B * H,)](
        c_q, c_k, dsrc, doc if doc is not None else out, reach, out, T, H, nbm, nbn, search,
        c_q.stride(0), c_q.stride(1), c_k.stride(0), c_k.stride(1), *ds,
        doc_batch_stride(doc, B),
        BLOCK_M=block_m, BLOCK_N=block_n, NB_P2=nb_p2, DELTA_DIM=ddim, HAS_DOC=doc is not None, END=end,
        num_warps=4 if nb_p2 <= 512 else 8,
    )
    return out
