"""The CUDA training path on one GPU: Megatron DDP + distributed optimizer, the
forward-backward schedule, dist_checkpointing save and resume.

Runs only with MEGATRON_FOX_TEST_GPU=1 on a machine with CUDA (the CPU CI skips it).
"""

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "training"))
from workers import launch  # noqa: E402

pytestmark = pytest.mark.skipif(
    os.environ.get("MEGATRON_FOX_TEST_GPU") != "1" or not torch.cuda.is_available(), reason="needs a CUDA GPU")

FLAGS = ["--num-layers", "2", "--hidden-size", "128", "--num-attention-heads", "4", "--ffn-hidden-size", "384",
         "--seq-length", "512", "--micro-batch-size", "2", "--global-batch-size", "8", "--lr", "3e-3",
         "--lr-warmup-iters", "5", "--log-interval", "5", "--no-progress-bar", "--device", "cuda", "--bf16",
         "--default-corpus-bytes", "2000000", "--default-vocab-size", "1024", "--split", "100,0,0"]


def train(tmp_path, name, flags):
    out = tmp_path / f"{name}.pt"
    launch("train", 1, {"flags": FLAGS + flags, "out": str(out)}, timeout=600)
    return torch.load(out)


def test_gpu_train_loss_falls_and_resume_matches(tmp_path):
    os.environ.setdefault("MEGATRON_FOX_CACHE", str(tmp_path / "cache"))
    full = train(tmp_path, "full", ["--train-iters", "30"])
    losses = [h["loss"] for h in full]
    assert sum(losses[-5:]) / 5 < losses[0] - 1.0, losses
    assert 0.0 < full[-1]["acp_skipped"] < 1.0
    ckpt = tmp_path / "ckpt"
    first = train(tmp_path, "first", ["--train-iters", "30", "--exit-interval", "15", "--save", str(ckpt)])
    assert len(first) == 15 and (ckpt / "iter_0000015").is_dir()
    rest = train(tmp_path, "rest", ["--train-iters", "30", "--load", str(ckpt)])
    assert [h["step"] for h in rest] == list(range(16, 31))
    print("uninterrupted", [round(h["loss"], 4) for h in full[15:]])
    print("resumed      ", [round(h["loss"], 4) for h in rest])
    # bf16 on the GPU. Before Adam's step was restored on load (megatron_engine
    # _restore_adam_step) the resumed run drifted by up to 0.3% over 15 steps; with it the
    # resumed run should follow the uninterrupted one to rounding (the CPU fp32 test: 1e-6).
    assert rest[0]["loss"] == pytest.approx(full[15]["loss"], rel=1e-4)
    for a, b in zip(full[15:], rest):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4), (a["step"], a["loss"], b["loss"])
