"""tools/kernel_report.py: occupancy arithmetic against hand-worked Hopper figures, and the
compiled kernels' structure (sm_90 code built on the CPU with Triton's own ptxas)."""

import json
import os
import subprocess
import sys

import pytest

TOOLS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "tools")
sys.path.insert(0, TOOLS)
import kernel_report  # noqa: E402


def _run_report(*args) -> list:
    """kernel_report.py --json in a process without the interpreter (which replaces the
    kernels): one dict per kernel."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, os.path.join(TOOLS, "kernel_report.py"), "--json", *args],
                         capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    return [json.loads(line) for line in run.stdout.splitlines()]


@pytest.mark.parametrize("regs, warps, smem, expect", [
    (255, 8, 131840, 1),  # 255 regs -> 8192 per warp; 8 warps take all 64K registers
    (255, 4, 82944, 2),   # 32K registers per CTA -> 2; shared memory 2 x 83 KB fits in 228 KB
    (255, 4, 120000, 1),  # registers would allow 2, shared memory only 1
    (128, 4, 0, 4),       # 4096 registers per warp -> 4 CTAs of 4 warps
    (32, 1, 0, 32),       # the 32-CTA cap binds before registers (64) and threads (64)
    (40, 2, 0, 25),       # 40 x 32 = 1280 -> 1280 registers per warp (unit 256): 65536 / 2560 = 25
    (64, 16, 0, 2),       # 2048 threads -> 4 CTAs, registers (2048 per warp) -> 2
])
def test_ctas_per_sm(regs, warps, smem, expect):
    assert kernel_report.ctas_per_sm(regs, warps, smem) == expect


@pytest.mark.parametrize("head_dim", [64, 128])
def test_default_tiles_pipeline_their_loads(head_dim):
    """The tiles in use on sm_90: every q/k/v/dO tile load inside a loop (and with TMA the
    prefix-sum block) is asynchronous (cp.async or TMA), each loop holds the kernel's MMAs,
    the kernel fits on an SM."""
    reports = {r["kernel"]: r for r in _run_report("--head-dim", str(head_dim))}
    # (range loops without packed documents, MMAs per loop)
    for name, (loops, mmas_per_loop) in {"fwd": (2, 2), "dkdv": (3, 4), "dq": (2, 3)}.items():
        rep = reports[name]
        assert rep["sync_tile_loads"] == 0, rep
        # two streamed tiles per loop, and with TMA also the keys' prefix sums (a [1, n] block)
        assert rep["async_tile_loads"] == (3 if rep["tile"]["tma"] and name != "dkdv" else 2) * loops, rep
        assert rep["mmas"] == mmas_per_loop * loops, rep
        assert rep["ctas_per_sm"] >= 1 and rep["regs"] <= 255 and rep["smem_bytes"] <= 232448, rep


def test_dkdv_loop_keeps_dv_in_flight():
    """The dK/dV loop issues dV after dP^T's wait (docs/kernel_notes.md step 13): in every
    inner loop, S^T and dP^T are each waited for, then dV and dK accumulate with no wait
    between them, so dV runs on under the dS arithmetic."""
    loops = _run_report("--schedule", "--kernel", "dkdv")[0]["loops"]
    assert len(loops) == 3, loops
    for loop in loops:
        assert "mma, wait(0), exp2, mma, wait(0), mma+=, mma+=" in loop, loop


def test_gluon_forward_builds_for_sm90():
    """The Gluon forward (docs/kernel_notes.md step 21) for sm_90: no spills, within the SM's
    shared memory, consumer warpgroups at 240 registers and the producer warp at 24; each
    consumer's loop issues S and P V together and waits for S alone (wait(1)) before the
    softmax, for P V only after it; the producer's loop only waits for free slots."""
    rep = _run_report("--kernel", "gluon_fwd", "--schedule")[0]
    assert rep["stack_bytes"] == 0 and rep["smem_bytes"] <= 232448, rep
    assert {24, 240} <= set(rep["partition_regs"]), rep
    consumers = [loop for loop in rep["loops"] if "mma" in loop]
    assert len(consumers) == 2 and len(rep["loops"]) == 3, rep["loops"]
    for loop in consumers:
        assert "mma, mma+=, wait(1), " in loop and loop.endswith("exp2, sum, wait(0)"), loop


def test_gluon_forward_falls_back_without_gluon(monkeypatch):
    """Where the Gluon module cannot be imported (another Triton), the op warns once and
    dispatches to the Triton forward: no Gluon tiles, so _gluon_forward_ok stays False."""
    from megatron_fox.ops.forgetting_attn import function

    monkeypatch.setitem(sys.modules, "megatron_fox.ops.forgetting_attn.gluon_fwd", None)
    function._gluon_tiles.cache_clear()
    try:
        with pytest.warns(UserWarning, match="Gluon forward unavailable"):
            assert function._gluon_tiles() == {}
    finally:
        function._gluon_tiles.cache_clear()
    monkeypatch.undo()
    assert 128 in function._gluon_tiles()


def test_keep_mask_kernels_spill_less_at_the_warps_in_use():
    """The keep mask's tile kernels hold [64, 64] float32 tiles through the sparse sigmoid's
    root search: at 4 warps a thread both spill; at the warps in use (`keep_mask._WARPS`)
    the probabilities' kernel spills nothing and the backward under a third as much."""
    used = {r["kernel"]: r for r in _run_report("--kernel", "keep_probs", "keep_bwd")}
    four = {r["kernel"]: r for r in _run_report("--kernel", "keep_probs", "keep_bwd", "--tile", "64", "64", "4", "3")}
    assert four["keep_probs"]["stack_bytes"] > 0 and four["keep_bwd"]["stack_bytes"] > 0, four
    assert used["keep_probs"]["tile"]["num_warps"] > 4, used
    assert used["keep_probs"]["stack_bytes"] == 0, used
    assert 3 * used["keep_bwd"]["stack_bytes"] < four["keep_bwd"]["stack_bytes"], (used, four)
