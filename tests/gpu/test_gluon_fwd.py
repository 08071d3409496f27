"""The Gluon forward (sm_90) against the Triton forward and the float64 reference.

Runs only with MEGATRON_FOX_TEST_GPU=1 on a Hopper GPU (the CPU CI skips it; there the
kernel's build is checked by tests/ops/test_kernel_report.py)."""

import os

import pytest
import torch
import torch.nn.functional as F

from megatron_fox.ops import forgetting_attention, forgetting_attention_reference
from megatron_fox.ops import set_gluon_forward

pytestmark = pytest.mark.skipif(
    os.environ.get("MEGATRON_FOX_TEST_GPU") != "1" or not torch.cuda.is_available()
    or torch.cuda.get_device_capability() != (9, 0), reason="needs a Hopper GPU")


def _run(q, k, v, g, log_eps, gluon):
    previous = set_gluon_forward(gluon)
    try:
        ins = [t.detach().clone().requires_grad_() for t in (q, k, v, g)]
        o, lse = forgetting_attention(*ins, log_eps=log_eps, return_lse=True)
        do = torch.randn_like(o, generator=torch.Generator(o.device).manual_seed(1))
        dlse = torch.randn_like(lse, generator=torch.Generator(o.device).manual_seed(2))
        return [o, lse, *torch.autograd.grad((o, lse), ins, (do, dlse))]
    finally:
        set_gluon_forward(previous)


@pytest.mark.parametrize("B, T, H, Hkv, D, dtype, log_eps", [
    (2, 1000, 4, 2, 128, torch.bfloat16, None),
    (2, 1001, 4, 4, 128, torch.bfloat16, -10.0),  # T % 4 != 0: padded prefix-sum rows
    (1, 2048, 8, 2, 128, torch.float16, -10.0),
    (2, 300, 4, 1, 128, torch.bfloat16, None),    # GQA 4/1; the last block partly past T
])
def test_gluon_forward_equals_triton_and_reference(B, T, H, Hkv, D, dtype, log_eps):
    torch.manual_seed(0)
    dev = "cuda"
    q = torch.randn(B, T, H, D, device=dev, dtype=dtype)
    k = torch.randn(B, T, Hkv, D, device=dev, dtype=dtype)
    v = torch.randn(B, T, Hkv, D, device=dev, dtype=dtype)
    g = F.logsigmoid(torch.randn(B, T, H, device=dev) + 1.0)
    gluon, triton_ = _run(q, k, v, g, log_eps, True), _run(q, k, v, g, log_eps, False)
    # the same products and the same softmax order: equal to the last bit so far; allow rounding
    for name, a, b in zip(["o", "lse", "dq", "dk", "dv", "dlogf"], gluon, triton_):
        assert torch.allclose(a.float(), b.float(), rtol=1e-3, atol=1e-3 * b.float().abs().max().item()), name
    ins = [t.detach().clone().requires_grad_() for t in (q, k, v, g)]
    ref = forgetting_attention_reference(*ins, dtype=torch.float64)
    err = ((gluon[0].double() - ref.double()).norm() / ref.double().norm()).item()
    assert err < 5e-3 if dtype == torch.bfloat16 else err < 1e-3, err
