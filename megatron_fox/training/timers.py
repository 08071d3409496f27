"""Per-phase step timers (Megatron-LM's --timing-log-level 1, --log-timers-to-tensorboard).

Each phase's wall time is summed over the steps between two log lines and reported per
step: the maximum over ranks (the slowest rank sets the step) goes to TensorBoard; the log
line shows what --timing-log-option asks, as Megatron-LM: max, minmax (the default: "(min,
max)" over ranks) or all (every rank's, in rank order). On CUDA the device is
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

    def report(self) -> dict[str, list[float]]:
        """Milliseconds per step of each phase since the last report, one value per rank in
        rank order (a collective: every rank calls it); {} when disabled or no step was timed."""
        if not self.enabled or not self._steps:
            return {}
        sums = torch.tensor([self._sums[p] for p in PHASES], dtype=torch.float64,
                            device=self.device if self.device.type == "cuda" else "cpu")
        ranks = [sums]
        if dist.is_initialized() and dist.get_world_size() > 1:
            ranks = [torch.empty_like(sums) for _ in range(dist.get_world_size())]
            dist.all_gather(ranks, sums)
        table = 1e3 * torch.stack(ranks).cpu() / self._steps  # [ranks, phases]
        self._sums, self._steps = dict.fromkeys(PHASES, 0.0), 0
        return {p: table[:, i].tolist() for i, p in enumerate(PHASES)}


def format_phases(per_rank: dict[str, list[float]], option: str) -> str:
    """The log line's timer part from `PhaseTimers.report()`: per phase the max over ranks
    (option "max"), "(min, max)" ("minmax") or every rank's value ("all")."""
    def show(values: list[float]) -> str:
        if option == "max":
            return f"{max(values):.1f}"
        if option == "minmax":
            return f"({min(values):.1f}, {max(values):.1f})"
        if option == "all":
            return "[" + ", ".join(f"{v:.1f}" for v in values) + "]"
        raise ValueError(f"timing_log_option: {option!r} is not max, minmax or all")

    return "time (ms) " + "".join(f"| {name} {show(v)} " for name, v in per_rank.items()) + "| "


NO_TIMERS = PhaseTimers(False, torch.device("cpu"))  # the engines' default: nothing timed
