"""Per-phase step timers (Megatron-LM's --timing-log-level 1, --log-timers-to-tensorboard).

Each phase's wall time is summed over the steps between two log lines and reported per
step, the maximum over ranks (the slowest rank sets the step). On CUDA the device is
synchronised at each phase's start and end, so the figures are the phase's real time but a
run with timers on is a little slower (as in Megatron-LM); with them off nothing is timed.
"""

from __future__ import annotations

import contextlib
import time

import torch
import torch.distributed as dist

PHASES = ("batch-generator", "forward-backward", "optimizer")


class PhaseTimers:
    """Sums of wall seconds per phase of `PHASES`; `enabled` False makes `phase` a no-op."""

    def __init__(self, enabled: bool, device: torch.device):
        self.enabled, self.device = enabled, device
        self._sums = dict.fromkeys(PHASES, 0.0)
        self._steps = 0

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @contextlib.contextmanager
    def phase(self, name: str):
        """Time the block as phase `name` (one of PHASES)."""
        if not self.enabled:
            yield
            return
        if name not in self._sums:
            raise ValueError(f"timers: unknown phase {name!r} (one of {PHASES})")
        self._sync()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self._sync()
            self._sums[name] += time.perf_counter() - t0

    def step_done(self) -> None:
        self._steps += self.enabled

    def report(self) -> dict[str, float]:
        """Milliseconds per step of each phase since the last report, the maximum over all
        ranks (a collective: every rank calls it); {} when disabled or no step was timed."""
        if not self.enabled or not self._steps:
            return {}
        sums = torch.tensor([self._sums[p] for p in PHASES], dtype=torch.float64,
                            device=self.device if self.device.type == "cuda" else "cpu")
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(sums, op=dist.ReduceOp.MAX)
        out = {p: 1e3 * float(v) / self._steps for p, v in zip(PHASES, sums)}
        self._sums, self._steps = dict.fromkeys(PHASES, 0.0), 0
        return out


NO_TIMERS = PhaseTimers(False, torch.device("cpu"))  # the engines' default: nothing timed
