"""The GPU's SM clock and power while a benchmark figure is timed.

A lent H100 holds 1980 MHz for the first moments of a run, then its 700 W software power
cap brings the SM clock to ~1600-1725 MHz under sustained attention work
(docs/benchmarks.md, "Why kernel time and timed medians part"), so the same code reads
differently on machines and moments that differ in power headroom. `ClockSampler` runs
`nvidia-smi` in the background while a figure is timed and summarises what the clock did:

    with ClockSampler(device_index=0) as clocks:
        ms = bench(step)
    clocks.summary()   # {"sm_mhz_median": 1695, "sm_mhz_min": 1350, "power_w_max": 702.7,
                       #  "power_capped": 0.8}   (None where nvidia-smi is missing)
"""

from __future__ import annotations

import shutil
import statistics
import subprocess

QUERY = "clocks.sm,power.draw,clocks_throttle_reasons.active"
SW_POWER_CAP = 0x4  # bit of clocks_throttle_reasons.active: the software power cap holds the clock


def parse_samples(text: str) -> list[tuple[float, float, int]]:
    """(SM MHz, power W, throttle-reason bits) per line of `nvidia-smi --query-gpu=QUERY
    --format=csv,noheader,nounits` output; lines that do not parse ("[N/A]", partial last
    line) are skipped."""
    out = []
    for line in text.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) != 3:
            continue
        try:
            out.append((float(parts[0]), float(parts[1]), int(parts[2], 16)))
        except ValueError:
            continue
    return out


def summarise(samples: list[tuple[float, float, int]]) -> dict | None:
    """Median and minimum SM clock (MHz), peak power (W) and the fraction of samples with
    the software power cap active; None without samples."""
    if not samples:
        return None
    mhz = [s[0] for s in samples]
    return {"sm_mhz_median": statistics.median(mhz), "sm_mhz_min": min(mhz),
            "power_w_max": max(s[1] for s in samples),
            "power_capped": round(sum(bool(s[2] & SW_POWER_CAP) for s in samples) / len(samples), 3)}


class ClockSampler:
    """Context manager sampling one GPU every `period_ms` with nvidia-smi (`command`)."""

    def __init__(self, device_index: int = 0, period_ms: int = 100, command: str = "nvidia-smi"):
        if period_ms < 1:
            raise ValueError(f"period_ms must be >= 1, got {period_ms}")
        self.args = [command, f"--id={device_index}", f"--query-gpu={QUERY}", "--format=csv,noheader,nounits",
                     f"-lms={period_ms}"]
        self.proc = None
        self.samples: list[tuple[float, float, int]] = []

    def __enter__(self):
        if shutil.which(self.args[0]) is not None:
            self.proc = subprocess.Popen(self.args, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        return self

    def __exit__(self, *exc):
        if self.proc is not None:
            self.proc.terminate()
            try:
                text, _ = self.proc.communicate(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                text, _ = self.proc.communicate()
            self.samples = parse_samples(text)
        return False

    def summary(self) -> dict | None:
        return summarise(self.samples)
