"""Megatron-Core's load-balanced context-parallel layout and packed-document maps.

The sequence is cut into 2P chunks; rank r holds chunks r and 2P-1-r, concatenated.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


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
    mask = torch.zeros(batch * seq_full, dtype=torch.bool, device=cu_seqlens.device)
    mask[cu_seqlens[:-1].long()] = True
    part = split_for_context_parallel(mask.view(batch, seq_full), 1, dist.get_rank(group), dist.get_world_size(group))
    return part.t()

def sample_cu_seqlens(cu_seqlens: torch.Tensor, sample: int, seq_full: int) -> torch.Tensor:
    """Offsets of one sample's documents from the batch-major offsets of a micro-batch
    (every sample starts a document)."""
    lo, hi = sample * seq_full, (sample + 1) * seq_full
    inside = cu_seqlens[(cu_seqlens >= lo) & (cu_seqlens <= hi)]
    return (inside - lo).to(torch.int32)

def _global_documents(cu_seqlens, B, L, device):
    """Per-position document start / end (global, int64 [L]) of a packed row, or None."""
    if cu_seqlens is None:
        return None
    if B != 1:
        raise ValueError(f"cu_seqlens needs packed input with batch 1, got batch {B}")
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.dtype not in (torch.int32,
                                                                                                      torch.int64):
        raise ValueError("cu_seqlens must be a 1-D int32 tensor of document offsets [0, ..., seq]")
    cs = cu_seqlens.to(device=device, dtype=torch.int64)
    if cs[0].item() != 0 or cs[-1].item() != L or bool((cs[1:] <= cs[:-1]).any()):
        raise ValueError(f"cu_seqlens must start at 0, end at the global length {L} and be strictly increasing")
    pos = torch.arange(L, device=device)
    doc = torch.searchsorted(cs, pos, right=True) - 1
    return cs[doc], cs[doc + 1]
