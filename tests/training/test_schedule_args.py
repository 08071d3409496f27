"""Sample-based schedule flags (--train-samples, --lr-decay-samples, --lr-warmup-samples,
--lr-warmup-fraction) as Megatron-LM's: steps of global_batch_size sequences, rounded up,
command line over YAML, two alternatives at one level refused naming the key."""

import math

import pytest
import yaml

from megatron_fox.training.arguments import ConfigError, parse_args
from megatron_fox.training.step import lr_at


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


@pytest.mark.parametrize("flags,key", [
    (["--train-samples", "10", "--train-iters", "5"], "train_samples"),
    (["--lr-warmup-samples", "10", "--lr-warmup-fraction", "0.1"], "lr_warmup_fraction"),
    (["--lr-warmup-fraction", "1.5"], "lr_warmup_fraction"),
    (["--train-samples", "-8"], "train_samples"),
])
def test_bad_schedule_names_the_key(flags, key):
    with pytest.raises(ConfigError, match=f"'{key}'"):
        parse_args(flags)
