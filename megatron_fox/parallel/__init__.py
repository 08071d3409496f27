"""Context parallelism for the FoX op (sequence split over ranks, pruned chunks skipped)."""

from .context_parallel import (
    ContextParallelStats,
    all_gather_autograd,
    context_parallel_forgetting_attention,
    gather_from_context_parallel,
    split_for_context_parallel,
)

__all__ = [
    "ContextParallelStats",
    "all_gather_autograd",
    "context_parallel_forgetting_attention",
    "gather_from_context_parallel",
    "split_for_context_parallel",
]
