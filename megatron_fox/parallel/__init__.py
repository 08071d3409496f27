"""Context parallelism for the FoX op (sequence split over ranks, pruned chunks skipped)."""

from .context_parallel import (
    ContextParallelStats,
    all_gather_autograd,
    context_parallel_forgetting_attention,
    gather_from_context_parallel,
    local_document_starts,
    sample_cu_seqlens,
    shift_across_chunks,
    split_for_context_parallel,
)

__all__ = [
    "ContextParallelStats",
    "all_gather_autograd",
    "context_parallel_forgetting_attention",
    "gather_from_context_parallel",
    "local_document_starts",
    "sample_cu_seqlens",
    "shift_across_chunks",
    "split_for_context_parallel",
]
