"""Sample-based schedule flags (--train-samples, --lr-decay-samples, --lr-warmup-samples,
--lr-warmup-fraction) as Megatron-LM's: steps of global_batch_size sequences, rounded up,
command line over YAML, two alternatives at one level refused naming the key."""

import math

import pytest
import yaml

from megatron_fox.training.arguments import ConfigError, parse_args
from megatron_fox.training.rampup import step_batch
from megatron_fox.training.step import lr_at, wd_at


def test_samples_become_steps_and_drive_the_lr():
    gbs = 24
    args = parse_args(["--global-batch-size", str(gbs), "--micro-batch-size", "4", "--train-samples", "2401",
                       "--lr-decay-samples", "2000", "--lr-warmup-samples", "240", "--lr", "1e-3", "--min-lr", "1e-4"])
    assert (args.train_iters, args.lr_decay_iters, args.lr_warmup_iters) == (101, 84, 10)  # ceil(n / 24)
    # warmup reaches the peak at its last step, cosine reaches min_lr at the decay's end and stays
    assert lr_at(9, args) == pytest.approx(1e-3)
    assert lr_at(84, args) == pytest.approx(1e-4) and lr_at(100, args) == pytest.approx(1e-4)
    mid = 10 + (84 - 10) / 2
    assert lr_at(int(mid), args) == pytest.approx(1e-4 + 0.9e-3 * 0.5 * (1 + math.cos(math.pi * (int(mid) - 10) / 74)))


def test_warmup_starts_from_lr_warmup_init():
    """Megatron-LM's --lr-warmup-init: the warmup rises linearly from it to lr (step i ends
    i + 1 steps in), the decoupled schedule from the same start; above lr is refused."""
    flags = ["--global-batch-size", "8", "--micro-batch-size", "4", "--train-iters", "100", "--lr", "1e-3",
             "--min-lr", "1e-4", "--lr-warmup-iters", "10", "--lr-warmup-init", "2e-4"]
    args = parse_args(flags)
    for i in (0, 4, 9):
        assert lr_at(i, args) == pytest.approx(2e-4 + 8e-4 * (i + 1) / 10)
    assert lr_at(10, args) == pytest.approx(1e-3)
    assert lr_at(0, args, peak=5e-3) == pytest.approx(2e-4 + 4.8e-3 / 10)
    assert lr_at(0, parse_args(flags[:-2])) == pytest.approx(1e-4)  # default 0: lr * 1 / 10
    with pytest.raises(ConfigError, match="'lr_warmup_init'"):
        parse_args(flags[:-1] + ["2e-3"])


def test_warmup_fraction_is_a_share_of_the_decay():
    args = parse_args(["--global-batch-size", "8", "--micro-batch-size", "4", "--train-iters", "400",
                       "--lr-decay-iters", "300", "--lr-warmup-fraction", "0.05"])
    assert args.lr_warmup_iters == 15


def test_command_line_wins_over_yaml_and_one_level_holds_one(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"train_iters": 50, "lr_warmup_iters": 7, "global_batch_size": 8,
                                   "micro_batch_size": 4}))
    args = parse_args(["--config", str(cfg), "--train-samples", "80", "--lr-warmup-fraction", "0.5"])
    assert (args.train_iters, args.lr_warmup_iters) == (10, 5)
    cfg.write_text(yaml.safe_dump({"train_samples": 80, "global_batch_size": 8, "micro_batch_size": 4}))
    assert parse_args(["--config", str(cfg)]).train_iters == 10
    assert parse_args(["--config", str(cfg), "--train-iters", "3"]).train_iters == 3
    cfg.write_text(yaml.safe_dump({"train_samples": 80, "train_iters": 4}))
    with pytest.raises(ConfigError, match="'train_samples'"):
        parse_args(["--config", str(cfg)])


@pytest.mark.parametrize("style,coeff_mid", [("linear", 0.5), ("cosine", 0.5), ("exponential", 2 * 0.5 ** 0.5 - 1),
                                              ("minus_sqrt", 1 - 0.5 ** 0.5)])
