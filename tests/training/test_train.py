"""The training entry point on CPU: config errors, loss falls, resume, TP=2 / PP=2 runs."""

import math
import os
import subprocess
import sys

import pytest
import torch

from .workers import ROOT, free_port, launch, run_python, sigterm_at_step, tool_env

TINY = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4", "--ffn-hidden-size", "128",
        "--seq-length", "64", "--micro-batch-size", "2", "--global-batch-size", "4", "--lr", "3e-3",
        "--lr-warmup-iters", "5", "--log-interval", "10", "--no-progress-bar", "--device", "cpu",
        "--default-corpus-bytes", "400000", "--default-vocab-size", "512", "--split", "100,0,0",
        "--make-vocab-size-divisible-by", "64"]


# the plain-PyTorch attention (no Triton interpreter: ~15 s a step less) for command-line runs
# whose attention only feeds what the test checks (a checkpoint, the trainer's own logic); the
# kernels are checked against the reference in tests/ops and tests/parallel, and here the tools'
# evaluations (generate --check, eval_positions), the run past non-finite values and the
# --exit-duration-in-mins step still run them
PLAIN = {"TRITON_INTERPRET": "0"}


def train(tmp_path, name, flags, world=1):
    out = tmp_path / f"{name}.pt"
    launch("train", world, {"flags": TINY + flags, "out": str(out)})
    return torch.load(out)


def test_loss_falls_over_50_steps(cache, tmp_path):
    hist = train(tmp_path, "fall", ["--train-iters", "50", "--tensorboard-dir", str(tmp_path / "tb"),
                                    "--tensorboard-log-interval", "2"])
    losses = [h["loss"] for h in hist]
    assert len(losses) == 50
    first, last = losses[0], sum(losses[-10:]) / 10
    assert first > 5.5  # ~log(512) at init
    assert last < first - 1.0, (first, last)  # measured here: 6.24 -> 4.92
    assert 0.0 < hist[-1]["acp_skipped"] < 1.0
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    loss = events.Scalars("train/loss")  # every --tensorboard-log-interval steps, the logged losses
    assert [e.step for e in loss] == list(range(2, 51, 2))
    assert [e.value for e in loss] == pytest.approx([h["loss"] for h in hist[1::2]], rel=1e-6)
    assert [e.step for e in events.Scalars("acp/skipped_fraction")] == [10, 20, 30, 40, 50]  # with the log lines


# a stand-in for the wandb package: records init's arguments and every log call, one JSON line each
_FAKE_WANDB = """
import json, os


def _write(entry):
    with open(os.environ["FAKE_WANDB_LOG"], "a") as f:
        f.write(json.dumps(entry) + "\\n")


class _Run:
    def log(self, data, step=None):
        _write({"log": data, "step": step})

    def finish(self):
        _write({"finish": True})


def init(**kwargs):
    _write({"init": {k: kwargs[k] for k in ("project", "name", "entity", "dir")},
            "config_seq_length": kwargs["config"]["seq_length"]})
    return _Run()
"""


def test_wandb_gets_the_tensorboard_scalars(cache, tmp_path, monkeypatch):
    fake = tmp_path / "fake"
    (fake / "wandb").mkdir(parents=True)
    (fake / "wandb" / "__init__.py").write_text(_FAKE_WANDB)
    monkeypatch.setenv("PYTHONPATH", str(fake))
    monkeypatch.setenv("FAKE_WANDB_LOG", str(tmp_path / "wandb.jsonl"))
    hist = train(tmp_path, "wandb", ["--train-iters", "6", "--log-interval", "3", "--tensorboard-log-interval", "2",
                                     "--wandb-project", "fox", "--wandb-exp-name", "run1"])
    import json

    entries = [json.loads(line) for line in (tmp_path / "wandb.jsonl").read_text().splitlines()]
    assert entries[0]["init"] == {"project": "fox", "name": "run1", "entity": None, "dir": None}
    assert entries[0]["config_seq_length"] == 64 and entries[-1] == {"finish": True}
    logged = [(e["step"], *e["log"].items()) for e in entries if "log" in e]
    loss = [(step, value) for step, (name, value) in logged if name == "train/loss"]
    assert [step for step, _ in loss] == [2, 4, 6]
    assert [value for _, value in loss] == pytest.approx([h["loss"] for h in hist[1::2]], rel=1e-6)
    assert [step for step, (name, _) in logged if name == "acp/skipped_fraction"] == [3, 6]


def test_wandb_project_without_the_package_exits_2(tmp_path, monkeypatch):
    shadow = tmp_path / "shadow" / "wandb"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('no wandb here')\n")
    monkeypatch.setenv("PYTHONPATH", str(shadow.parent))
    r = _run_cli(["--wandb-project", "fox"], tmp_path)
    assert r.returncode == 2 and "'wandb_project'" in r.stderr and "pip install wandb" in r.stderr, r.stderr


def test_resume_matches_uninterrupted_run(cache, tmp_path):
    full = train(tmp_path, "full", ["--train-iters", "12"])
    ckpt = tmp_path / "ckpt"
    first = train(tmp_path, "first", ["--train-iters", "12", "--exit-interval", "6", "--save", str(ckpt)])
    assert [h["step"] for h in first] == list(range(1, 7))
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text().strip() == "6"
    rest = train(tmp_path, "rest", ["--train-iters", "12", "--load", str(ckpt)])
    assert [h["step"] for h in rest] == list(range(7, 13))
    for a, b in zip(full[6:], rest):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6, abs=1e-7), (a["step"], a["loss"], b["loss"])


def test_resume_schedule_follows_megatron_lm_rule(cache, tmp_path):
    """On resume the learning-rate schedule must agree with the checkpoint's: a changed --lr
    stops naming the key; --use-checkpoint-opt_param-scheduler takes the checkpoint's (the
    run follows the uninterrupted one), --override-opt_param-scheduler this run's."""
    base = ["--train-iters", "8", "--lr-warmup-iters", "2", "--log-interval", "1"]
    full = train(tmp_path, "full", base)
    ckpt = tmp_path / "ckpt"
    train(tmp_path, "first", base + ["--exit-interval", "4", "--save", str(ckpt)])
    changed = base + ["--lr", "1e-3", "--load", str(ckpt)]
    with pytest.raises(RuntimeError, match="config key 'lr': 0.001 differs from the checkpoint's 0.003: add "
                                           "--override-opt_param-scheduler"):
        train(tmp_path, "changed", changed)
    kept = train(tmp_path, "kept", changed + ["--use-checkpoint-opt_param-scheduler"])
    new = train(tmp_path, "new", changed + ["--override-opt_param-scheduler"])
    assert [h["step"] for h in kept] == [h["step"] for h in new] == [5, 6, 7, 8]
    for a, b in zip(full[4:], kept):
        assert (a["lr"], a["loss"]) == pytest.approx((b["lr"], b["loss"]), rel=1e-6, abs=1e-7), a["step"]
    assert all(b["lr"] == pytest.approx(a["lr"] / 3, rel=1e-6) for a, b in zip(kept, new))
    with pytest.raises(RuntimeError, match="config key 'use_checkpoint_opt_param_scheduler'"):
        train(tmp_path, "both", changed + ["--use-checkpoint-opt_param-scheduler", "--override-opt_param-scheduler"])


