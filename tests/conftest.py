"""Test setup: Triton kernels run in the interpreter on CPU unless MEGATRON_FOX_TEST_GPU=1.

TRITON_INTERPRET must be set before the kernels are defined, so before any import of
megatron_fox.ops.
"""

import os
import socket

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


@pytest.fixture(scope="module")
def megatron_world():
    """A one-process gloo world with Megatron's model-parallel state (TP = PP = CP = 1)."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    assert not dist.is_initialized(), "another test left a process group behind"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    saved = {k: os.environ.get(k) for k in ("MASTER_ADDR", "MASTER_PORT")}
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=0, world_size=1)
    ps.initialize_model_parallel(tensor_model_parallel_size=1)
    yield
    # leave no process group and no rendezvous address behind: later tests start their own
    ps.destroy_model_parallel()
    dist.destroy_process_group()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
