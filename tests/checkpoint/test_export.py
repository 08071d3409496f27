"""tools/convert_checkpoint.py from-megatron: a TP=2 x PP=2 training checkpoint, in either
format megatron_fox.train writes, exported to one full state dict equal to the same model
built whole (the initial weights are drawn per full-model name, so any layout gives the
same model; the saved one is scaled per name, so an export of the initial weights fails)."""

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "training"))
from workers import ROOT, launch, model_flags, run_python  # noqa: E402


@pytest.mark.parametrize("fmt", ["files", "dist"])
def test_export_equals_the_whole_model(fmt, tmp_path):
    launch("save", 1, {"seed": 7, "format": "files", "root": str(tmp_path / "whole")})
    launch("save", 4, {"seed": 7, "format": fmt, "root": str(tmp_path / "ckpt"), "tp": 2, "pp": 2})
    flags = [f for f in model_flags({}) if f != "--acp"]
    outs = {}
    for name in ("whole", "ckpt"):
        out = tmp_path / f"{name}.pt"
        r = run_python([os.path.join(ROOT, "tools", "convert_checkpoint.py"), "from-megatron", "--input",
                        str(tmp_path / name), "--output", str(out), *flags], cwd=tmp_path)
        assert r.returncode == 0, r.stderr[-3000:]
        outs[name] = torch.load(out)
    whole, exported = outs["whole"], outs["ckpt"]
    assert set(exported) == set(whole)
    for name, t in whole.items():
        assert torch.equal(exported[name], t), name


def test_export_errors(tmp_path):
    tool = [os.path.join(ROOT, "tools", "convert_checkpoint.py"), "from-megatron", "--output", str(tmp_path / "x.pt"),
            *model_flags({})]
    r = run_python(tool + ["--input", str(tmp_path)], timeout=120)
    assert r.returncode == 2 and "latest_checkpointed_iteration" in r.stderr
    launch("save", 2, {"seed": 7, "format": "files", "root": str(tmp_path / "ckpt"), "tp": 2})
    os.remove(tmp_path / "ckpt" / "iter_0000005" / "mp_rank_01_000.pt")
    r = run_python(tool + ["--input", str(tmp_path / "ckpt")], timeout=120)
    assert r.returncode == 2 and "(1, 0)" in r.stderr, r.stderr[-2000:]
