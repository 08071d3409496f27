"""The CUDA training path on one GPU: Megatron DDP + distributed optimizer, the
forward-backward schedule, dist_checkpointing save and resume.

Runs only with MEGATRON_FOX_TEST_GPU=1 on a machine with CUDA (the CPU CI skips it).
"""

import json
import os
import subprocess
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "training"))
from workers import ROOT, free_port, launch, sigterm_at_step, tool_env  # noqa: E402

pytestmark = pytest.mark.skipif(
    os.environ.get("MEGATRON_FOX_TEST_GPU") != "1" or not torch.cuda.is_available(), reason="needs a CUDA GPU")

FLAGS = ["--num-layers", "2", "--hidden-size", "128", "--num-attention-heads", "4", "--ffn-hidden-size", "384",
         "--seq-length", "512", "--micro-batch-size", "2", "--global-batch-size", "8", "--lr", "3e-3",
         "--lr-warmup-iters", "5", "--log-interval", "5", "--no-progress-bar", "--device", "cuda", "--bf16",
         "--default-corpus-bytes", "2000000", "--default-vocab-size", "1024", "--split", "100,0,0"]

# a layer with 4 experts (top 2) and a shared one, then a dense layer
MOE = ["--num-experts", "4", "--moe-router-topk", "2", "--moe-ffn-hidden-size", "256", "--train-iters", "20",
       "--moe-layer-freq", "[1,0]", "--moe-shared-expert-intermediate-size", "128",
       "--moe-token-dispatcher-type", "alltoall"]


def train(tmp_path, name, flags, world=1, base=FLAGS):
    """The losses logged by `megatron_fox.train` with base + flags on `world` processes."""
    out = tmp_path / f"{name}.pt"
    launch("train", world, {"flags": base + flags, "out": str(out)}, timeout=600)
    return torch.load(out)


def export(tmp_path, ckpt, flags):
    """tools/convert_checkpoint.py from-megatron of a dist_checkpointing folder into
    tmp_path/full.pt (exit 0 asserted); returns that path."""
    weights = tmp_path / "full.pt"
    conv = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "convert_checkpoint.py"), "from-megatron",
                           "--input", str(ckpt), "--output", str(weights), *FLAGS, *flags, "--vocab-size", "1024"],
                          capture_output=True, text=True, env=tool_env(), cwd=tmp_path, timeout=600)
    assert conv.returncode == 0, conv.stderr[-3000:]
    return weights