def test_ckpt_step_resumes_an_earlier_checkpoint(cache, tmp_path):
    """--ckpt-step 3 loads iter_0000003 although the tracker names 6, and the run goes on as
    the uninterrupted one; a tracker naming a deleted folder, or a step never saved, exits 2
    naming the key."""
    full = train(tmp_path, "full", ["--train-iters", "6"])
    ckpt = tmp_path / "ckpt"
    train(tmp_path, "first", ["--train-iters", "6", "--save", str(ckpt), "--save-interval", "3"])
    rest = train(tmp_path, "rest", ["--train-iters", "6", "--load", str(ckpt), "--ckpt-step", "3"])
    assert [h["step"] for h in rest] == [4, 5, 6]
    for a, b in zip(full[3:], rest):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6, abs=1e-7), (a["step"], a["loss"], b["loss"])
    for name in os.listdir(ckpt / "iter_0000006"):
        os.remove(ckpt / "iter_0000006" / name)
    os.rmdir(ckpt / "iter_0000006")
    for flags, key, says in ((["--load", str(ckpt)], "'load'", "names iteration 6"),
                             (["--load", str(ckpt), "--ckpt-step", "4"], "'ckpt_step'", "iter_0000004 does not exist")):
        r = _run_cli(TINY + ["--train-iters", "6"] + flags, tmp_path)
        assert r.returncode == 2 and key in r.stderr and says in r.stderr, r.stderr[-1500:]


def test_non_persistent_checkpoints_resume_where_newer(cache, tmp_path):
    """--non-persistent-save-interval 3 (global): saved at steps 3 and 6 into
    <save>/non_persistent, only the newest kept, none at step 4 (persistent). A resume takes
    the persistent 7 over the non-persistent 6; after a crash that left the persistent tracker
    at 4 it takes 6, and both runs go on as the uninterrupted one."""
    full = train(tmp_path, "full", ["--train-iters", "10"])
    ckpt = tmp_path / "ckpt"
    non_persistent = ["--non-persistent-ckpt-type", "global"]
    train(tmp_path, "first", ["--train-iters", "10", "--exit-interval", "7", "--save", str(ckpt),
                              "--save-interval", "4", "--non-persistent-save-interval", "3"] + non_persistent)
    np_dir = ckpt / "non_persistent"
    assert sorted(os.listdir(np_dir)) == ["iter_0000006", "latest_checkpointed_iteration.txt"]
    assert (np_dir / "latest_checkpointed_iteration.txt").read_text().strip() == "6"
    assert sorted(n for n in os.listdir(ckpt) if n.startswith("iter_")) == ["iter_0000004", "iter_0000007"]
    persistent = train(tmp_path, "persistent", ["--train-iters", "10", "--load", str(ckpt)] + non_persistent)
    assert [h["step"] for h in persistent] == [8, 9, 10]
    # the crash: step 7's persistent save never happened
    (ckpt / "latest_checkpointed_iteration.txt").write_text("4")
    r = _run_cli(TINY + ["--train-iters", "10", "--load", str(ckpt), "--exit-interval", "7"] + non_persistent,
                 tmp_path, **PLAIN)
    assert r.returncode == 0 and "resuming from the non-persistent checkpoint of iteration 6" in r.stdout, r.stderr
    rest = train(tmp_path, "rest", ["--train-iters", "10", "--load", str(ckpt)] + non_persistent)
    assert [h["step"] for h in rest] == [7, 8, 9, 10]
    ignored = train(tmp_path, "ignored", ["--train-iters", "10", "--load", str(ckpt)])  # no type: --load's only
    assert [h["step"] for h in ignored] == [5, 6, 7, 8, 9, 10]
    for run in (persistent, rest, ignored):
        for b in run:
            a = full[b["step"] - 1]
            assert a["loss"] == pytest.approx(b["loss"], rel=1e-6, abs=1e-7), (a["step"], a["loss"], b["loss"])


def test_rampup_batch_size_trains_and_resumes(cache, tmp_path):
    """--rampup-batch-size 2 2 8 at global batch 4: steps 1-4 take 2 sequences (the same ones,
    at a constant LR, as a run at global batch 2), step 5 on 4; a resume in the ramp
    continues it exactly."""
    common = ["--lr-warmup-iters", "0", "--lr-decay-style", "constant", "--train-iters", "7"]
    ramp = common + ["--rampup-batch-size", "2", "2", "8"]
    full = train(tmp_path, "ramp", ramp)
    assert [h["global_batch_size"] for h in full] == [2, 2, 2, 2, 4, 4, 4]
    small = train(tmp_path, "small", common + ["--global-batch-size", "2", "--train-iters", "4"])
    for a, b in zip(full[:4], small):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6), (a["step"], a["loss"], b["loss"])
    ckpt = tmp_path / "ckpt"
    train(tmp_path, "first", ramp + ["--exit-interval", "3", "--save", str(ckpt)])
    rest = train(tmp_path, "rest", ramp + ["--load", str(ckpt)])
    assert [h["step"] for h in rest] == [4, 5, 6, 7]
    for a, b in zip(full[3:], rest):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6, abs=1e-7), (a["step"], a["loss"], b["loss"])


@pytest.mark.parametrize("flags", [["--tensor-model-parallel-size", "2", "--sequence-parallel"],
                                   ["--pipeline-model-parallel-size", "2"]], ids=["tp2_sp", "pp2"])