def test_wsd_holds_the_peak_then_decays_in_its_last_steps(style, coeff_mid):
    """Warmup 10, stable at lr, decay over the last 20 of 100 steps (480 samples / 24)."""
    args = parse_args(["--global-batch-size", "24", "--micro-batch-size", "4", "--train-iters", "100",
                       "--lr-warmup-iters", "10", "--lr", "1e-3", "--min-lr", "1e-4", "--lr-decay-style", "WSD",
                       "--lr-wsd-decay-style", style, "--lr-wsd-decay-samples", "480"])
    assert args.lr_wsd_decay_iters == 20
    assert lr_at(4, args) == pytest.approx(0.5e-3)
    assert [lr_at(i, args) for i in (10, 50, 79, 80)] == pytest.approx([1e-3] * 4)
    assert lr_at(90, args) == pytest.approx(1e-4 + 0.9e-3 * coeff_mid)
    assert lr_at(100, args) == pytest.approx(1e-4) and lr_at(120, args) == pytest.approx(1e-4)
    assert 1e-4 < lr_at(99, args) < lr_at(95, args) < lr_at(85, args) < 1e-3


def test_inverse_square_root_decay():
    args = parse_args(["--train-iters", "1000", "--lr-warmup-iters", "16", "--lr", "1e-3", "--min-lr", "1e-5",
                       "--lr-decay-style", "inverse-square-root"])
    assert lr_at(15, args) == pytest.approx(1e-3)
    assert lr_at(16, args) == pytest.approx(1e-3) and lr_at(64, args) == pytest.approx(0.5e-3)
    assert lr_at(10 ** 6, args) == pytest.approx(1e-5)  # min_lr is the floor


