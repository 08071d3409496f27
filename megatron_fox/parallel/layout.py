"""Megatron-Core's load-balanced context-parallel layout and packed-document maps.

The sequence is cut into 2P chunks; rank r holds chunks r and 2P-1-r, concatenated.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ..ops.token_shift import document_start_mask


def chunk_ids(rank: int, size: int) -> tuple[int, int]:
    """Global chunk indices (front, back) held by `rank` in the load-balanced layout."""
    return rank, 2 * size - 1 - rank


def chunk_owner(chunk: int, size: int) -> tuple[int, int]:
    """(rank, 0 for its front half / 1 for its back half) holding global `chunk`."""
    return (chunk, 0) if chunk < size else (2 * size - 1 - chunk, 1)


def split_for_context_parallel(x: torch.Tensor, dim: int, rank: int, size: int) -> torch.Tensor:
    """This rank's part of a full-sequence tensor: chunks rank and 2*size-1-rank along dim."""
    chunks = x.chunk(2 * size, dim=dim)
    a, b = chunk_ids(rank, size)
    return torch.cat([chunks[a], chunks[b]], dim=dim)


def gather_from_context_parallel(parts: list, dim: int) -> torch.Tensor:
    """Inverse of split_for_context_parallel given every rank's part (rank order)."""
    size = len(parts)
    chunks = [None] * (2 * size)
    for r, p in enumerate(parts):
        a, b = chunk_ids(r, size)
        chunks[a], chunks[b] = p.chunk(2, dim=dim)
    return torch.cat(chunks, dim=dim)


def local_document_starts(cu_seqlens: torch.Tensor, seq_full: int, batch: int, group) -> torch.Tensor:
    """[s_local, b] bool: document starts at this rank's positions. cu_seqlens index the
    batch-major flattening of the full [b, seq_full] micro-batch."""
    mask = document_start_mask(cu_seqlens, seq_full, batch)
    return split_for_context_parallel(mask, 0, dist.get_rank(group), dist.get_world_size(group))
