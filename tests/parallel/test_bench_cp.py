"""tools/bench_cp.py on CPU: the real ring under torchrun (2 gloo processes, kernels in the
Triton interpreter) and the head-parallel (a2a) op, checked against the one-device op on the whole sequence."""

import json
import os
import subprocess
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "training"))
from workers import ROOT, run_python, tool_env  # noqa: E402


def test_bench_cp_multi_process_check(tmp_path):
    out = tmp_path / "cp.json"
    env = dict(tool_env(), TRITON_INTERPRET="1")
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          os.path.join(ROOT, "tools", "bench_cp.py"), "--multi-gpu", "--device", "cpu", "--check",
                          "--lengths", "64", "--heads", "2", "--head-dim", "16", "--iters", "1", "--warmup", "1",
                          "--json", str(out)],
                         capture_output=True, text=True, env=env, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    rows = json.loads(out.read_text())
    assert [r["mode"] for r in rows] == ["exact", "acp_no_chunk_skip", "acp", "acp_memory", "a2a_exact",
                                         "a2a_acp_unbalanced", "a2a_acp"]
    for r in rows:
        # bf16 inputs on both sides: ring or head-parallel and the one-device op agree to bf16 rounding
        for key in ("rel_err_o", "rel_err_dq", "rel_err_dk", "rel_err_dv"):
            assert 0.0 <= r[key] < 2e-2, (r["mode"], key, r[key])
        assert r["bytes_sent"] > 0
        ring = r["mode"] in ("exact", "acp_no_chunk_skip", "acp", "acp_memory")
        assert r["rank_steps_skipped"] == ("0/2" if ring else "0/0")
    for r in (rows[2], rows[3], rows[6]):
        assert r["speedup"] > 0 and r["scaling_efficiency"] > 0


def test_bench_cp_a2a_split_balances_heads(tmp_path):
    """--a2a-split: every rank's heads timed; their sum is close to the whole op's time."""
    out = tmp_path / "split.json"
    run = run_python([os.path.join(ROOT, "tools", "bench_cp.py"), "--a2a-split", "--device", "cpu", "--lengths", "64",
                      "--heads", "4", "--head-dim", "16", "--cp", "2", "--json", str(out)],
                     env=dict(tool_env(), TRITON_INTERPRET="1"), timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    (row,) = json.loads(out.read_text())
    assert row["cp"] == 2 and len(row["per_rank_ms"]) == 2 and all(t > 0 for t in row["per_rank_ms"])
    assert row["whole_ms"] > 0 and row["max_over_whole_per_rank"] > 0