@pytest.fixture
def own_inductor_cache(tmp_path, monkeypatch):
    """An Inductor cache of this test's own. Inductor picks some reduction kernels' configs
    by timing them at the first compile (run-to-run noise, more so beside other jobs on the
    GPU) and keeps the pick in its cache: runs compared for equality in bf16 (a resumed
    run against the uninterrupted one) must compile alike, so the first run's picks serve
    them all, not those of another test writing the shared cache beside it (measured: fresh
    caches under load gave runs 1e-4 apart from step 1; one cache, bit-equal runs)."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))


def test_gpu_train_loss_falls_and_resume_matches(tmp_path, own_inductor_cache):
    os.environ.setdefault("MEGATRON_FOX_CACHE", str(tmp_path / "cache"))
    full = train(tmp_path, "full", ["--train-iters", "30"])
    losses = [h["loss"] for h in full]
    assert sum(losses[-5:]) / 5 < losses[0] - 1.0, losses
    assert 0.0 < full[-1]["acp_skipped"] < 1.0
    assert 0.0 < full[-1]["max_mem_gb"] < 80.0 and full[-1]["tflops_per_gpu"] > 0.0
    ckpt = tmp_path / "ckpt"
    # Megatron-LM's auto-resume: the first launch names --load of a directory without a
    # checkpoint yet and starts from scratch; every launch has the same flags
    first = train(tmp_path, "first", ["--train-iters", "30", "--exit-interval", "15", "--save", str(ckpt),
                                      "--load", str(ckpt)])
    assert len(first) == 15 and (ckpt / "iter_0000015").is_dir()
    assert first[0]["loss"] == pytest.approx(full[0]["loss"], rel=1e-4)
    saved = json.loads((ckpt / "iter_0000015" / "args.json").read_text())
    assert saved["num_layers"] == 2 and saved["seq_length"] == 512
    slim = tmp_path / "slim"  # the resumed run saves at its end without the optimizer state
    rest = train(tmp_path, "rest", ["--train-iters", "30", "--load", str(ckpt), "--save", str(slim), "--no-save-optim"])
    assert [h["step"] for h in rest] == list(range(16, 31))
    print("uninterrupted", [round(h["loss"], 4) for h in full[15:]])
    print("resumed      ", [round(h["loss"], 4) for h in rest])
    # bf16 on the GPU. Before Adam's step was restored on load (megatron_engine
    # _restore_adam_step) the resumed run drifted by up to 0.3% over 15 steps; with it the
    # resumed run should follow the uninterrupted one to rounding (the CPU fp32 test: 1e-6).
    assert rest[0]["loss"] == pytest.approx(full[15]["loss"], rel=1e-4)
    for a, b in zip(full[15:], rest):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4), (a["step"], a["loss"], b["loss"])
    size = {d: sum(f.stat().st_size for f in (d).rglob("*") if f.is_file()) for d in (ckpt, slim)}
    print("checkpoint bytes with / without the optimizer", size[ckpt], size[slim])
    assert size[slim] < 0.5 * size[ckpt]
    with pytest.raises(RuntimeError, match="config key 'load_optim'"):
        train(tmp_path, "no_optim", ["--train-iters", "31", "--load", str(slim)])
    cont = train(tmp_path, "cont", ["--train-iters", "31", "--load", str(slim), "--no-load-optim"])
    assert [h["step"] for h in cont] == [31]
    # --finetune: step 15's weights only, from step 0 with a fresh optimizer: the run from the
    # same weights as a full state dict (without reload_model_params the optimizer's float32
    # copies would still hold the initial weights and the first update would undo the load)
    weights = export(tmp_path, ckpt, [])
    tuned = train(tmp_path, "tuned", ["--train-iters", "5", "--load", str(ckpt), "--finetune"])
    pre = train(tmp_path, "pre", ["--train-iters", "5", "--pretrained-checkpoint", str(weights)])
    assert [h["step"] for h in tuned] == [1, 2, 3, 4, 5] and tuned[0]["loss"] < losses[0] - 0.5
    for a, b in zip(pre, tuned):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4), (a["step"], a["loss"], b["loss"])


def test_gpu_non_persistent_checkpoint_resumes(tmp_path, own_inductor_cache):
    """The Megatron engine's dist_checkpointing under <save>/non_persistent: saved at steps 4
    and 8 (the newest kept), none at step 6 (persistent); after a crash that left the
    persistent tracker at 6 the resume takes step 8 and follows the uninterrupted run."""
    os.environ.setdefault("MEGATRON_FOX_CACHE", str(tmp_path / "cache"))
    full = train(tmp_path, "full", ["--train-iters", "12"])
    ckpt = tmp_path / "ckpt"
    kind = ["--non-persistent-ckpt-type", "global"]
    train(tmp_path, "first", ["--train-iters", "12", "--exit-interval", "9", "--save", str(ckpt), "--save-interval",
                              "6", "--non-persistent-save-interval", "4"] + kind)
    assert sorted(os.listdir(ckpt / "non_persistent")) == ["iter_0000008", "latest_checkpointed_iteration.txt"]
    (ckpt / "latest_checkpointed_iteration.txt").write_text("6")  # step 9's persistent save lost
    rest = train(tmp_path, "rest", ["--train-iters", "12", "--load", str(ckpt)] + kind)
    assert [h["step"] for h in rest] == [9, 10, 11, 12]
    for a, b in zip(full[8:], rest):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4), (a["step"], a["loss"], b["loss"])


def test_gpu_moe_trains_and_resumes(tmp_path, own_inductor_cache):
    """Mixture of Experts on the Megatron engine (DDP, distributed optimizer, the schedule's
    aux-loss scale, dist_checkpointing of the experts): a layer with experts and a shared
    one, then a dense layer; Megatron-Core's alltoall dispatcher (CUDA only) trains like the
    allgather one, and a saved run resumes exactly."""
    os.environ.setdefault("MEGATRON_FOX_CACHE", str(tmp_path / "cache"))
    a2a = train(tmp_path, "alltoall", MOE)
    gather = train(tmp_path, "allgather", MOE + ["--moe-token-dispatcher-type", "allgather"])
    losses = [h["loss"] for h in a2a]
    print("alltoall ", [round(x, 4) for x in losses])
    print("allgather", [round(h["loss"], 4) for h in gather])
    assert sum(losses[-5:]) / 5 < losses[0] - 0.5, losses
    assert all(0.9 < h["moe_load_balancing_loss"] < 2.0 for h in a2a), [h["moe_load_balancing_loss"] for h in a2a]
    for a, b in zip(a2a, gather):  # the same routing and experts, other token orders (bf16 sums)
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-2), (a["step"], a["loss"], b["loss"])
    ckpt = tmp_path / "ckpt"
    train(tmp_path, "first", MOE + ["--exit-interval", "10", "--save", str(ckpt)])
    rest = train(tmp_path, "rest", MOE + ["--load", str(ckpt)])
    assert [h["step"] for h in rest] == list(range(11, 21))
    for a, b in zip(a2a[10:], rest):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4), (a["step"], a["loss"], b["loss"])


def test_gpu_moe_grouped_gemm_trains_like_sequential(tmp_path):
    """--moe-grouped-gemm on the GPU (torch._grouped_mm's CUTLASS kernels, bf16) trains like
    Megatron-Core's SequentialMLP (bf16: other sum orders)."""
    os.environ.setdefault("MEGATRON_FOX_CACHE", str(tmp_path / "cache"))
    seq = train(tmp_path, "sequential", MOE)
    grouped = train(tmp_path, "grouped", MOE + ["--moe-grouped-gemm"])
    print("sequential", [round(h["loss"], 4) for h in seq])
    print("grouped   ", [round(h["loss"], 4) for h in grouped])
    for a, b in zip(seq, grouped):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-2), (a["step"], a["loss"], b["loss"])
        assert b["moe_load_balancing_loss"] == pytest.approx(a["moe_load_balancing_loss"], rel=2e-2)


