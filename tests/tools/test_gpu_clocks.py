"""tools/gpu_clocks.py: parsing nvidia-smi samples, their summary, and the sampler's process
(a stand-in nvidia-smi script, so no GPU is needed)."""

import os
import stat
import sys
import time

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "tools"))

from gpu_clocks import ClockSampler, parse_samples, summarise  # noqa: E402


def test_parse_samples_skips_what_does_not_parse():
    text = "1980, 95.54, 0x0000000000000000\n[N/A], 72.6, 0x1\n1695, 702.67, 0x0000000000000004\n1710, 6"
    assert parse_samples(text) == [(1980.0, 95.54, 0), (1695.0, 702.67, 4)]


def test_summarise_against_hand_arithmetic():
    samples = [(1980.0, 420.0, 0x0), (1695.0, 702.5, 0x4), (1350.0, 662.8, 0x4), (1710.0, 690.0, 0x4 | 0x1)]
    s = summarise(samples)
    assert s["sm_mhz_median"] == (1695.0 + 1710.0) / 2
    assert s["sm_mhz_min"] == 1350.0
    assert s["power_w_max"] == 702.5
    assert s["power_capped"] == 0.75  # three of four samples have bit 0x4
    assert summarise([]) is None


def _fake_smi(tmp_path, line):
    """An executable that records its arguments and prints `line` every 10 ms until killed."""
    path = tmp_path / "fake-smi"
    path.write_text(f'#!/usr/bin/env bash\necho "$@" > "{tmp_path}/args"\n'
                    f'while true; do echo "{line}"; sleep 0.01; done\n')
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return str(path)


def test_sampler_runs_the_command_and_summarises(tmp_path):
    cmd = _fake_smi(tmp_path, "1605, 696.3, 0x0000000000000004")
    with ClockSampler(device_index=3, period_ms=20, command=cmd) as clocks:
        time.sleep(0.3)
    s = clocks.summary()
    assert len(clocks.samples) >= 3
    assert s == {"sm_mhz_median": 1605.0, "sm_mhz_min": 1605.0, "power_w_max": 696.3, "power_capped": 1.0}
    args = (tmp_path / "args").read_text().split()
    assert "--id=3" in args and "-lms=20" in args and "--format=csv,noheader,nounits" in args


def test_sampler_without_the_command_gives_none(tmp_path):
    with ClockSampler(command=str(tmp_path / "no-such-smi")) as clocks:
        pass
    assert clocks.summary() is None


def test_bad_period_names_the_argument():
    with pytest.raises(ValueError, match="period_ms"):
        ClockSampler(period_ms=0)
