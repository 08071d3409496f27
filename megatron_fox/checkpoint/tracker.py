"""Megatron-LM's checkpoint tracker: `latest_checkpointed_iteration.txt` beside `iter_NNNNNNN/`,
and the run's flags in `iter_NNNNNNN/args.json` (what --use-checkpoint-args reads)."""

from __future__ import annotations

import json
import os
from typing import Optional

import torch.distributed as dist

TRACKER = "latest_checkpointed_iteration.txt"
RUN_ARGS = "args.json"


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


def has_checkpoint(root: str) -> bool:
    """Whether root holds a complete checkpoint (its tracker file)."""
    return os.path.isfile(os.path.join(root, TRACKER))


def read_latest(root: str) -> int:
    """The latest complete checkpoint's iteration under root."""
    path = os.path.join(root, TRACKER)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"load: no {TRACKER} in {root}")
    with open(path) as f:
        text = f.read().strip()
    if not text.isdigit():
        raise ValueError(f"load: {path} holds {text[:40]!r}, not an iteration number")
    return int(text)


def checkpoint_iteration(root: str, step: Optional[int] = None) -> int:
    """The iteration to load from root: `step` (Megatron-LM's --ckpt-step) or the tracker's
    latest, checked to have its iter_NNNNNNN folder (a tracker can outlive a deleted one)."""
    iteration = read_latest(root) if step is None else step
    path = iteration_dir(root, iteration)
    if not os.path.isdir(path):
        named = f"ckpt_step {step}" if step is not None else f"{TRACKER} names iteration {iteration}"
        raise FileNotFoundError(f"load: {named} but {path} does not exist")
    return iteration


def write_run_args(directory: str, values: dict) -> None:
    """Rank 0 writes the run's flags (a dict; values JSON cannot hold are written as text)
    into a checkpoint's iteration directory, before the tracker names it."""
    if dist.get_rank() == 0:
        os.makedirs(directory, exist_ok=True)
        path = os.path.join(directory, RUN_ARGS)
        with open(path + ".tmp", "w") as f:
            json.dump(values, f, indent=1, sort_keys=True, default=str)
        os.replace(path + ".tmp", path)


def read_run_args(root: str, step: Optional[int] = None) -> dict:
    """The flags saved with the checkpoint under root that `checkpoint_iteration` picks."""
    path = os.path.join(iteration_dir(root, checkpoint_iteration(root, step)), RUN_ARGS)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no {RUN_ARGS} in {os.path.dirname(path)} (saved before megatron_fox wrote one)")
    with open(path) as f:
        return json.load(f)


NON_PERSISTENT_SUBDIR = "non_persistent"


def non_persistent_root(directory: Optional[str], base: str) -> str:
    """Where global non-persistent checkpoints live: `directory`
    (--non-persistent-global-ckpt-dir) or `<base>/non_persistent` (base: --save when
    saving, --load when resuming, as Megatron-LM's)."""
    return directory if directory else os.path.join(base, NON_PERSISTENT_SUBDIR)  # "" unset, as Megatron-LM's


def newer_non_persistent(load: str, step: Optional[int], kind: Optional[str],
                         directory: Optional[str]) -> Optional[tuple[str, int, int]]:
    """Megatron-LM's choice on resume, for kind "global" without a step (--ckpt-step loads
    from load): (the non-persistent directory, its latest iteration, load's latest or -1)
    where its latest is at least as new as load's, else None. ValueError for a tracker that
    names no iteration."""
    if kind != "global" or step is not None:
        return None
    root = non_persistent_root(directory, load)
    if not has_checkpoint(root):
        return None
    newest, persistent = read_latest(root), read_latest(load) if has_checkpoint(load) else -1
    return (root, newest, persistent) if newest >= persistent else None


def remove_other_iterations(root: str, keep: int) -> None:
    """Rank 0 deletes every iter_NNNNNNN folder under root but `keep`'s (after the tracker
    names it): a non-persistent checkpoint replaces the one before."""
    import shutil

    if dist.get_rank() != 0:
        return
    keep_name = os.path.basename(iteration_dir(root, keep))
    for name in os.listdir(root):
        if name.startswith("iter_") and name != keep_name and os.path.isdir(os.path.join(root, name)):
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)
