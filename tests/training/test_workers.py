"""The multi-process test launcher itself: a failing rank is reported while its peer hangs."""

import time

import pytest

from . import workers


def test_failed_rank_reported_while_peer_hangs(monkeypatch):
    """Rank 0 raises, rank 1 sleeps as if blocked in a receive: the launch ends after the
    grace, not the timeout, naming rank 0's error and where rank 1 was (its stack dump)."""
    monkeypatch.setattr(workers, "GRACE_S", 3.0)
    start = time.monotonic()
    with pytest.raises(RuntimeError) as info:
        workers.launch("fail_or_hang", 2, {"message": "the planted failure"}, timeout=300)
    elapsed = time.monotonic() - start
    text = str(info.value)
    assert "rank 0 exit 1" in text and "ValueError: the planted failure" in text
    assert "rank 1 still running after another rank failed" in text
    assert "in task_fail_or_hang" in text  # faulthandler's dump of the hung rank
    assert elapsed < 60, elapsed
