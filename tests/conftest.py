"""Test setup: Triton kernels run in the interpreter on CPU unless MEGATRON_FOX_TEST_GPU=1.

TRITON_INTERPRET must be set before the kernels are defined, so before any import of
megatron_fox.ops.
"""

import os

if os.environ.get("MEGATRON_FOX_TEST_GPU", "0") != "1":
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture
def device():
    if os.environ.get("MEGATRON_FOX_TEST_GPU", "0") == "1":
        return torch.device("cuda")
    return torch.device("cpu")


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    # Fresh random inputs every run (seed printed on failure through the test id log).
    seed = int.from_bytes(os.urandom(4), "little")
    torch.manual_seed(seed)
    request.node.user_properties.append(("seed", seed))
    print(f"torch seed {seed}")  # shown with a failure
    yield
