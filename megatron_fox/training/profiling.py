"""Megatron-LM's --profile: a window of training steps under a profiler, on chosen ranks.

Steps are counted from 0 as the training loop's iteration (a resumed run counts on from its
checkpoint): the window covers iterations profile_step_start .. profile_step_end - 1, as
Megatron-LM's. Two kinds:

- default (`--profile`): CUDA's profiler API is started and stopped around the window, so
  `nsys profile --capture-range=cudaProfilerApi --capture-range-end=stop ...` records just
  those steps (CUDA only).
- `--profile --use-pytorch-profiler`: torch.profiler records CPU (and CUDA) activity of the
  window and writes a trace per rank into --tensorboard-dir (`<worker>.<time>.pt.trace.json`,
  what TensorBoard's profiler plugin and chrome://tracing / Perfetto read).
"""

from __future__ import annotations

import argparse
from typing import Optional

import torch


class StepProfiler:
    """Start / stop the chosen profiler at the window's edges; does nothing on ranks not in
    profile_ranks or without --profile."""

    def __init__(self, args: argparse.Namespace, rank: int, device: torch.device):
        self.on = bool(args.profile) and rank in args.profile_ranks
        self.start, self.end = args.profile_step_start, args.profile_step_end
        self.torch_profiler = bool(args.use_pytorch_profiler)
        self.trace_dir, self.rank, self.device = args.tensorboard_dir, rank, device
        self._prof: Optional[torch.profiler.profile] = None
        self._running = False

    def step_begin(self, iteration: int) -> None:
        """Call before the training step of `iteration` (0-based)."""
        if not self.on or self._running or not self.start <= iteration < self.end:
            return
        if self.torch_profiler:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if self.device.type == "cuda":
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            handler = torch.profiler.tensorboard_trace_handler(self.trace_dir, worker_name=f"rank{self.rank}")
            self._prof = torch.profiler.profile(activities=activities, record_shapes=True, on_trace_ready=handler)
            self._prof.start()
        else:
            torch.cuda.synchronize(self.device)
            torch.cuda.cudart().cudaProfilerStart()
        self._running = True

    def step_end(self, iteration: int) -> None:
        """Call after the training step of `iteration`: stops at the window's last step."""
        if self._running and iteration + 1 >= self.end:
            self.stop()

    def stop(self) -> None:
        """End the window now (also when training ends inside it); writes the trace."""
        if not self._running:
            return
        if self.torch_profiler:
            self._prof.stop()  # on_trace_ready writes the trace file
            self._prof = None
        else:
            torch.cuda.synchronize(self.device)
            torch.cuda.cudart().cudaProfilerStop()
        self._running = False
