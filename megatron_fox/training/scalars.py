"""The run's scalar logs on rank 0: TensorBoard (`--tensorboard-dir`) and Weights & Biases
(`--wandb-project`, as Megatron-LM's flags), written through one `add_scalar`."""

from __future__ import annotations

import argparse


class ScalarLog:
    """add_scalar(name, value, step) into every sink the flags ask for (none: a no-op; false
    in a boolean context, so callers can skip building values)."""

    def __init__(self, args: argparse.Namespace, rank0: bool):
        self._tensorboard = self._wandb = None
        if not rank0:
            return
        if args.tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter

            self._tensorboard = SummaryWriter(args.tensorboard_dir, max_queue=args.tensorboard_queue_size)
        if args.wandb_project:
            import wandb

            self._wandb = wandb.init(project=args.wandb_project, entity=args.wandb_entity, name=args.wandb_exp_name,
                                     dir=args.wandb_save_dir, config=_plain(vars(args)))

    def __bool__(self) -> bool:
        return self._tensorboard is not None or self._wandb is not None

    def add_scalar(self, name: str, value: float, step: int) -> None:
        if self._tensorboard is not None:
            self._tensorboard.add_scalar(name, value, step)
        if self._wandb is not None:
            self._wandb.log({name: float(value)}, step=step)

    def close(self) -> None:
        if self._tensorboard is not None:
            self._tensorboard.close()
        if self._wandb is not None:
            self._wandb.finish()


def _plain(config: dict) -> dict:
    """The run's arguments as W&B's config: numbers, strings, bools and lists of them."""
    keep = (int, float, str, bool, type(None))
    return {k: v for k, v in config.items()
            if isinstance(v, keep) or (isinstance(v, (list, tuple)) and all(isinstance(x, keep) for x in v))}
