"""Megatron-LM's step diagnostics on the CPU engine: --log-num-zeros-in-grad and --profile
with --use-pytorch-profiler."""

import json

import pytest
import torch

from .test_train import TINY, train

UNTIED = ["--untie-embeddings-and-output-weights", "--train-iters", "3", "--log-interval", "1", "--num-query-groups",
          "2", "--log-num-zeros-in-grad"]


def test_num_zeros_in_grad_counts_unseen_embedding_rows_in_any_layout(cache, tmp_path):
    """With untied embeddings, every vocabulary row no token of the step's global batch uses
    has an exactly zero embedding gradient: the count is at least (vocab - tokens a step) *
    hidden. TP=2 + SP and PP=2 (the embedding and the output layer on other ranks) count the
    same as one process: each shard and stage once. The single run also profiles steps 1-2."""
    tb = tmp_path / "tb"
    single = train(tmp_path, "single", UNTIED + ["--profile", "--use-pytorch-profiler", "--profile-step-start", "1",
                                                 "--profile-step-end", "3", "--tensorboard-dir", str(tb)])
    tokens_a_step, hidden, vocab = 4 * 64, 64, 512
    for h in single:
        assert h["num_zeros_in_grad"] >= (vocab - tokens_a_step) * hidden, h
    for name, flags in (("tp2", ["--tensor-model-parallel-size", "2", "--sequence-parallel"]),
                        ("pp2", ["--pipeline-model-parallel-size", "2"])):
        multi = train(tmp_path, name, UNTIED + flags, world=2)
        assert [h["num_zeros_in_grad"] for h in multi] == [h["num_zeros_in_grad"] for h in single], name
    # the profiled window: iterations 1 and 2 (0-based), one trace of rank 0 with the model's ops
    traces = sorted(tb.glob("rank0.*.pt.trace.json"))
    assert len(traces) == 1, traces
    events = json.loads(traces[0].read_text())["traceEvents"]
    names = {e.get("name", "") for e in events}
    assert any(n.startswith("aten::") for n in names) and "Optimizer.step#AdamW.step" in names, sorted(names)[:20]
    # two optimizer steps were recorded: the window's two iterations
    assert sum(e.get("name") == "Optimizer.step#AdamW.step" for e in events) == 2


@pytest.mark.parametrize("flags,key", [
    (["--profile-step-start", "3"], "profile_step_start"),
    (["--profile", "--use-pytorch-profiler"], "tensorboard_dir"),
    (["--profile", "--use-pytorch-profiler", "--tensorboard-dir", "x", "--profile-step-end", "10"], "profile_step_end"),
    (["--profile", "--use-pytorch-profiler", "--tensorboard-dir", "x", "--profile-ranks", "1"], "profile_ranks"),
    (["--profile"], "profile"),  # an nsys range needs CUDA
    (["--record-memory-history"], "record_memory_history"),  # CUDA's allocator
    (["--empty-unused-memory-level", "3"], "empty_unused_memory_level"),
    (["--dataloader-type", "cyclic"], "dataloader_type"),
    (["--rerun-mode", "validate_results"], "rerun_mode"),
    (["--position-embedding"], "position_embedding"),
    (["--use-rotary-position-embeddings", "--position-embedding-type", "none"], "use_rotary_position_embeddings"),
])
def test_megatron_lm_diagnostic_flags_refused_naming_the_key(flags, key):
    from megatron_fox.training.arguments import ConfigError, parse_args

    with pytest.raises(ConfigError) as e:
        parse_args(TINY + flags)
    assert e.value.key == key, str(e.value)


def test_megatron_lm_older_and_default_flags_parse():
    from megatron_fox.training.arguments import parse_args

    args = parse_args(TINY + ["--use-rotary-position-embeddings", "--no-position-embedding", "--dataloader-type",
                              "single", "--rerun-mode", "disabled", "--tensorboard-queue-size", "5",
                              "--empty-unused-memory-level", "2"])
    assert (args.position_embedding_type, args.tensorboard_queue_size, args.empty_unused_memory_level) == ("rope", 5, 2)
    assert parse_args(TINY).profile_ranks == [0]