def _megatron_ramp(start, increment, samples, gbs, steps):
    """Megatron-LM's rule step by step: the batch of a step is START + INCREMENT * (how many
    SAMPLES / ((gbs - START) / INCREMENT) spans the consumed sequences fill), gbs past SAMPLES."""
    out, consumed = [], 0
    per = samples / ((gbs - start) // increment)
    for _ in range(steps):
        size = gbs if consumed > samples else start + int(consumed / per) * increment
        out.append((consumed, size))
        consumed += size
    return out


@pytest.mark.parametrize("ramp,gbs", [((4, 4, 100), 16), ((32, 32, 3000), 512), ((1, 1, 7), 3)])
def test_rampup_steps_follow_megatron_rule(ramp, gbs):
    expect = _megatron_ramp(*ramp, gbs, 200)
    assert [step_batch(i, ramp, gbs) for i in range(200)] == expect
    assert expect[-1][1] == gbs and expect[0][1] == ramp[0]


def test_rampup_flags_train_samples_and_lr():
    """--train-samples counts the ramp's smaller batches; the LR schedule runs on consumed
    sequences (warmup of 10 full batches = 160 sequences)."""
    args = parse_args(["--global-batch-size", "16", "--micro-batch-size", "4", "--rampup-batch-size", "4", "4", "100",
                       "--train-samples", "200", "--lr-warmup-iters", "10", "--lr", "1e-3"])
    assert args.rampup_batch_size == [4, 4, 100]
    # the ramp: 9 steps of 4, 4 of 8, 3 of 12 (104 sequences), then 6 of 16 reach 200
    assert args.train_iters == 16 + 6
    # warmup by the sequences consumed at the step's end, counted in full batches
    assert lr_at(0, args) == pytest.approx(1e-3 * (4 / 16) / 10)
    assert lr_at(9, args) == pytest.approx(1e-3 * (44 / 16) / 10)  # 36 before step 9, the first of 8
    assert lr_at(16, args) == pytest.approx(1e-3 * (120 / 16) / 10)  # the first full batch
    assert lr_at(19, args) == pytest.approx(1e-3)  # 168 sequences at its end: past the 160 of warmup
    lrs = [lr_at(i, args) for i in range(args.train_iters)]
    assert all(b >= a for a, b in zip(lrs, lrs[1:20])) and max(lrs) == pytest.approx(1e-3)


@pytest.mark.parametrize("flags,key", [
    (["--rampup-batch-size", "4", "4"], "rampup_batch_size"),
    (["--rampup-batch-size", "4", "x", "100"], "rampup_batch_size"),
    (["--global-batch-size", "16", "--micro-batch-size", "4", "--rampup-batch-size", "16", "4", "100"],
     "rampup_batch_size"),
    (["--global-batch-size", "16", "--micro-batch-size", "4", "--rampup-batch-size", "4", "8", "100"],
     "rampup_batch_size"),
    (["--global-batch-size", "16", "--micro-batch-size", "4", "--rampup-batch-size", "2", "2", "100"],
     "rampup_batch_size"),
    (["--lr-decay-style", "WSD"], "lr_wsd_decay_iters"),
    (["--lr-decay-style", "WSD", "--train-iters", "100", "--lr-warmup-iters", "10", "--lr-wsd-decay-iters", "91"],
     "lr_wsd_decay_iters"),
    (["--lr-wsd-decay-iters", "5"], "lr_wsd_decay_iters"),
    (["--lr-decay-style", "WSD", "--lr-wsd-decay-iters", "5", "--lr-wsd-decay-style", "step"], "lr_wsd_decay_style"),
    (["--lr-decay-style", "step"], "lr_decay_style"),
    (["--lr-wsd-decay-iters", "5", "--lr-wsd-decay-samples", "40", "--lr-decay-style", "WSD"], "lr_wsd_decay_samples"),
    (["--train-samples", "10", "--train-iters", "5"], "train_samples"),
    (["--lr-warmup-samples", "10", "--lr-warmup-fraction", "0.1"], "lr_warmup_fraction"),
    (["--lr-warmup-fraction", "1.5"], "lr_warmup_fraction"),
    (["--train-samples", "-8"], "train_samples"),
    (["--weight-decay-incr-style", "step"], "weight_decay_incr_style"),
    (["--start-weight-decay", "0.01"], "start_weight_decay"),  # constant style: weight_decay only
    (["--weight-decay-incr-style", "linear", "--start-weight-decay", "0.01"], "end_weight_decay"),
    (["--weight-decay-incr-style", "cosine", "--start-weight-decay", "-1", "--end-weight-decay", "0.1"],
     "start_weight_decay"),
])
def test_bad_schedule_names_the_key(flags, key):
    with pytest.raises(ConfigError, match=f"'{key}'"):
        parse_args(flags)


@pytest.mark.parametrize("style", ["linear", "cosine"])
def test_weight_decay_schedule_as_megatron_lm(style):
    """--weight-decay-incr-style: from start to end over train_iters, linearly or by a cosine
    rise, end afterwards; constant (the default) is --weight-decay throughout."""
    args = parse_args(["--train-iters", "100", "--weight-decay-incr-style", style, "--start-weight-decay", "0.02",
                       "--end-weight-decay", "0.1"])
    for it in (0, 10, 50, 73, 100, 150):
        r = min(1.0, it / 100)
        coeff = r if style == "linear" else (1 - math.cos(math.pi * r)) / 2  # 0 -> 1, slow at both ends
        assert wd_at(it, args) == pytest.approx(0.02 + 0.08 * coeff), it
    constant = parse_args(["--train-iters", "100", "--weight-decay", "0.05"])
    assert {wd_at(it, constant) for it in (0, 50, 99)} == {0.05}


def test_engine_applies_the_weight_decay_schedule_to_decayed_groups_only(megatron_world):
    """The CPU engine's AdamW groups after a step: the decayed one at wd_at(step), norms and
    biases at 0, lr at lr_at(step)."""
    import torch

    from megatron_fox.training.cpu_compat import route_megatron_buffers_to_cpu
    from megatron_fox.training.model import build_model, padded_vocab_size, transformer_config
    from megatron_fox.training.torch_engine import TorchEngine

    route_megatron_buffers_to_cpu()
    args = parse_args(["--num-layers", "1", "--hidden-size", "32", "--num-attention-heads", "2", "--ffn-hidden-size",
                       "64", "--seq-length", "16", "--micro-batch-size", "1", "--global-batch-size", "1",
                       "--vocab-size", "64", "--device", "cpu", "--train-iters", "10", "--weight-decay-incr-style",
                       "linear", "--start-weight-decay", "0.0", "--end-weight-decay", "0.2"])
    model = build_model(args, transformer_config(args, torch.device("cpu")), padded_vocab_size(64, args))
    engine = TorchEngine(model, args, eod=63)
    tokens = torch.randint(0, 63, (1, 17))
    batch = {"tokens": tokens[:, :-1], "labels": tokens[:, 1:], "loss_mask": torch.ones(1, 16),
             "position_ids": torch.arange(16)[None], "attention_mask": None}
    for it in (0, 4, 7):
        engine.train_step([batch], it)
        decayed, free = engine.optimizer.param_groups
        assert decayed["weight_decay"] == pytest.approx(0.2 * it / 10) and free["weight_decay"] == 0.0
        assert decayed["lr"] == free["lr"] == pytest.approx(lr_at(it, args))
        assert any("norm" in n for n, p in model.named_parameters() if any(p is q for q in free["params"]))
