"""Block pruning boundaries from the forget-gate prefix sums (vectorised, no loops).

c is non-increasing along the sequence, so for a query block starting at row m0 and a
key block ending at column ne, max over the block of (c_i - c_j) is c[m0] - c[ne]. The
block is pruned when that is below delta. For fixed m0 the pruned key blocks form a
prefix, for fixed ne the live query blocks form a prefix: one torch.searchsorted per
call finds both boundaries for every (batch, head) at once.

delta may also differ per query block ([B, H, nbm], the backward's threshold from the
row log-sum-exp, `lse_threshold`). Then reach_m = c[m0] - delta_m is replaced by its
running max from the right, which is non-increasing again: both searches stay one
searchsorted and give the same set of live blocks, a superset of the exact one.

On CUDA each boundary is one Triton launch (boundary_triton.py, the same comparisons);
MEGATRON_FOX_FUSED_BOUNDARY=0 keeps the torch ops (A/B runs).
"""

from __future__ import annotations

import functools
import os
from typing import Optional

import torch
import torch.nn.functional as F

from .boundary_triton import block_boundaries

_fused_on = os.environ.get("MEGATRON_FOX_FUSED_BOUNDARY", "1") != "0"


def _fused(c: torch.Tensor) -> bool:
    return _fused_on and c.is_cuda


def _cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


@functools.lru_cache(maxsize=64)
def _corners(T: int, block_m: int, block_n: int, device: torch.device):
    """First row of each query block and last column of each key block (int64 index
    tensors, cached: every layer of a step asks for the same ones)."""
    q0 = torch.arange(_cdiv(T, block_m), device=device) * block_m
    key_end = torch.clamp((torch.arange(_cdiv(T, block_n), device=device) + 1) * block_n, max=T) - 1
    return q0, key_end


def _reach(c_q: torch.Tensor, delta: torch.Tensor, q0: torch.Tensor) -> torch.Tensor:
    """c[m0] - delta per query block, non-increasing along the blocks, [B, H, nbm]: a key
    block ending at ne is live for query block m  <=>  c[ne] <= reach_m."""
    if delta.dim() == 2:
        return c_q[..., q0] - delta[..., None]  # c non-increasing: already ordered
    reach = c_q[..., q0] - delta
    return reach.flip(-1).cummax(-1).values.flip(-1)


def key_block_start(c_q: torch.Tensor, c_k: torch.Tensor, delta: Optional[torch.Tensor],
                    doc_start: Optional[torch.Tensor], block_m: int, block_n: int) -> torch.Tensor:
    """First key block each query block computes, int32 [B, H, cdiv(T, block_m)].

    c_q, c_k [B, H, T] float32 prefix sums at the query and key positions (one tensor for
    self-attention), non-increasing along T; delta [B, H] or [B, H, cdiv(T, block_m)] (None:
    no pruning); doc_start int32 [T] or [B, T] (each batch row its own documents).
    """
    if _fused(c_q):
        return block_boundaries(c_q, c_k, delta, doc_start, block_m, block_n, end=False)
    B, H, T = c_q.shape
    nbm = _cdiv(T, block_m)
    q0, key_end = _corners(T, block_m, block_n, c_q.device)
    if doc_start is None:
        start = torch.zeros(nbm, dtype=torch.int64, device=c_q.device)
    else:
        start = doc_start.long()[..., q0] // block_n
    start = start.view(-1, 1, nbm).expand(B, H, nbm)  # one row for all, or per batch row
    if delta is None:
        return start.to(torch.int32).contiguous()
    neg_c_key_end = -c_k[..., key_end].contiguous()  # non-decreasing along blocks
    # block pruned  <=>  c[q0] - c[ne] < delta  <=>  -c[ne] < -reach
    pruned = torch.searchsorted(neg_c_key_end, (-_reach(c_q, delta, q0)).contiguous(), right=False)
    if doc_start is None:
        return pruned.to(torch.int32)
    return torch.maximum(start, pruned).to(torch.int32).contiguous()


def query_block_end(c_q: torch.Tensor, c_k: torch.Tensor, delta: Optional[torch.Tensor],
                    doc_end: Optional[torch.Tensor], block_m: int, block_n: int) -> torch.Tensor:
    """One past the last query block that sees each key block, int32 [B, H, cdiv(T, block_n)].

    The key-major backward loop for key block n runs over query blocks
    [n*block_n // block_m, end[n]) (causal) or [0, end[n]) (a past chunk). delta as in
    `key_block_start` (per query block of block_m rows where 3-d).
    """
    if _fused(c_q):
        return block_boundaries(c_q, c_k, delta, doc_end, block_m, block_n, end=True)
    B, H, T = c_q.shape
    nbm, nbn = _cdiv(T, block_m), _cdiv(T, block_n)
    q0, key_end = _corners(T, block_m, block_n, c_q.device)
    if doc_end is None:
        end = torch.full((nbn,), nbm, dtype=torch.int64, device=c_q.device)
    else:
        end = (doc_end.long()[..., key_end] + block_m - 1) // block_m
    end = end.view(-1, 1, nbn).expand(B, H, nbn)
    if delta is None:
        return end.to(torch.int32).contiguous()
    # block live  <=>  c[ne] <= reach_m  <=>  -reach_m <= -c[ne]; -reach is non-decreasing
    neg_reach = (-_reach(c_q, delta, q0)).contiguous()
    live = torch.searchsorted(neg_reach, (-c_k[..., key_end]).contiguous(), right=True)
    return torch.minimum(end, live).to(torch.int32).contiguous()


def lse_threshold(delta: torch.Tensor, bound: torch.Tensor, lse: torch.Tensor, block_m: int) -> torch.Tensor:
    """The backward's pruning threshold per query block, [B, H, cdiv(T, block_m)].

    Once the forward has run, the row's softmax normaliser lse_i is known, and a pair's
    weight is p_ij = exp(s_ij + c_i - c_j - lse_i) <= exp(U + c_i - c_j - lse_i). Pairs with
    c_i - c_j < lse_i - U - log L + log_eps = delta + U + lse_i (delta = -(2U + log L) +
    log_eps) weigh < eps / L each, < eps together per row. lse_i >= s_ii >= -U (the diagonal
    is always computed), so this is never below delta and usually well above it.

    delta, bound (U) [B, H]; lse [B, H, T] float32, natural log, of the forward's rows.
    """
    B, H, T = lse.shape
    nbm = _cdiv(T, block_m)
    rows = F.pad(lse, (0, nbm * block_m - T), value=float("inf")) if nbm * block_m != T else lse
    lse_min = rows.view(B, H, nbm, block_m).amin(-1)
    return torch.maximum(lse_min + (delta + bound)[..., None], delta[..., None])


def skipped_pairs(start: torch.Tensor, block_m: int, block_n: int, T: int,
                  doc_start: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal pairs skipped and total, float64 [B, H] each, from key_block_start's output."""
    rows = torch.arange(T, device=start.device)
    first_key = (start.long() * block_n).repeat_interleave(block_m, dim=-1)[..., :T]  # [B, H, T]
    ds = torch.zeros_like(rows) if doc_start is None else doc_start.long()
    if ds.dim() == 2:  # [B, T]: per batch row
        ds = ds[:, None, :]
    skipped = (torch.minimum(first_key, rows + 1) - ds).clamp_min(0)
    total = (rows + 1 - ds).to(torch.float64).sum(-1)
    return skipped.to(torch.float64).sum(-1), total.expand(skipped.shape[:2])
