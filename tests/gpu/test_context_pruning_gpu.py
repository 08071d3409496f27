"""Learned context pruning (--fox-context-pruning) through the CUDA Megatron path: its
penalty's scaling in megatron_engine (the schedule backpropagates the loss sum times the loss
scale) against the CPU engine's (loss divided by the tokens first), and dist_checkpointing
save and resume of the interaction projections and beta.

Runs only with MEGATRON_FOX_TEST_GPU=1 on a machine with CUDA.
"""

import os
import subprocess
import sys

import pytest
import torch

from test_megatron_path import FLAGS, train  # tests/gpu is on sys.path (no package)

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "training"))
from workers import ROOT, launch, tool_env  # noqa: E402

pytestmark = pytest.mark.skipif(
    os.environ.get("MEGATRON_FOX_TEST_GPU") != "1" or not torch.cuda.is_available(), reason="needs a CUDA GPU")

DCP = ["--fox-context-pruning", "--fox-context-pruning-beta-init", "0.5"]


def _run(tmp_path, name, flags):
    out = tmp_path / f"{name}.pt"
    launch("train", 1, {"flags": flags, "out": str(out)}, timeout=600)
    return torch.load(out)


def _convert(tmp_path, ckpt, flags):
    out = tmp_path / "weights.pt"
    r = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "convert_checkpoint.py"), "from-megatron",
                        "--input", str(ckpt), "--output", str(out), *flags, "--vocab-size", "1024"],
                       capture_output=True, text=True, env=tool_env(), cwd=tmp_path, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return out


def test_gpu_context_pruning_equals_cpu_engine_and_resumes(tmp_path):
    os.environ.setdefault("MEGATRON_FOX_CACHE", str(tmp_path / "cache"))
    # a base with the pruning modules (lambda 0), so both engines start from the same weights
    base = tmp_path / "base"
    train(tmp_path, "base", DCP + ["--fox-context-pruning-lambda", "0", "--train-iters", "10", "--save", str(base)])
    weights = _convert(tmp_path, base, FLAGS + DCP)
    pruning = [k for k in torch.load(weights) if ".context_pruning." in k]
    assert len(pruning) == 6, pruning  # per layer beta and the two interaction projections, exported

    # float32 on both devices: the CUDA engine (loss scale 1, penalty times each micro-batch's
    # tokens, gradients divided by the batch's tokens afterwards) against the CPU engine
    # (penalty over the batch's tokens); lambda 3 moves the kept fraction within 6 steps
    tune = DCP + ["--pretrained-checkpoint", str(weights), "--train-iters", "6", "--log-interval", "1",
                  "--fox-context-pruning-alpha-iters", "6", "--log-params-norm"]
    fp32 = [f for f in FLAGS if f != "--bf16"]
    cpu_flags = [("cpu" if f == "cuda" else f) for f in fp32]
    gpu = _run(tmp_path, "tune_gpu", fp32 + tune + ["--fox-context-pruning-lambda", "3"])
    cpu = _run(tmp_path, "tune_cpu", cpu_flags + tune + ["--fox-context-pruning-lambda", "3"])
    free = _run(tmp_path, "tune_gpu_free", fp32 + tune + ["--fox-context-pruning-lambda", "0"])
    assert [h["step"] for h in gpu] == [h["step"] for h in cpu] == list(range(1, 7))
    print("gpu", [(round(h["loss"], 4), round(h["dcp_kept"], 4)) for h in gpu])
    print("cpu", [(round(h["loss"], 4), round(h["dcp_kept"], 4)) for h in cpu])
    print("gpu, lambda 0", [round(h["dcp_kept"], 4) for h in free])
    assert gpu[-1]["dcp_kept"] < free[-1]["dcp_kept"] - 0.01  # the penalty acts
    for a, b in zip(gpu, cpu):
        assert a["loss"] == pytest.approx(b["loss"], rel=2e-3), (a["step"], a["loss"], b["loss"])
        assert a["dcp_kept"] == pytest.approx(b["dcp_kept"], abs=5e-3), (a["step"], a["dcp_kept"], b["dcp_kept"])
        # --log-params-norm: NCCL reduction on the GPU, gloo on the CPU
        assert a["params_norm"] == pytest.approx(b["params_norm"], rel=1e-3), a["step"]

    # bf16, save mid-run with dist_checkpointing, resume: the steps after equal the uninterrupted run
    bf = DCP + ["--pretrained-checkpoint", str(weights), "--train-iters", "8", "--fox-context-pruning-lambda", "3",
                "--log-interval", "1"]
    full = train(tmp_path, "bf_full", bf)
    ckpt = tmp_path / "ckpt"
    train(tmp_path, "bf_first", bf + ["--exit-interval", "4", "--save", str(ckpt)])
    rest = train(tmp_path, "bf_rest", [f for f in bf if f not in ("--pretrained-checkpoint", str(weights))]
                 + ["--load", str(ckpt)])
    assert [h["step"] for h in rest] == [5, 6, 7, 8]
    for a, b in zip(full[4:], rest):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4), (a["step"], a["loss"], b["loss"])
        assert a["dcp_kept"] == pytest.approx(b["dcp_kept"], abs=1e-4), a["step"]
