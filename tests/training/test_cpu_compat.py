"""The CPU stand-in for a run that keeps to the CPU (`--device cpu`), also beside a GPU."""

import subprocess
import sys

from .workers import ROOT, tool_env

BESIDE_A_GPU = """
import torch
torch.cuda.is_available = lambda: True  # what a GPU machine answers before the stand-in
from megatron_fox.training.cpu_compat import route_megatron_buffers_to_cpu
from torch._dynamo.utils import counters
assert route_megatron_buffers_to_cpu(force=True)
assert not torch.cuda.is_available() and torch.cuda.current_device() == torch.device("cpu")

@torch.compile
def f(x):
    return torch.sigmoid(x) * 2.0

x = torch.randn(5)
torch.testing.assert_close(f(x), torch.sigmoid(x) * 2.0)
assert not counters["stats"]["unique_graphs"], dict(counters["stats"])  # ran eagerly
print("ok")
"""


def test_cpu_run_beside_a_gpu_looks_cuda_less_and_runs_compiled_functions_eagerly():
    """Beside a GPU a CPU run must not let torch.compile (megatron-core 0.19's compiled
    router functions) query the CUDA device its stand-in renamed to the CPU (GPU machine:
    TypeError in dynamo, ValueError in inductor): CUDA reads as unavailable and compiled
    functions run eagerly, with their eager results."""
    r = subprocess.run([sys.executable, "-c", BESIDE_A_GPU], capture_output=True, text=True, env=tool_env(),
                       cwd=ROOT, timeout=300)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-3000:]