def test_timing_log_options_format_the_ranks_values():
    from megatron_fox.training.timers import format_phases

    per_rank = {"forward-backward": [12.04, 15.26], "optimizer": [3.0, 2.5]}
    assert format_phases(per_rank, "max") == "time (ms) | forward-backward 15.3 | optimizer 3.0 | "
    assert format_phases(per_rank, "minmax") == "time (ms) | forward-backward (12.0, 15.3) | optimizer (2.5, 3.0) | "
    assert format_phases(per_rank, "all") == "time (ms) | forward-backward [12.0, 15.3] | optimizer [3.0, 2.5] | "
    with pytest.raises(ValueError, match="timing_log_option"):
        format_phases(per_rank, "mean")


def test_fused_cross_entropy_and_unmapped_reads_train_alike(cache, tmp_path):
    """--cross-entropy-loss-fusion (Megatron-Core's fused vocab-parallel cross entropy, TP=2
    so the vocabulary is split) gives the losses of the plain one to float32 rounding (carried through Adam);
    --no-mmap-bin-files reads the same samples (losses bit-equal);
    --log-world-size-to-tensorboard writes train/world_size, --log-batch-size-to-tensorboard
    train/global_batch_size, --no-log-learning-rate-to-tensorboard no train/lr."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    flags = ["--train-iters", "3", "--log-interval", "1", "--tensor-model-parallel-size", "2"]
    plain = train(tmp_path, "plain", flags, world=2)
    fused = train(tmp_path, "fused", flags + ["--cross-entropy-loss-fusion"], world=2)
    tb = tmp_path / "tb"
    unmapped = train(tmp_path, "unmapped", flags + ["--no-mmap-bin-files", "--log-world-size-to-tensorboard",
                                                    "--log-batch-size-to-tensorboard",
                                                    "--no-log-learning-rate-to-tensorboard",
                                                    "--tensorboard-dir", str(tb)], world=2)
    print("plain", [h["loss"] for h in plain], "fused", [h["loss"] for h in fused])
    # step 1: the same weights, only the loss kernel differs; later steps also carry the
    # gradients' rounding through Adam (step 3 measured 1.1e-5 apart)
    assert fused[0]["loss"] == pytest.approx(plain[0]["loss"], rel=1e-6, abs=0)
    for a, b, c in zip(plain, fused, unmapped):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4, abs=0), (a["step"], a["loss"], b["loss"])
        assert c["loss"] == a["loss"], (a["step"], a["loss"], c["loss"])
    events = EventAccumulator(str(tb))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("train/world_size")] == [(1, 2.0), (2, 2.0), (3, 2.0)]
    gbs = int(TINY[TINY.index("--global-batch-size") + 1])
    assert [(e.step, e.value) for e in events.Scalars("train/global_batch_size")] == [(i, gbs) for i in (1, 2, 3)]
    tags = events.Tags()["scalars"]
    assert "train/loss" in tags and "train/lr" not in tags


def test_deterministic_mode_trains_like_the_default(cache, tmp_path):
    """--deterministic-mode (torch's deterministic algorithms on) runs the whole CPU step,
    TP=2, with the losses of the default run bit for bit (no op of the path lacks a
    deterministic version); with learned context pruning (atomic adds) it is refused."""
    flags = ["--train-iters", "3", "--log-interval", "1", "--tensor-model-parallel-size", "2"]
    plain = train(tmp_path, "plain", flags, world=2)
    det = train(tmp_path, "det", flags + ["--deterministic-mode", "--ckpt-fully-parallel-save",
                                          "--ckpt-fully-parallel-load"], world=2)
    assert [h["loss"] for h in det] == [h["loss"] for h in plain]
    from megatron_fox.training.arguments import ConfigError, parse_args

    with pytest.raises(ConfigError, match="'deterministic_mode': not with fox_context_pruning"):
        parse_args(TINY + ["--deterministic-mode", "--fox-context-pruning"])


def test_decoupled_lr_moves_only_the_embedding_and_output_layers(cache, tmp_path):
    """--decoupled-lr: the embedding and output layers follow their own schedule. With it 0
    they stay at their initial values (a run at lr 0 gives those) while every other weight
    trains; the schedule of those groups has the shape of the main one."""
    from types import SimpleNamespace

    from megatron_fox.training.step import lr_at, set_lr_and_wd

    frozen = ["--decoupled-lr", "0", "--decoupled-min-lr", "0", "--log-interval", "1"]
    init, trained = tmp_path / "init", tmp_path / "trained"
    train(tmp_path, "init", frozen + ["--train-iters", "1", "--lr", "0", "--save", str(init)])
    hist = train(tmp_path, "trained", frozen + ["--train-iters", "3", "--save", str(trained)])
    assert hist[-1]["lr"] > 0
    a = torch.load(init / "iter_0000001" / "mp_rank_00_000.pt", weights_only=False)["model"]
    b = torch.load(trained / "iter_0000003" / "mp_rank_00_000.pt", weights_only=False)["model"]
    own = {k for k in a if k.endswith(("word_embeddings.weight", "output_layer.weight"))}
    assert len(own) == 2, sorted(a)
    for k in a:
        if k in own:
            assert torch.equal(a[k], b[k]), k
        elif torch.is_tensor(a[k]) and a[k].is_floating_point() and a[k].numel() > 1:
            assert not torch.equal(a[k], b[k]), k
    args = SimpleNamespace(lr=1e-3, min_lr=1e-5, decoupled_lr=4e-3, decoupled_min_lr=None, lr_warmup_iters=2,
                           lr_decay_iters=10, lr_decay_style="cosine", weight_decay=0.1, weight_decay_incr_style="constant",
                           rampup_batch_size=None, global_batch_size=4, train_iters=10)
    groups = [{}, {}, {}]
    assert set_lr_and_wd(groups, 5, args, (1.0, 0.0, 1.0), [False, False, True]) == lr_at(5, args)
    assert groups[2]["lr"] == pytest.approx(lr_at(5, args, 4e-3, 1e-5)) and groups[0]["lr"] == groups[1]["lr"]
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0, 0.1]


def test_log_progress_counts_over_resumed_jobs(cache, tmp_path):
    """--log-progress: progress.txt under --save gets a line when each job starts and at each
    checkpoint; the tokens and floating-point operations count on across a resume (the totals
    saved with the checkpoint), equal to the steps' own counts."""
    ckpt = tmp_path / "ckpt"
    flags = ["--train-iters", "6", "--log-interval", "1", "--save", str(ckpt), "--save-interval", "2",
             "--log-progress"]
    first = train(tmp_path, "first", flags + ["--exit-interval", "4"])
    rest = train(tmp_path, "rest", flags + ["--load", str(ckpt)])
    lines = [dict(f.rsplit(" ", 1) for f in line.split("\t")[1:] if " " in f) | {"event": line.split("\t")[3]}
             for line in (ckpt / "progress.txt").read_text().splitlines()]
    assert [(x["event"], int(x["step"])) for x in lines] == [
        ("job started", 0), ("checkpoint saved", 2), ("checkpoint saved", 4), ("job started", 4),
        ("checkpoint saved", 6)]
    tokens_a_step = 4 * 64  # global batch x seq length of TINY
    assert [int(x["tokens"]) for x in lines] == [0, 2 * tokens_a_step, 4 * tokens_a_step, 4 * tokens_a_step,
                                                 6 * tokens_a_step]
    flops = sum(h["model_flops"] for h in first + rest)
    assert float(lines[-1]["floating-point operations"]) == pytest.approx(flops, rel=1e-6)
    assert float(lines[-1]["job TFLOP/s/GPU"]) > 0 and float(lines[-1]["all jobs TFLOP/s/GPU"]) > 0
    from megatron_fox.training.arguments import ConfigError, parse_args

    with pytest.raises(ConfigError, match="'log_progress': needs save"):
        parse_args(TINY + ["--log-progress"])
