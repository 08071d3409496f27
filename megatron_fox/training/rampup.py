"""Batch-size ramp-up as Megatron-LM's `--rampup-batch-size START INCREMENT SAMPLES`: the
global batch starts at START sequences and grows by INCREMENT each time another
SAMPLES / ((global_batch_size - START) / INCREMENT) sequences have been consumed, reaching
global_batch_size once more than SAMPLES have been; the LR schedule follows the consumed
sequences (one "step" of it = global_batch_size sequences)."""

from __future__ import annotations

import bisect
import functools
import itertools
from typing import Optional, Sequence


def rampup_batch_size(consumed: int, start: int, increment: int, samples: int, global_batch_size: int) -> int:
    """The global batch of the step that begins after `consumed` sequences."""
    if consumed > samples:
        return global_batch_size
    per_increment = samples / ((global_batch_size - start) // increment)
    return min(global_batch_size, start + int(consumed / per_increment) * increment)


@functools.lru_cache(maxsize=8)
def _ramp(start: int, increment: int, samples: int, global_batch_size: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(batch sizes of the steps before the full batch, sequences consumed before each)."""
    sizes, consumed = [], 0
    while consumed <= samples:
        size = rampup_batch_size(consumed, start, increment, samples, global_batch_size)
        if size == global_batch_size:
            break
        sizes.append(size)
        consumed += size
    return tuple(sizes), tuple(itertools.accumulate(sizes, initial=0))


def step_batch(iteration: int, rampup: Optional[Sequence[int]], global_batch_size: int) -> tuple[int, int]:
    """(sequences consumed before step `iteration` (0-based), its global batch size)."""
    if not rampup:
        return iteration * global_batch_size, global_batch_size
    sizes, before = _ramp(*rampup, global_batch_size)
    if iteration < len(sizes):
        return before[iteration], sizes[iteration]
    return before[-1] + (iteration - len(sizes)) * global_batch_size, global_batch_size


def steps_for_samples(samples: int, rampup: Optional[Sequence[int]], global_batch_size: int) -> int:
    """The fewest steps that consume at least `samples` sequences."""
    if not rampup:
        return -(-samples // global_batch_size)
    sizes, before = _ramp(*rampup, global_batch_size)
    if samples <= before[-1]:
        return bisect.bisect_left(before, samples)
    return len(sizes) + -(-(samples - before[-1]) // global_batch_size)


def ramp_sizes(rampup: Sequence[int], global_batch_size: int) -> list[int]:
    """Every batch size the ramp passes through (for the divisibility check)."""
    start, increment = rampup[0], rampup[1]
    return list(range(start, global_batch_size, increment))
