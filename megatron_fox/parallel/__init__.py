"""Context parallelism for the FoX op (sequence split over ranks, pruned chunks skipped)."""

from .context_parallel import (
    ContextParallelStats,
    context_parallel_forgetting_attention,
    global_prefix_sums,
)
from .chunk_shift import chunk_boundary_rows
from .exchange import all_gather_autograd
from .head_parallel import HeadCostMemory, HeadParallelStats, assign_heads, head_parallel_forgetting_attention
from .layout import gather_from_context_parallel, local_document_starts, split_for_context_parallel
from .skipping import ChunkSkipMemory, skip_table

__all__ = [
    "ChunkSkipMemory",
    "ContextParallelStats",
    "HeadCostMemory",
    "HeadParallelStats",
    "all_gather_autograd",
    "assign_heads",
    "chunk_boundary_rows",
    "context_parallel_forgetting_attention",
    "gather_from_context_parallel",
    "head_parallel_forgetting_attention",
    "global_prefix_sums",
    "local_document_starts",
    "skip_table",
    "split_for_context_parallel",
]