def test_two_process_training_matches_single(cache, tmp_path, flags):
    """TP=2 + SP and PP=2 train like one process; the checkpoint's weights load into one
    process (--finetune: its rank files merged, this layout's part taken) as into its own
    layout, and a full resume into another layout stops naming 'load'."""
    common = ["--train-iters", "6", "--num-query-groups", "2", "--log-params-norm", "--log-interval", "3"]
    single = train(tmp_path, "single", common)
    ckpt = tmp_path / "ckpt"
    multi = train(tmp_path, "multi", common + flags + ["--save", str(ckpt)], world=2)
    tune = ["--train-iters", "1", "--num-query-groups", "2", "--load", str(ckpt), "--finetune"]
    same_layout, one = train(tmp_path, "same", tune + flags, world=2), train(tmp_path, "one", tune)
    assert one[0]["loss"] == pytest.approx(same_layout[0]["loss"], rel=1e-5)
    r = _run_cli(TINY + ["--num-query-groups", "2", "--train-iters", "8", "--load", str(ckpt)], tmp_path)
    assert r.returncode == 2 and "'load'" in r.stderr and "another TP/PP/EP layout" in r.stderr, r.stderr[-2000:]
    assert [h["step"] for h in single if "params_norm" in h] == [3, 6]
    for a, b in zip(single, multi):
        assert a["loss"] == pytest.approx(b["loss"], rel=2e-4), (a["step"], a["loss"], b["loss"])
        if "params_norm" in a:  # every shard and stage counted once (training/flops.py)
            assert a["params_norm"] == pytest.approx(b["params_norm"], rel=1e-5), a["step"]
        # the logged model FLOPs count every shard and stage once (training/flops.py)
        assert a["model_flops"] == b["model_flops"] > 0


def _run_cli(args, tmp_path, **env):
    """`python -m megatron_fox.train args` in a process of its own (forked: workers.run_python),
    tool_env() updated by env."""
    return run_python(["-m", "megatron_fox.train", *args], env=dict(tool_env(), **env), cwd=tmp_path, timeout=120)


def _tool(tmp_path, tool, *args, **env):
    """tools/<tool> args in a process of its own, as _run_cli."""
    return run_python([os.path.join(ROOT, "tools", tool), *args], env=dict(tool_env(), **env), cwd=tmp_path,
                      timeout=300)