ROUTING = {
    # DeepSeek-style: sigmoid scores, 2 groups of 2 experts with the best group only, the
    # weights scaled, and the aux-loss-free balancing bias (a fast rate, so it routes soon)
    "sigmoid_groups_bias": ["--moe-router-score-function", "sigmoid", "--moe-router-num-groups", "2",
                            "--moe-router-group-topk", "1", "--moe-router-topk-scaling-factor", "2.5",
                            "--moe-router-enable-expert-bias", "--moe-router-bias-update-rate", "0.05"],
    # tokens over each expert's capacity (a quarter of an even share) dropped by probability
    "capacity_drop": ["--moe-expert-capacity-factor", "0.25"],
}


def _max_rel_gap(a: list, b: list, key: str) -> float:
    return max(abs(x[key] - y[key]) / abs(y[key]) for x, y in zip(a, b))


@pytest.mark.parametrize("routing", list(ROUTING), ids=list(ROUTING))
def test_gpu_moe_routing_options_equal_cpu_engine(tmp_path, routing):
    """The routing options on the Megatron engine (the expert bias updated in Megatron's
    finalize_model_grads, the router's group limit, capacity drops in the alltoall
    dispatcher) against the CPU engine (the bias from megatron_fox's own update, the
    allgather dispatcher), both float32 from the same layout-invariant init, experts in
    both layers. The run without the option must be at least 5x farther from the GPU run
    than the CPU run is, in loss and in the logged balance, so the comparison sees the option
    (first GPU run, H100: the two engines' losses within 1.2e-4 relative, TF32 matmuls)."""
    os.environ.setdefault("MEGATRON_FOX_CACHE", str(tmp_path / "cache"))
    fp32 = [f for f in FLAGS if f != "--bf16"]
    moe = ["--num-experts", "4", "--moe-router-topk", "2", "--moe-ffn-hidden-size", "256", "--moe-layer-freq", "[1,1]",
           "--moe-token-dispatcher-type", "alltoall", "--train-iters", "8", "--log-interval", "1",
           "--lr-warmup-iters", "2"]
    gpu = train(tmp_path, "gpu", moe + ROUTING[routing], base=fp32)
    cpu = train(tmp_path, "cpu", moe + ROUTING[routing] + ["--moe-token-dispatcher-type", "allgather"],
                base=[("cpu" if f == "cuda" else f) for f in fp32])
    plain = train(tmp_path, "plain", moe, base=fp32)
    for name, run in (("gpu", gpu), ("cpu", cpu), ("plain", plain)):
        print(f"{name:5s}", [(round(h["loss"], 5), round(h["moe_load_balancing_loss"], 4)) for h in run])
    assert [h["step"] for h in gpu] == [h["step"] for h in cpu] == list(range(1, 9))
    for a, b in zip(gpu, cpu):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-3), (a["step"], a["loss"], b["loss"])
        assert a["moe_load_balancing_loss"] == pytest.approx(b["moe_load_balancing_loss"], rel=5e-3), a["step"]
    for key in ("loss", "moe_load_balancing_loss"):
        assert _max_rel_gap(gpu, plain, key) > 5 * _max_rel_gap(gpu, cpu, key), key


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_gpu_moe_two_gpu_layouts_match_one(tmp_path, own_inductor_cache):
    """2 GPUs on the Megatron engine: DP=2, DP=2 with the experts split (EP=2: the alltoall
    dispatcher sends tokens to the other GPU's experts; Megatron's DDP reduces expert
    gradients over their expert-data-parallel group) and TP=2 + SP train like one GPU (bf16:
    other sum orders), with the same logged balance; an EP=2 checkpoint resumes exactly, and
    its export (convert_checkpoint from-megatron, dist_checkpointing resharding the experts)
    gives one GPU the weights the EP=2 run fine-tunes from."""
    os.environ.setdefault("MEGATRON_FOX_CACHE", str(tmp_path / "cache"))
    ep = ["--expert-model-parallel-size", "2"]
    one = train(tmp_path, "one", MOE)
    runs = {"dp2": train(tmp_path, "dp2", MOE, world=2), "ep2": train(tmp_path, "ep2", MOE + ep, world=2),
            "tp2_sp": train(tmp_path, "tp2", MOE + ["--tensor-model-parallel-size", "2", "--sequence-parallel"],
                            world=2)}
    print("one   ", [round(h["loss"], 4) for h in one])
    for name, run in runs.items():
        print(f"{name:6s}", [round(h["loss"], 4) for h in run])
        for a, b in zip(one, run):
            assert b["loss"] == pytest.approx(a["loss"], rel=1e-2), (name, a["step"], a["loss"], b["loss"])
            assert b["moe_load_balancing_loss"] == pytest.approx(a["moe_load_balancing_loss"], rel=2e-2), name
    ckpt = tmp_path / "ckpt"
    train(tmp_path, "first", MOE + ep + ["--exit-interval", "10", "--save", str(ckpt)], world=2)
    rest = train(tmp_path, "rest", MOE + ep + ["--load", str(ckpt)], world=2)
    assert [h["step"] for h in rest] == list(range(11, 21))
    for a, b in zip(runs["ep2"][10:], rest):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4), (a["step"], a["loss"], b["loss"])
    weights = export(tmp_path, ckpt, MOE)
    assert any(".local_experts.3." in k for k in torch.load(weights))
    short = ["--train-iters", "3", "--lr-warmup-iters", "1"]
    tuned = train(tmp_path, "tuned", MOE + ep + short + ["--load", str(ckpt), "--finetune"], world=2)
    pre = train(tmp_path, "pre", MOE + short + ["--pretrained-checkpoint", str(weights)])
    assert tuned[0]["loss"] < one[0]["loss"] - 0.5
    for a, b in zip(pre, tuned):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-2), (a["step"], a["loss"], b["loss"])


