"""Generation on the GPU: a bf16 model trained through the Megatron path, then
tools/generate.py with ACP eviction and the cached-decoding-vs-full-forward check.

Runs only with MEGATRON_FOX_TEST_GPU=1 on a machine with CUDA (the CPU CI skips it).
"""

import os
import subprocess
import sys

import pytest
import torch

from test_megatron_path import FLAGS, train  # tests/gpu is on sys.path (no package)

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "training"))
from workers import tool_env  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
pytestmark = pytest.mark.skipif(
    os.environ.get("MEGATRON_FOX_TEST_GPU") != "1" or not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_gpu_generate_after_training(tmp_path):
    os.environ.setdefault("MEGATRON_FOX_CACHE", str(tmp_path / "cache"))
    ckpt = tmp_path / "ckpt"
    train(tmp_path, "gen", ["--train-iters", "10", "--save", str(ckpt)])
    env = tool_env()
    gen = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "generate.py"), *FLAGS, "--load", str(ckpt),
                          "--prompt", "import os\n", "--max-new-tokens", "48", "--check"],
                         capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    print(gen.stderr[-1500:])
    assert gen.returncode == 0, gen.stderr[-3000:]
    assert gen.stdout.startswith("import os") and "[check:" in gen.stderr
    # the dist_checkpointing checkpoint exported to a full state dict generates the same text
    full = tmp_path / "full.pt"
    conv = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "convert_checkpoint.py"), "from-megatron",
                           "--input", str(ckpt), "--output", str(full), *FLAGS, "--vocab-size", "1024"],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert conv.returncode == 0, conv.stderr[-3000:]
    again = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "generate.py"), *FLAGS,
                            "--pretrained-checkpoint", str(full), "--prompt", "import os\n", "--max-new-tokens", "48"],
                           capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout == gen.stdout