def _ok(tmp_path, tool, *args, **env) -> str:
    """Run tools/<tool> (or the trainer for tool "train") in a process of its own; its stdout, exit 0 asserted."""
    cmd = ["-m", "megatron_fox.train"] if tool == "train" else [os.path.join(ROOT, "tools", tool)]
    r = run_python([*cmd, *args], env=dict(tool_env(), **env), cwd=tmp_path, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout


@pytest.mark.parametrize("args,key", [
    (["--num-attention-heads", "6", "--hidden-size", "96", "--tensor-model-parallel-size", "4"], "num_attention_heads"),
    (["--seq-length", "100", "--context-parallel-size", "4"], "seq_length"),
    (["--data-path", "/nonexistent/corpus_text_document"], "data_path"),
    (["--data-path", "0.3", "/nonexistent/a", "/nonexistent/b"], "data_path"),
    (["--acp-log-eps", "3"], "acp_log_eps"),
    (["--acp-backward-pruning", "rowmax"], "acp_backward_pruning"),
    (["--cp-comm-type", "ring"], "cp_comm_type"),
    (["--context-parallel-size", "2", "--cp-comm-type", "a2a", "--num-query-groups", "1"], "cp_comm_type"),
    (["--global-batch-size", "3", "--micro-batch-size", "2"], "global_batch_size"),
    (["--num-layers", "4", "--hybrid-layer-pattern", "*-M-"], "hybrid_layer_pattern"),
    (["--recompute-granularity", "selective"], "recompute_granularity"),
    (["--recompute-granularity", "full", "--recompute-num-layers", "3"], "recompute_num_layers"),
    (["--num-layers", "4", "--hybrid-layer-pattern", "*-*"], "hybrid_layer_pattern"),
    (["--overlap-param-gather"], "overlap_param_gather"),
    (["--overlap-grad-reduce", "--overlap-param-gather", "--no-use-distributed-optimizer"], "overlap_param_gather"),
    (["--ddp-bucket-size", "0"], "ddp_bucket_size"),
    (["--train-samples", "64", "--train-iters", "5"], "train_samples"),
    (["--finetune"], "finetune"),
    (["--position-embedding-type", "learned_absolute"], "position_embedding_type"),
    (["--position-embedding-type", "rope", "--rotary-percent", "0"], "rotary_percent"),
    (["--position-embedding-type", "rope", "--no-reset-attention-mask", "--reset-position-ids"], "reset_position_ids"),
    (["--ckpt-step", "3"], "ckpt_step"),
    (["--load", "/tmp", "--ckpt-step", "-1"], "ckpt_step"),
    (["--exit-signal-handler"], "exit_signal_handler"),
    (["--exit-duration-in-mins", "1"], "exit_duration_in_mins"),
    (["--wandb-exp-name", "run1"], "wandb_exp_name"),
    (["--fox-forget-gate-type", "sliding"], "fox_forget_gate_type"),
    (["--timing-log-level", "3"], "timing_log_level"),
    (["--fox-forget-gate-type", "alibi", "--no-fox-forget-gate"], "fox_forget_gate_type"),
    (["--save", "/tmp/x", "--non-persistent-save-interval", "3"], "non_persistent_ckpt_type"),
    (["--non-persistent-save-interval", "3", "--non-persistent-ckpt-type", "global"], "non_persistent_save_interval"),
    (["--non-persistent-ckpt-type", "local"], "non_persistent_ckpt_type"),
    (["--non-persistent-global-ckpt-dir", "/tmp/np"], "non_persistent_global_ckpt_dir"),
    (["--save", "/tmp/x", "--non-persistent-ckpt-type", "global", "--non-persistent-global-ckpt-dir", "/tmp/x"],
     "non_persistent_global_ckpt_dir"),
])
def test_bad_config_exits_2_naming_key(args, key, tmp_path):
    r = _run_cli(args, tmp_path)
    assert r.returncode == 2, r.stderr
    lines = [line for line in r.stderr.strip().splitlines() if line]
    assert len(lines) == 1 and f"'{key}'" in lines[0], r.stderr


def test_unknown_yaml_key_exits_2(tmp_path):
    """A fresh interpreter (not forked, as _run_cli is: nothing its imports print is left out
    of stderr): one line naming the key, exit 2."""
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("num_layers: 2\nnum_layers_typo: 3\n")
    r = subprocess.run([sys.executable, "-m", "megatron_fox.train", "--config", str(cfg)], capture_output=True,
                       text=True, env=tool_env(), cwd=tmp_path, timeout=120)
    assert r.returncode == 2 and "'num_layers_typo'" in r.stderr and len(r.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("flags", [["--cp-comm-type", "p2p"], ["--cp-comm-type", "p2p", "--no-fox-cp-skip-chunks"],
                                   ["--cp-comm-type", "a2a"]])
def test_context_parallel_training_matches_single(cache, tmp_path, flags):
    common = ["--train-iters", "4", "--num-query-groups", "2"]  # packed documents (the default)
    single = train(tmp_path, "single", common)
    multi = train(tmp_path, "cp2", common + ["--context-parallel-size", "2", *flags], world=2)
    for a, b in zip(single, multi):
        assert a["loss"] == pytest.approx(b["loss"], rel=2e-4), (a["step"], a["loss"], b["loss"])


def test_transformer_baseline_trains_alike_over_tp_and_cp(cache, tmp_path):
    """--no-fox-forget-gate --position-embedding-type rope (the Transformer baseline): the loss
    falls, and TP=2 with SP, PP=2 and CP=2 (each rank's rotary positions from GPTModel's
    embedding of the whole sequence) give the single process's losses."""
    common = ["--train-iters", "8", "--log-interval", "4", "--num-query-groups", "2", "--no-fox-forget-gate",
              "--position-embedding-type", "rope"]
    single = train(tmp_path, "single", common)
    assert single[-1]["loss"] < single[0]["loss"] - 0.05
    for name, flags in (("tp2", ["--tensor-model-parallel-size", "2", "--sequence-parallel"]),
                        ("pp2", ["--pipeline-model-parallel-size", "2"]), ("cp2", ["--context-parallel-size", "2"])):
        multi = train(tmp_path, name, common + flags, world=2)
        for a, b in zip(single, multi):
            assert a["loss"] == pytest.approx(b["loss"], rel=2e-4), (name, a["step"], a["loss"], b["loss"])
    # cached decoding and the public FoX format are FoX's: both refuse the baseline, naming the key
    ckpt = tmp_path / "ckpt"
    _ok(tmp_path, "train", *TINY, *common[2:], "--train-iters", "1", "--save", str(ckpt), **PLAIN)
    for tool, args in (("generate.py", ["--load", str(ckpt), "--prompt", "def "]),
                       ("convert_checkpoint.py", ["to-public", "--input", str(ckpt / "x.pt"),
                                                  "--output", str(tmp_path / "y.pt")])):
        r = _tool(tmp_path, tool, *args, *TINY, *common[2:])
        assert r.returncode == 2 and "fox_forget_gate" in r.stderr, (tool, r.stderr[-1500:])
    r = _tool(tmp_path, "convert_checkpoint.py", "to-public", "--input", str(ckpt / "x.pt"), "--output",
              str(tmp_path / "y.pt"), *TINY, "--fox-forget-gate-type", "alibi")
    assert r.returncode == 2 and "fox_forget_gate_type" in r.stderr, r.stderr[-1500:]


def test_data_independent_gate_trains_alike_over_tp_and_cp(cache, tmp_path):
    """From the layout-invariant init (each TP rank's biases from its heads' slopes), TP=2 +
    SP and CP=2 (the per-head log f summed across the ranks' chunks) train like one process;
    the logged forget-gate half-lives are ALiBi's with the fixed gate."""
    flags = ["--fox-forget-gate-type", "data_independent", "--train-iters", "4", "--log-interval", "2",
             "--num-query-groups", "2"]
    one = train(tmp_path, "one", flags)
    for name, extra in (("tp2", ["--tensor-model-parallel-size", "2", "--sequence-parallel"]),
                        ("cp2", ["--context-parallel-size", "2"])):
        two = train(tmp_path, name, flags + extra, world=2)
        for a, b in zip(one, two):
            assert b["loss"] == pytest.approx(a["loss"], rel=2e-4), (name, a["step"], a["loss"], b["loss"])
    # the logged gate half-life: with ALiBi's fixed gates ln 2 / m_h of the 4 heads
    # (m = 2^-2, 2^-4, 2^-6, 2^-8), their median 40 ln 2 in every layer, on one rank and
    # with the heads split over two
    alibi = ["--fox-forget-gate-type", "alibi", "--train-iters", "2", "--log-interval", "1", "--num-query-groups", "2"]
    for name, world, extra in (("alibi", 1, []), ("alibi_tp2", 2, ["--tensor-model-parallel-size", "2"])):
        for h in train(tmp_path, name, alibi + extra, world=world):
            assert h["gate_half_life_by_layer"] == pytest.approx({1: 40 * math.log(2), 2: 40 * math.log(2)}), name
    assert one[-1]["gate_half_life_by_layer"][1] > 0.0


def test_timing_log_level_reports_phases(cache, tmp_path):
    """--timing-log-level 1: each log line's forward-backward and optimizer milliseconds per
    step (every rank's; TensorBoard gets the max over ranks) fit in the step's wall time, which excludes the batch generation;
    --log-timers-to-tensorboard writes them too. Level 0 (the default) reports none."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    flags = ["--train-iters", "4", "--log-interval", "2", "--timing-log-level", "1", "--log-timers-to-tensorboard",
             "--tensorboard-dir", str(tmp_path / "tb")]
    hist = train(tmp_path, "timed", flags, world=2)
    logged = [h for h in hist if "timers_ms" in h]
    assert [h["step"] for h in logged] == [2, 4]
    for h in logged:
        t = h["timers_ms"]
        assert set(t) == {"batch-generator", "forward-backward", "optimizer"} and all(v > 0 for v in t.values()), t
        by_rank = h["timers_ms_by_rank"]  # both ranks' values; the logged figure is their max
        assert all(len(v) == 2 and max(v) == t[name] for name, v in by_rank.items()), by_rank
        step_ms = 1e3 * h["global_batch_size"] * 64 / h["tokens_per_s"]  # this step's wall time (seq 64)
        assert t["forward-backward"] > t["optimizer"] and t["forward-backward"] < 3 * step_ms, (t, step_ms)
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    assert [e.step for e in events.Scalars("timers/forward-backward")] == [2, 4]
    assert all("timers_ms" not in h for h in train(tmp_path, "plain", ["--train-iters", "2", "--log-interval", "1"]))


def test_generate_cli_loads_a_trained_checkpoint(tmp_path, cache):
    """tools/generate.py on a checkpoint of 3 steps (trained with the plain attention): it
    generates from the prompt, and --check (cached decoding against the full forward, both
    through the kernels) passes; a bad --max-length exits 2."""
    ckpt = tmp_path / "ckpt"
    _ok(tmp_path, "train", *TINY, "--train-iters", "3", "--save", str(ckpt), **PLAIN)
    gen = _tool(tmp_path, "generate.py", *TINY, "--load", str(ckpt), "--prompt", "def main(", "--max-new-tokens", "8",
                "--evict-log-eps", "-10", "--check")
    assert gen.returncode == 0, gen.stderr[-2000:]
    assert gen.stdout.startswith("def main(")
    assert "checkpoint step 3" in gen.stderr and "cached keys per layer" in gen.stderr and "[check:" in gen.stderr
    bad = _tool(tmp_path, "generate.py", *TINY, "--load", str(ckpt), "--prompt", "x", "--max-new-tokens", "8",
                "--max-length", "0")
    assert bad.returncode == 2 and "max_length" in bad.stderr


def test_convert_then_train_from_pretrained_checkpoint(tmp_path, cache):
    """tools/convert_checkpoint.py on a public-format file, then one training step from it
    with lr 0: the saved weights are exactly the converted ones."""
    from megatron_fox.checkpoint.public_fox import FoxLayout, from_public_fox

    from checkpoint.test_public_fox import random_public_state  # tests/ is on sys.path (rootdir conftest)

    public = random_public_state(shared_qk_norm=True, vocab=512)
    torch.save(public, tmp_path / "pytorch_model.bin")
    model_flags = [*TINY, "--untie-embeddings-and-output-weights", "--ffn-hidden-size", "96"]
    _ok(tmp_path, "convert_checkpoint.py", "from-public", "--input", str(tmp_path), "--output", str(tmp_path / "fox.pt"),
        *model_flags)
    _ok(tmp_path, "train", *model_flags, "--pretrained-checkpoint", str(tmp_path / "fox.pt"), "--train-iters", "1",
        "--lr", "0", "--min-lr", "0", "--save", str(tmp_path / "ckpt"), **PLAIN)
    saved = torch.load(tmp_path / "ckpt" / "iter_0000001" / "mp_rank_00_000.pt", weights_only=False)["model"]
    expected = from_public_fox(public, FoxLayout(2, 4, 4, 16, tied=False))
    for name, t in expected.items():
        assert torch.equal(saved[name], t), name
    bad = _run_cli([*TINY, "--pretrained-checkpoint", str(tmp_path / "fox.pt"), "--train-iters", "1"], tmp_path)
    assert bad.returncode == 2 and "pretrained_checkpoint" in bad.stderr


@pytest.mark.parametrize("engine", [[], ["--deepspeed", "--zero-stage", "1"]], ids=["plain", "deepspeed"])
def test_non_finite_loss_or_gradient_stops_the_run(cache, tmp_path, engine):
    """--check-for-nan-in-loss-and-grad (on by default, as in Megatron-LM): weights of std 1e30
    overflow the first step; the run stops there with exit 1 naming the step and the key,
    writes no checkpoint of it (the plain engine before the update; ZeRO knows its gradient
    norm only after it); with --no-check-for-nan-in-loss-and-grad it runs on."""
    if engine:
        pytest.importorskip("deepspeed")
    flags = [*TINY, *engine, "--train-iters", "2", "--init-method-std", "1e30", "--save", str(tmp_path / "ck"),
             "--save-interval", "1"]
    r = _run_cli(flags, tmp_path, **PLAIN)
    assert r.returncode == 1 and "step 1:" in r.stderr and "'check_for_nan_in_loss_and_grad'" in r.stderr, \
        r.stderr[-1500:]
    assert "nan" in r.stderr.lower() or "inf" in r.stderr.lower()
    assert not (tmp_path / "ck" / "iter_0000001").exists()
    if not engine:
        r = _run_cli(flags + ["--no-check-for-nan-in-loss-and-grad"], tmp_path)  # the kernels take them too
        assert r.returncode == 0, r.stderr[-1500:]


def test_finetune_and_no_load_optim(cache, tmp_path):
    """--load with --finetune: the weights only, from step 0 with a fresh optimizer, so the
    run equals one from the same weights as a --pretrained-checkpoint file (exported by
    tools/convert_checkpoint.py from-megatron). --no-load-optim: the saved step and weights
    with a fresh optimizer: its first loss (before any update) is the resumed run's, later
    ones are not."""
    ckpt = tmp_path / "ckpt"
    train(tmp_path, "base", ["--train-iters", "6", "--save", str(ckpt)])
    _ok(tmp_path, "convert_checkpoint.py", "from-megatron", "--input", str(ckpt), "--output", str(tmp_path / "full.pt"),
        *TINY)
    more = ["--train-iters", "4", "--lr-warmup-iters", "0"]
    tuned = train(tmp_path, "tuned", more + ["--load", str(ckpt), "--finetune"])
    pretrained = train(tmp_path, "pretrained", more + ["--pretrained-checkpoint", str(tmp_path / "full.pt")])
    assert [h["step"] for h in tuned] == [1, 2, 3, 4]
    for a, b in zip(tuned, pretrained):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6, abs=1e-7), (a["step"], a["loss"], b["loss"])
    # 3 more steps than the checkpoint's run: its LR decay stretched, as Megatron-LM asks to say
    resumed = train(tmp_path, "resumed", ["--train-iters", "9", "--load", str(ckpt), "--override-opt_param-scheduler"])
    # that run also saves without its optimizer and RNG state (--no-save-optim/-rng)
    slim = tmp_path / "slim"
    fresh_optim = train(tmp_path, "fresh_optim", ["--train-iters", "9", "--load", str(ckpt), "--no-load-optim",
                                                  "--save", str(slim), "--no-save-optim", "--no-save-rng"])
    assert [h["step"] for h in fresh_optim] == [7, 8, 9]
    assert fresh_optim[0]["loss"] == pytest.approx(resumed[0]["loss"], rel=1e-6)
    assert abs(fresh_optim[2]["loss"] - resumed[2]["loss"]) > 1e-4  # Adam's moments mattered
    full_file, slim_file = ckpt / "iter_0000006" / "mp_rank_00_000.pt", slim / "iter_0000009" / "mp_rank_00_000.pt"
    assert set(torch.load(slim_file, weights_only=False)) == {"model", "iteration", "layout"}
    assert slim_file.stat().st_size < 0.5 * full_file.stat().st_size  # Adam's two moments per weight left out
    with pytest.raises(RuntimeError, match="config key 'load_optim': .*--no-save-optim"):
        train(tmp_path, "no_optim", ["--train-iters", "10", "--load", str(slim)])
    with pytest.raises(RuntimeError, match="config key 'load_rng'"):
        train(tmp_path, "no_rng", ["--train-iters", "10", "--load", str(slim), "--no-load-optim"])
    cont = train(tmp_path, "cont", ["--train-iters", "10", "--load", str(slim), "--no-load-optim", "--no-load-rng"])
    assert [h["step"] for h in cont] == [10]


@pytest.mark.parametrize("world,layout", [
    (1, []), (1, ["--fox-context-pruning"]), (1, ["--num-experts", "4", "--moe-ffn-hidden-size", "64"]),
    (2, ["--context-parallel-size", "2"]),
    (2, ["--context-parallel-size", "2", "--cp-comm-type", "a2a"]),
    (2, ["--tensor-model-parallel-size", "2", "--sequence-parallel"]), (2, ["--pipeline-model-parallel-size", "2"])],
    ids=["one", "context_pruning", "moe", "cp2_p2p", "cp2_a2a", "tp2_sp", "pp2"])
def test_steps_leave_no_tensors_in_reference_cycles(cache, tmp_path, world, layout):
    """No tensor made by a training step (after the first) is left in a reference cycle, to
    be freed only by a garbage collection: the ring once kept each layer's q so (CP=2 at
    64k on the GPU: ~1 GB a step until a full collection came)."""
    found = tmp_path / "cyclic.pt"
    launch("train", world, {"flags": TINY + layout + ["--train-iters", "4"], "out": str(tmp_path / "h.pt"),
                            "cyclic_tensors": str(found)})
    counts = torch.load(found)
    assert len(counts) == 4 and counts[1:] == [0, 0, 0], counts


def test_manual_gc_collects_at_the_steps_megatron_lm_does(cache, tmp_path):
    """--manual-gc: no automatic collection during the run, a full one at its start, after
    every manual_gc_interval-th step and before each evaluation (a young-generation one
    after it); the collector is on again after the run. Without the flag the same run
    collects automatically between its steps."""
    flags = ["--train-iters", "4", "--eval-interval", "2", "--eval-iters", "1", "--split", "90,10,0"]
    events = {}
    for name, extra in (("manual", ["--manual-gc", "--manual-gc-interval", "2"]), ("auto", [])):
        launch("train", 1, {"flags": TINY + flags + extra, "out": str(tmp_path / f"{name}.pt"),
                            "gc_events": str(tmp_path / f"{name}_gc.pt")})
        events[name] = torch.load(tmp_path / f"{name}_gc.pt")
    # from the run's start (its first collection with the collector off) to its end
    manual = events["manual"]
    run = manual[next(i for i, e in enumerate(manual) if e[0] == "collect" and not e[2]):]
    full, eval_pass = ("collect", 2, False), [("collect", 2, False), ("collect", 0, False)]
    assert run == [full, ("step", 1, False), ("step", 2, False), full, *eval_pass,
                   ("step", 3, False), ("step", 4, False), full, *eval_pass, ("after", True)], manual
    auto = events["auto"]
    steps = [i for i, e in enumerate(auto) if e[0] == "step"]
    assert all(auto[i][2] for i in steps) and auto[-1] == ("after", True)
    assert any(e[0] == "collect" and e[2] for e in auto[steps[0]:steps[-1]]), auto


def test_sigterm_saves_and_exits_then_resumes(cache, tmp_path):
    """--exit-signal-handler: SIGTERM mid-run (as SLURM sends before the time limit) saves at
    the end of the current step and exits 0; resuming from that checkpoint gives the losses
    of a run that was never stopped."""
    import re

    ckpt = tmp_path / "ckpt"
    flags = [*TINY, "--train-iters", "400", "--log-interval", "1", "--save", str(ckpt), "--exit-signal-handler"]
    # a fresh interpreter (its output read as it comes), the plain attention
    proc, out = sigterm_at_step([sys.executable, "-m", "megatron_fox.train", *flags], 3, dict(tool_env(), **PLAIN),
                                tmp_path)
    assert proc.returncode == 0, out[-3000:]
    stopped = int((ckpt / "latest_checkpointed_iteration.txt").read_text())
    assert 3 <= stopped < 400 and f"step {stopped:6d} | exit requested (SIGTERM)" in out, out[-3000:]
    assert not re.search(rf"step +{stopped + 1} \|", out)  # it stopped after that step
    end = ["--train-iters", "400", "--exit-interval", str(stopped + 3)]
    rest = train(tmp_path, "rest", end + ["--load", str(ckpt)])
    whole = train(tmp_path, "whole", end)
    assert [h["step"] for h in rest] == [stopped + 1, stopped + 2, stopped + 3]
    for a, b in zip(whole[stopped:], rest):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6, abs=1e-7), (a["step"], a["loss"], b["loss"])


def test_torchrun_launcher_two_ranks_sigterm(cache, tmp_path):
    """launch/torchrun.sh with 2 CPU ranks (DP=2): SIGTERM to torchrun is forwarded to the
    ranks, which (--exit-signal-handler) finish their step, save together and exit."""

    ckpt = tmp_path / "ckpt"
    env = dict(tool_env(), GPUS_PER_NODE="2", MASTER_PORT=str(free_port()), TRITON_INTERPRET="0")
    _, out = sigterm_at_step(["bash", os.path.join(ROOT, "launch", "torchrun.sh"), *TINY, "--train-iters", "400",
                               "--log-interval", "1", "--save", str(ckpt), "--exit-signal-handler"], 2, env, tmp_path)
    assert "DP 2" in out, out[-3000:]
    stopped = int((ckpt / "latest_checkpointed_iteration.txt").read_text())
    assert 2 <= stopped < 400 and "exit requested (SIGTERM)" in out, out[-3000:]
    assert (ckpt / f"iter_{stopped:07d}").is_dir()


def test_exit_duration_saves_and_exits(cache, tmp_path):
    """--exit-duration-in-mins: past the deadline the run saves after its current step and
    exits 0 (a deadline of 6 ms passes within the first step). The command-line training step
    here runs the attention kernels (the Triton interpreter)."""
    ckpt = tmp_path / "ckpt"
    r = _run_cli([*TINY, "--train-iters", "50", "--save", str(ckpt), "--exit-duration-in-mins", "0.0001"], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text().strip() == "1"
    assert "exit requested (exit_duration_in_mins)" in r.stdout


def test_validation_loss_is_the_saved_models_loss(cache, tmp_path):
    """--eval-interval: validation every 5 steps and after the last; the last pass's loss
    equals the mean token loss of the same validation batches under the final checkpoint,
    computed by plain model calls in another process."""
    ckpt = tmp_path / "ckpt"
    flags = TINY + ["--train-iters", "12", "--split", "80,20,0", "--eval-interval", "5", "--eval-iters", "2",
                    "--no-reset-attention-mask"]
    hist = train(tmp_path, "run", flags[len(TINY):] + ["--save", str(ckpt)])
    assert [h["step"] for h in hist if "valid_loss" in h] == [5, 10, 12]
    out = tmp_path / "valid.pt"
    launch("valid_loss", 1, {"flags": flags, "ckpt": str(ckpt), "out": str(out)})
    check = torch.load(out)
    assert check["step"] == 12
    assert hist[-1]["valid_loss"] == pytest.approx(check["loss"], rel=1e-6)
    assert hist[4]["valid_loss"] > hist[-1]["valid_loss"]  # training helped on held-out data


def test_eval_positions_acp_against_exact(tmp_path, cache):
    """tools/eval_positions.py: loss by in-document position with ACP on and off on a model
    with fast-forgetting gates (ACP prunes): bins add up, and ACP changes no bin by more
    than a trace."""
    import json

    ckpt, out = tmp_path / "ckpt", tmp_path / "pos.json"
    flags = [*TINY, "--fox-fgate-bias-init", "-3"]
    _ok(tmp_path, "train", *flags, "--train-iters", "3", "--save", str(ckpt), **PLAIN)  # the evaluation: kernels
    _ok(tmp_path, "eval_positions.py", *flags, "--load", str(ckpt), "--dataset", "train", "--eval-samples", "4",
        "--bins", "6", "--compare-acp", "--json", str(out))
    res = json.loads(out.read_text())
    rows, summary = res["rows"], res["summary"]
    assert res["step"] == 3 and rows[0]["positions"][0] == 0 and rows[-1]["positions"][1] == 64
    tokens = sum(r["tokens"] for r in rows)
    assert 0.9 * 4 * 64 <= tokens <= 4 * 64
    for name in ("acp", "exact"):
        mean = sum(r[f"loss_{name}"] * r["tokens"] for r in rows) / tokens
        assert mean == pytest.approx(summary[name], rel=1e-9)
    assert summary["max_abs_diff_by_bin"] < 1e-3


@pytest.mark.parametrize("beta,kept", [(50.0, 1.0), (-50.0, 0.0)])
def test_eval_positions_context_pruning_against_all_kept(tmp_path, cache, beta, kept):
    """tools/eval_positions.py on a model fine-tuned with --fox-context-pruning: hard keep
    decisions (alpha inf). A keep score of +50 keeps every pair, so the loss equals the run
    with every token kept; -50 keeps none but the diagonal, which changes the loss."""
    import json

    ckpt, out = tmp_path / "ckpt", tmp_path / "pos.json"
    flags = [*TINY, "--fox-context-pruning", "--fox-context-pruning-beta-init", str(beta)]
    _ok(tmp_path, "train", *flags, "--train-iters", "2", "--save", str(ckpt), **PLAIN)  # the evaluation: kernels
    _ok(tmp_path, "eval_positions.py", *flags, "--load", str(ckpt), "--dataset", "train", "--eval-samples", "2",
        "--bins", "4", "--compare-context-pruning", "--json", str(out))
    summary = json.loads(out.read_text())["summary"]
    assert summary["kept_pruned"] == kept and "kept_all kept" not in summary
    if kept == 1.0:
        assert summary["pruned"] == pytest.approx(summary["all kept"], rel=1e-6)  # two attention paths
    else:
        assert abs(summary["pruned"] - summary["all kept"]) > 1e-3
    bad = _tool(tmp_path, "eval_positions.py", *TINY, "--load", str(ckpt), "--compare-context-pruning")
    assert bad.returncode == 2 and "--compare-context-pruning" in bad.stderr


def test_use_checkpoint_args(tmp_path, cache):
    """Checkpoints carry the run's flags (iter_N/args.json); --use-checkpoint-args takes the
    model's shape and tokenizer from them (flags given still win), so tools/generate.py needs
    only --load; bad use names the key."""
    import json

    from megatron_fox.training.arguments import ConfigError, parse_args

    ckpt = tmp_path / "ckpt"
    shape = ["--num-query-groups", "2", "--no-fox-kv-shift"]
    hist = train(tmp_path, "run", shape + ["--train-iters", "2", "--save", str(ckpt)])
    assert hist[-1]["step"] == 2
    saved = json.loads((ckpt / "iter_0000002" / "args.json").read_text())
    assert saved["num_query_groups"] == 2 and saved["vocab_size"] == 512 and saved["fox_kv_shift"] is False
    args = parse_args(["--load", str(ckpt), "--use-checkpoint-args", "--device", "cpu"])
    assert (args.num_layers, args.hidden_size, args.ffn_hidden_size, args.num_query_groups) == (2, 64, 128, 2)
    assert args.fox_kv_shift is False and args.default_corpus_bytes == 400000 and args.vocab_size == 512
    assert args.seq_length == parse_args([]).seq_length  # lengths stay this run's choice
    assert parse_args(["--load", str(ckpt), "--use-checkpoint-args", "--num-layers", "3"]).num_layers == 3

    prompt = ["--load", str(ckpt), "--prompt", "def ", "--max-new-tokens", "12"]
    assert (_ok(tmp_path, "generate.py", "--use-checkpoint-args", "--device", "cpu", *prompt)
            == _ok(tmp_path, "generate.py", *TINY, *shape, *prompt))
    outs = [tmp_path / "full0.pt", tmp_path / "full1.pt"]
    for out, flags in zip(outs, (["--use-checkpoint-args"], [*TINY, *shape])):
        _ok(tmp_path, "convert_checkpoint.py", "from-megatron", "--input", str(ckpt), "--output", str(out), *flags)
    a, b = torch.load(outs[0]), torch.load(outs[1])
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ConfigError, match="use_checkpoint_args"):
        parse_args(["--use-checkpoint-args"])
    (ckpt / "iter_0000002" / "args.json").unlink()
    with pytest.raises(ConfigError, match="args.json"):
        parse_args(["--load", str(ckpt), "--use-checkpoint-args"])


def test_test_split_after_training_and_skip_train(tmp_path, cache):
    """With a test share, the test data is evaluated once after the last step (as Megatron-LM);
    --skip-train --load evaluates the saved model at its step, trains nothing, saves nothing,
    and gives the run's own final validation and test losses."""
    ckpt = tmp_path / "ckpt"
    flags = ["--split", "80,10,10", "--eval-interval", "3", "--eval-iters", "2"]
    hist = train(tmp_path, "run", flags + ["--train-iters", "6", "--save", str(ckpt)])
    assert [h["step"] for h in hist if "valid_loss" in h] == [3, 6]
    assert [h["step"] for h in hist if "test_loss" in h] == [6] and hist[-1]["test_loss"] > 0
    cut = train(tmp_path, "cut", flags + ["--train-iters", "6", "--exit-interval", "4"])
    assert [h["step"] for h in cut if "test_loss" in h] == []  # stopped early: no test pass
    ev = train(tmp_path, "eval", flags + ["--train-iters", "6", "--load", str(ckpt), "--skip-train"])
    assert len(ev) == 1 and ev[0]["step"] == 6 and "loss" not in ev[0]
    assert ev[0]["valid_loss"] == pytest.approx(hist[-1]["valid_loss"], rel=1e-6)
    assert ev[0]["test_loss"] == pytest.approx(hist[-1]["test_loss"], rel=1e-6)
    assert ev[0]["test_loss"] != pytest.approx(ev[0]["valid_loss"], rel=1e-6)  # other documents
    assert sorted(p.name for p in ckpt.iterdir()) == ["iter_0000006", "latest_checkpointed_iteration.txt"]


def test_mock_data_null_tokenizer(tmp_path):
    """--mock-data --tokenizer-type NullTokenizer --vocab-size N (Megatron-LM's throughput
    setup): no corpus or tokenizer is built, random ids train from a loss near log(N + 1),
    the end-of-document id N fits the embedding (N a multiple of the padding), two runs give
    the same losses; bad combinations name their key."""
    import math

    from megatron_fox.training.arguments import ConfigError, parse_args
    from megatron_fox.training.data import MockGPTDataset
    from megatron_fox.training.tokenizer import NullTokenizer

    tok = NullTokenizer(128)
    assert (tok.vocab_size, tok.eod, tok.tokenize("3 0 127")) == (129, 128, [3, 0, 127])
    assert tok.detokenize([3, 128, 5]) == "3 5"
    ds = MockGPTDataset(4, 64, 128, seed=1)
    a, b = ds[2], ds[2]
    assert torch.equal(a["tokens"], b["tokens"]) and not torch.equal(ds[1]["tokens"], a["tokens"])
    assert torch.equal(a["tokens"][1:], a["labels"][:-1]) and int(a["tokens"].max()) <= 128
    assert (a["tokens"] == 128).any()  # documents end inside a sample
    assert bool((a["loss_mask"] == 1).all())
    masked = MockGPTDataset(4, 64, 128, seed=1, eod_mask_loss=True)[2]  # --eod-mask-loss
    assert torch.equal(masked["tokens"], a["tokens"])
    assert torch.equal(masked["loss_mask"], (a["tokens"] != 128).float())
    mock = ["--mock-data", "--tokenizer-type", "NullTokenizer", "--vocab-size", "128", "--train-iters", "4",
            "--eval-interval", "4", "--eval-iters", "1", "--split", "98,1,1"]
    env = dict(os.environ, MEGATRON_FOX_CACHE=str(tmp_path / "never"))  # nothing may be built
    runs = []
    for name, extra in (("one", []), ("two", []), ("eod_masked", ["--eod-mask-loss"])):
        out = tmp_path / f"{name}.pt"
        os.environ["MEGATRON_FOX_CACHE"] = env["MEGATRON_FOX_CACHE"]
        launch("train", 1, {"flags": TINY + mock + extra, "out": str(out)})
        runs.append(torch.load(out))
    os.environ.pop("MEGATRON_FOX_CACHE")
    assert not (tmp_path / "never").exists()
    losses = [h["loss"] for h in runs[0]]
    assert abs(losses[0] - math.log(129)) < 0.5 and "valid_loss" in runs[0][-1] and "test_loss" in runs[0][-1]
    assert losses == [h["loss"] for h in runs[1]]
    masked_losses = [h["loss"] for h in runs[2]]  # same batches, the EOD positions left out of the mean
    assert all(math.isfinite(x) for x in masked_losses) and masked_losses[0] != losses[0]
    for suffix in (".bin", ".idx"):
        (tmp_path / f"x{suffix}").write_bytes(b"")
    for flags, key in ((["--mock-data"], "tokenizer_type"),
                       (["--tokenizer-type", "NullTokenizer"], "vocab_size"),
                       (["--mock-data", "--tokenizer-type", "NullTokenizer", "--vocab-size", "8", "--data-path",
                         str(tmp_path / "x")], "mock_data")):
        with pytest.raises(ConfigError, match=f"'{key}'"):
            parse_args(flags)


def test_first_launch_with_save_and_load_the_same(tmp_path, cache):
    """Megatron-LM's auto-resume pattern: --save D --load D on every launch. The first finds
    no checkpoint and starts from scratch (saying so), the next resumes where it stopped;
    --exit-on-missing-checkpoint, --finetune and the tools refuse a directory without one."""
    ckpt = tmp_path / "ckpt"
    # the LR decay given, not derived from --train-iters: the second launch runs longer
    flags = [*TINY, "--save", str(ckpt), "--load", str(ckpt), "--lr-decay-iters", "5"]
    out = _ok(tmp_path, "train", *flags, "--train-iters", "3", **PLAIN)
    assert "no checkpoint in" in out and "starting from scratch" in out
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text().strip() == "3"
    out = _ok(tmp_path, "train", *flags, "--train-iters", "5", **PLAIN)
    assert "starting from scratch" not in out and "start step 3" in out
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text().strip() == "5"
    empty = tmp_path / "empty"
    for cmd in (["-m", "megatron_fox.train", *TINY, "--load", str(empty), "--exit-on-missing-checkpoint"],
                ["-m", "megatron_fox.train", *TINY, "--load", str(empty), "--finetune"],
                [os.path.join(ROOT, "tools", "generate.py"), *TINY, "--load", str(empty), "--prompt", "def "]):
        r = run_python(cmd, cwd=tmp_path)
        assert r.returncode == 2 and "'load'" in r.stderr and "no checkpoint" in r.stderr, r.stderr[-1500:]