@pytest.mark.skipif(torch.cuda.device_count() < 4, reason="needs 4 GPUs")
def test_gpu_moe_expert_and_tensor_parallel_grad_norm_matches_one(tmp_path):
    """EP=2 beside TP=2 + SP on 4 GPUs (expert tensor parallel = TP, so the experts' grads
    sit on TP x EP ranks and the dense ones on TP ranks): the logged gradient norm, which
    Megatron-Core sums over both kinds of shards (Megatron-LM PR 5916 fixed an undercount
    there), and the losses equal one GPU's, float32; with --clip-grad 0.05 every step clips,
    so a wrong norm changes the updates."""
    os.environ.setdefault("MEGATRON_FOX_CACHE", str(tmp_path / "cache"))
    fp32 = [f for f in FLAGS if f != "--bf16"]
    flags = MOE + ["--train-iters", "8", "--log-interval", "1", "--clip-grad", "0.05"]
    one = train(tmp_path, "one", flags, base=fp32)
    four = train(tmp_path, "four", flags + ["--expert-model-parallel-size", "2", "--tensor-model-parallel-size", "2",
                                            "--sequence-parallel"], world=4, base=fp32)
    print("one ", [(round(h["loss"], 5), round(h["grad_norm"], 5)) for h in one])
    print("four", [(round(h["loss"], 5), round(h["grad_norm"], 5)) for h in four])
    assert all(h["grad_norm"] > 0.05 for h in one)
    for a, b in zip(one, four):
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-3), (a["step"], a["grad_norm"], b["grad_norm"])
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-3), (a["step"], a["loss"], b["loss"])


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_gpu_uneven_pipeline_matches_one_gpu_and_resumes(tmp_path):
    """PP=2 with 1 + 3 layers (--decoder-first-pipeline-num-layers 1) through Megatron's
    pipeline schedule trains like one GPU (float32); its dist_checkpointing checkpoint
    resumes exactly and exports the weights one GPU continues from alike."""
    os.environ.setdefault("MEGATRON_FOX_CACHE", str(tmp_path / "cache"))
    fp32 = [f for f in FLAGS if f != "--bf16"]
    flags = ["--num-layers", "4", "--train-iters", "10", "--log-interval", "1"]
    pp = ["--pipeline-model-parallel-size", "2", "--decoder-first-pipeline-num-layers", "1"]
    one = train(tmp_path, "one", flags, base=fp32)
    two = train(tmp_path, "two", flags + pp, world=2, base=fp32)
    print("one", [round(h["loss"], 5) for h in one])
    print("two", [round(h["loss"], 5) for h in two])
    for a, b in zip(one, two):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4), (a["step"], a["loss"], b["loss"])
    ckpt = tmp_path / "ckpt"
    train(tmp_path, "first", flags + pp + ["--exit-interval", "5", "--save", str(ckpt)], world=2, base=fp32)
    rest = train(tmp_path, "rest", flags + pp + ["--load", str(ckpt)], world=2, base=fp32)
    assert [h["step"] for h in rest] == list(range(6, 11))
    for a, b in zip(two[5:], rest):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5), (a["step"], a["loss"], b["loss"])
    weights = export(tmp_path, ckpt, ["--num-layers", "4", "--no-bf16"])  # float32 weights, as trained
    short = ["--num-layers", "4", "--train-iters", "2", "--log-interval", "1"]
    pre = train(tmp_path, "pre", short + ["--pretrained-checkpoint", str(weights)], base=fp32)
    tuned = train(tmp_path, "tuned", short + pp + ["--load", str(ckpt), "--finetune"], world=2, base=fp32)
    for a, b in zip(pre, tuned):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4), (a["step"], a["loss"], b["loss"])


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_gpu_data_parallel_overlap_matches_plain(tmp_path, own_inductor_cache):
    """DP=2: --overlap-grad-reduce --overlap-param-gather (small buckets, so several) give
    the losses and validation losses of the plain run (one bucket) to rounding; a checkpoint
    saved mid-run with the update not yet gathered (the hooks would gather it in the next
    forward) resumes exactly. Several buckets save the optimizer state dp_reshardable
    (megatron_engine._optimizer_sharding): with fully_reshardable the step after the load
    jumped (5.53 -> 7.16)."""
    os.environ.setdefault("MEGATRON_FOX_CACHE", str(tmp_path / "cache"))
    common = ["--train-iters", "20", "--split", "90,10,0", "--eval-interval", "10", "--eval-iters", "2"]
    overlap = ["--overlap-grad-reduce", "--overlap-param-gather", "--ddp-bucket-size", "100000"]
    plain = train(tmp_path, "plain", common, world=2)
    over = train(tmp_path, "overlap", common + overlap, world=2)
    ckpt = tmp_path / "ckpt"
    first = train(tmp_path, "first", common + overlap + ["--exit-interval", "10", "--save", str(ckpt)], world=2)
    rest = train(tmp_path, "rest", common + overlap + ["--load", str(ckpt)], world=2)
    losses = [h["loss"] for h in plain]
    assert sum(losses[-5:]) / 5 < losses[0] - 0.5, losses
    for name, run, steps in (("overlap", over, plain), ("first", first, plain[:10]), ("resumed", rest, plain[10:])):
        assert [h["step"] for h in run] == [h["step"] for h in steps], name
        for a, b in zip(steps, run):
            assert b["loss"] == pytest.approx(a["loss"], rel=1e-4), (name, a["step"], a["loss"], b["loss"])
            if "valid_loss" in a:
                assert b["valid_loss"] == pytest.approx(a["valid_loss"], rel=1e-4), (name, a["step"])


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_gpu_torchrun_sigterm_two_ranks(tmp_path):
    """launch/torchrun.sh, 2 GPUs (DP=2, NCCL): SIGTERM to torchrun reaches both ranks, which
    agree through --exit-signal-handler's per-step all-reduce to stop after the same step,
    save that step with the distributed optimizer and exit 0; the run resumes from it. torchrun
    itself exits 1 (its agent re-raises the signal once the ranks are done), so the test reads
    the checkpoint rather than torchrun's code."""
    os.environ.setdefault("MEGATRON_FOX_CACHE", str(tmp_path / "cache"))
    ckpt = tmp_path / "ckpt"
    env = dict(tool_env(), GPUS_PER_NODE="2", MASTER_PORT=str(free_port()))
    flags = [*FLAGS, "--train-iters", "400", "--log-interval", "1", "--save", str(ckpt), "--exit-signal-handler"]
    proc, out = sigterm_at_step(["bash", os.path.join(ROOT, "launch", "torchrun.sh"), *flags], 3, env, tmp_path)
    assert "DP 2" in out and "exit requested (SIGTERM)" in out, out[-3000:]
    stopped = int((ckpt / "latest_checkpointed_iteration.txt").read_text())
    assert 3 <= stopped < 400 and (ckpt / f"iter_{stopped:07d}").is_dir()
    rest = train(tmp_path, "rest", ["--train-iters", "400", "--exit-interval", str(stopped + 2), "--load", str(ckpt)],
                 world=2)
    assert [h["step"] for h in rest] == [stopped + 1, stopped + 2]


