"""Every shipped config (configs/*.yaml) passes the trainer's checks on a data-parallel
world of 8 (an unknown or misspelt key, or a bad combination, fails here first), the
Mixture-of-Experts ones also with their experts split over the 8 GPUs."""

import glob
import os

import pytest

from megatron_fox.training.arguments import ConfigError, parse_args

from .workers import ROOT

CONFIGS = sorted(glob.glob(os.path.join(ROOT, "configs", "*.yaml")))


@pytest.mark.parametrize("path", CONFIGS, ids=[os.path.basename(p) for p in CONFIGS])
def test_config_parses(path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "8")
    flags = ["--config", path, "--global-batch-size", "64", "--device", "cpu"]
    args = parse_args(flags)
    assert args.data_parallel_size == 8 and args.num_microbatches * args.micro_batch_size * 8 == 64
    if args.num_experts:
        assert parse_args(flags + ["--expert-model-parallel-size", "8"]).expert_model_parallel_size == 8
        with pytest.raises(ConfigError, match="'expert_model_parallel_size'"):
            parse_args(flags + ["--expert-model-parallel-size", "16"])  # more than the 8 data-parallel ranks
