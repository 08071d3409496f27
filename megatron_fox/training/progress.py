"""Megatron-LM's --log-progress: one line in <save>/progress.txt when a job starts and at
every checkpoint, with the tokens and floating-point operations trained so far over all jobs
of the run and the throughput of this job and of all of them.

The totals travel with the checkpoints (progress.json in each iteration directory), so a job
that resumes from one counts on from its figures; a job that starts without one counts from 0.
Columns are tab-separated `name value` pairs, one line per event.
"""

from __future__ import annotations

import datetime
import json
import os
from typing import Optional

import torch.distributed as dist

from ..checkpoint import iteration_dir

PROGRESS_FILE, TOTALS_FILE = "progress.txt", "progress.json"


class ProgressLog:
    """The run's totals (tokens, model FLOPs, GPU-seconds of training steps) and the lines of
    progress.txt under `save`; only rank 0 writes."""

    def __init__(self, save: str, load: Optional[str], start_step: int, world: int):
        self.save, self.world = save, world
        self.rank0 = not dist.is_initialized() or dist.get_rank() == 0
        self.totals = {"tokens": 0, "flops": 0.0, "gpu_seconds": 0.0}
        if load and start_step > 0:
            path = os.path.join(iteration_dir(load, start_step), TOTALS_FILE)
            if os.path.isfile(path):
                with open(path) as f:
                    self.totals.update(json.load(f))
        self.job_flops, self.job_seconds = 0.0, 0.0
        self._write("job started", start_step)

    def step(self, tokens: int, flops: float, seconds: float) -> None:
        """Count one training step: its tokens, model FLOPs (all GPUs) and wall seconds."""
        self.totals["tokens"] += tokens
        self.totals["flops"] += flops
        self.totals["gpu_seconds"] += seconds * self.world
        self.job_flops += flops
        self.job_seconds += seconds

    def saved(self, root: str, step: int) -> None:
        """After the checkpoint of `step` under root: its totals file and a progress line."""
        if self.rank0:
            with open(os.path.join(iteration_dir(root, step), TOTALS_FILE), "w") as f:
                json.dump(self.totals, f)
        self._write("checkpoint saved", step)

    def _write(self, event: str, step: int) -> None:
        if not self.rank0:
            return
        job_tf = self.job_flops / max(self.job_seconds * self.world, 1e-9) / 1e12
        all_tf = self.totals["flops"] / max(self.totals["gpu_seconds"], 1e-9) / 1e12
        fields = [datetime.datetime.now().strftime("%Y-%m-%d %H:%M:%S"),
                  f"job {os.environ.get('SLURM_JOB_ID', '-')}", f"processes {self.world}", event, f"step {step}",
                  f"tokens {self.totals['tokens']}", f"floating-point operations {self.totals['flops']:.6e}",
                  f"job TFLOP/s/GPU {job_tf:.4g}", f"all jobs TFLOP/s/GPU {all_tf:.4g}"]
        os.makedirs(self.save, exist_ok=True)
        with open(os.path.join(self.save, PROGRESS_FILE), "a") as f:
            f.write("\t".join(fields) + "\n")