@pytest.mark.parametrize("world,layout", [(1, []), (2, ["--context-parallel-size", "2"]),
                                          (2, ["--context-parallel-size", "2", "--cp-comm-type", "a2a"])],
                         ids=["one", "cp2_p2p", "cp2_a2a"])
def test_gpu_steps_leave_no_tensors_in_reference_cycles(tmp_path, world, layout):
    """The CUDA path (its own streams, pinned tables, Megatron DDP): no tensor made by a step
    after the first is left in a reference cycle for a garbage collection to free (the ring's
    one held ~1 GB a step at 64k, CP=2)."""
    if torch.cuda.device_count() < world:
        pytest.skip(f"needs {world} GPUs")
    os.environ.setdefault("MEGATRON_FOX_CACHE", str(tmp_path / "cache"))
    found = tmp_path / "cyclic.pt"
    launch("train", world, {"flags": FLAGS + layout + ["--train-iters", "4"], "out": str(tmp_path / "h.pt"),
                            "cyclic_tensors": str(found)}, timeout=600)
    counts = torch.load(found)
    assert len(counts) == 4 and counts[1:] == [0, 0, 0], counts


def test_gpu_step_diagnostics_leave_the_losses_and_count_zeros(tmp_path):
    """Megatron-LM's step diagnostics on the Megatron engine: --log-num-zeros-in-grad (counted
    by Megatron's optimizer over the distributed optimizer's float32 grads), the emptying of
    the CUDA cache between forward-backward and the update (--empty-unused-memory-level 2),
    the CUDA profiler-API window (--profile, what nsys --capture-range=cudaProfilerApi reads),
    the allocator's history (--record-memory-history) and the torch profiler's trace: the losses equal the plain run's; with untied embeddings
    every vocabulary row the step's 128 tokens miss has a zero gradient."""
    os.environ.setdefault("MEGATRON_FOX_CACHE", str(tmp_path / "cache"))
    small = ["--seq-length", "64", "--micro-batch-size", "1", "--global-batch-size", "2", "--train-iters", "6",
             "--log-interval", "1", "--untie-embeddings-and-output-weights"]
    plain = train(tmp_path, "plain", small)
    tb = tmp_path / "tb"
    snapshot = tmp_path / "snap.pickle"
    diag = train(tmp_path, "diag", small + ["--log-num-zeros-in-grad", "--empty-unused-memory-level", "2",
                                            "--profile", "--profile-step-start", "1", "--profile-step-end", "3",
                                            "--record-memory-history", "--memory-snapshot-path", str(snapshot)])
    traced = train(tmp_path, "traced", small + ["--profile", "--use-pytorch-profiler", "--profile-step-start", "2",
                                                "--profile-step-end", "4", "--tensorboard-dir", str(tb)])
    for name, run in (("diag", diag), ("traced", traced)):
        assert [h["step"] for h in run] == [h["step"] for h in plain], name
        for a, b in zip(plain, run):
            assert b["loss"] == pytest.approx(a["loss"], rel=1e-4), (name, a["step"], a["loss"], b["loss"])
    vocab, hidden = 1024, 128
    for h in diag:
        assert (vocab - 128) * hidden <= h["num_zeros_in_grad"] < 2_000_000, h
    import pickle

    with open(snapshot, "rb") as f:  # --record-memory-history: the allocator's state and its history
        snap = pickle.load(f)
    assert snap["segments"] and any(t for t in snap["device_traces"]), list(snap)
    traces = sorted(tb.glob("rank0.*.pt.trace.json"))
    assert len(traces) == 1, traces
    events = json.loads(traces[0].read_text())["traceEvents"]
    assert any(e.get("cat") == "kernel" for e in events)  # CUDA activity recorded
    assert any(e.get("name", "").startswith("aten::") for e in events)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_gpu_weight_hash_check_with_deferred_param_gather(tmp_path):
    """DP=2 with the distributed optimizer and --overlap-param-gather: after a step each rank
    holds only its own shard of the update until the next forward gathers it, so the weight
    hash check (--check-weight-hash-across-dp-replicas-interval) must finish that gather
    first (MegatronEngine.params_synced); the checked run passes and trains like the
    unchecked one."""
    os.environ.setdefault("MEGATRON_FOX_CACHE", str(tmp_path / "cache"))
    common = ["--train-iters", "6", "--log-interval", "1", "--overlap-grad-reduce", "--overlap-param-gather",
              "--ddp-bucket-size", "100000"]
    plain = train(tmp_path, "plain", common, world=2)
    checked = train(tmp_path, "checked", common + ["--check-weight-hash-across-dp-replicas-interval", "2"], world=2)
    assert [h["step"] for h in checked] == [h["step"] for h in plain] == list(range(1, 7))
    for a, b in zip(plain, checked):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4), (a["step"], a["loss"], b["loss"])


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_gpu_fully_parallel_checkpoint_and_deterministic_mode(tmp_path):
    """DP=2 under --deterministic-mode: a checkpoint written with --ckpt-fully-parallel-save
    (the replicated weights' writes spread over both ranks, the plan kept with
    --ckpt-assume-constant-structure, saved twice) and read with --ckpt-fully-parallel-load
    resumes to the uninterrupted run's losses; the saving run's steps equal the uninterrupted
    run's bit for bit (deterministic)."""
    os.environ.setdefault("MEGATRON_FOX_CACHE", str(tmp_path / "cache"))
    common = ["--train-iters", "10", "--log-interval", "1", "--deterministic-mode"]
    full = train(tmp_path, "full", common, world=2)
    ckpt = tmp_path / "ckpt"
    first = train(tmp_path, "first", common + ["--exit-interval", "6", "--save", str(ckpt), "--save-interval", "3",
                                               "--ckpt-fully-parallel-save", "--ckpt-assume-constant-structure"],
                  world=2)
    assert (ckpt / "iter_0000003").is_dir() and (ckpt / "iter_0000006").is_dir()
    assert [h["loss"] for h in first] == [h["loss"] for h in full[:6]]
    rest = train(tmp_path, "rest", common + ["--load", str(ckpt), "--ckpt-fully-parallel-load"], world=2)
    assert [h["step"] for h in rest] == list(range(7, 11))
    for a, b in zip(full[6:], rest):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4), (a["step"], a["loss"], b["loss"])


