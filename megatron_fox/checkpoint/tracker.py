"""Megatron-LM's checkpoint tracker: `latest_checkpointed_iteration.txt` beside `iter_NNNNNNN/`."""

from __future__ import annotations

import os

import torch.distributed as dist

TRACKER = "latest_checkpointed_iteration.txt"


def iteration_dir(root: str, iteration: int) -> str:
    """`<root>/iter_0000042` for iteration 42."""
    return os.path.join(root, f"iter_{iteration:07d}")


def write_latest(root: str, iteration: int) -> None:
    """Rank 0 records `iteration` as the latest complete checkpoint (after everyone saved)."""
    dist.barrier()
    if dist.get_rank() == 0:
        with open(os.path.join(root, TRACKER), "w") as f:
            f.write(str(iteration))
    dist.barrier()


def read_latest(root: str) -> int:
    """The latest complete checkpoint's iteration under root."""
    path = os.path.join(root, TRACKER)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"load: no {TRACKER} in {root}")
    with open(path) as f:
        return int(f.read().strip())