def test_gpu_decoupled_lr_equals_cpu_engine(tmp_path):
    """--decoupled-lr on the Megatron engine (Megatron-Core's own group for the embedding and
    output layers, its max_lr / min_lr) trains like the CPU engine (megatron_fox's groups),
    float32; the run without it is at least 5x farther away."""
    os.environ.setdefault("MEGATRON_FOX_CACHE", str(tmp_path / "cache"))
    fp32 = [f for f in FLAGS if f != "--bf16"]
    flags = ["--train-iters", "8", "--log-interval", "1", "--lr-warmup-iters", "2"]
    own = ["--decoupled-lr", "3e-2", "--decoupled-min-lr", "1e-3"]
    gpu = train(tmp_path, "gpu", flags + own, base=fp32)
    cpu = train(tmp_path, "cpu", flags + own, base=[("cpu" if f == "cuda" else f) for f in fp32])
    plain = train(tmp_path, "plain", flags, base=fp32)
    gap = max(abs(a["loss"] - b["loss"]) for a, b in zip(gpu, cpu))
    assert gap < 1e-3 * gpu[0]["loss"], [(a["loss"], b["loss"]) for a, b in zip(gpu, cpu)]
    assert max(abs(a["loss"] - b["loss"]) for a, b in zip(gpu, plain)) > 5 * gap


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_gpu_fused_cross_entropy_trains_like_plain(tmp_path):
    """--cross-entropy-loss-fusion on the Megatron engine, TP=2 (the vocabulary split over
    the GPUs, so Megatron-Core's fused vocab-parallel kernel reduces across them): float32
    losses equal the plain cross entropy's to 1e-4 at every step, bit-near at the first."""
    os.environ.setdefault("MEGATRON_FOX_CACHE", str(tmp_path / "cache"))
    fp32 = [f for f in FLAGS if f != "--bf16"]
    flags = ["--train-iters", "6", "--log-interval", "1", "--tensor-model-parallel-size", "2"]
    plain = train(tmp_path, "plain", flags, world=2, base=fp32)
    fused = train(tmp_path, "fused", flags + ["--cross-entropy-loss-fusion"], world=2, base=fp32)
    print("plain", [h["loss"] for h in plain], "fused", [h["loss"] for h in fused])
    assert fused[0]["loss"] == pytest.approx(plain[0]["loss"], rel=1e-6, abs=0)
    assert len(fused) == len(plain) == 6
    for a, b in zip(plain, fused):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4, abs=0), (a["step"], a["loss"], b["loss"])
