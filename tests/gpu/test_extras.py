"""The torch.compile-fused FoX-Pro extras equal their eager versions, forward and backward.

Runs only with MEGATRON_FOX_TEST_GPU=1 on a machine with CUDA (the CPU path is eager).
"""

import os

import pytest
import torch

from megatron_fox.layers import extras

pytestmark = pytest.mark.skipif(
    os.environ.get("MEGATRON_FOX_TEST_GPU") != "1" or not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _close(a, b, what):
    rel = ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()
    assert rel <= 1e-2, f"{what}: relative error {rel}"


@pytest.mark.parametrize("docs", [False, True])
def test_fused_extras_match_eager(docs):
    """prepare (from the fused projection's output on) and finish, compiled and eager: the
    same values and gradients, prepare's outputs batch-major in memory."""
    from megatron_fox.layers.qkv_layout import QkvLayout

    dev = torch.device("cuda")
    s, b, h, g, d = 300, 2, 4, 2, 64
    layout = QkvLayout(g, h // g, d)
    bf = {"device": dev, "dtype": torch.bfloat16}
    inputs = [torch.randn(s, b, g * sum(layout.sizes), **bf), torch.randn(h, **bf),
              1 + 0.1 * torch.randn(h, d, **bf), 1 + 0.1 * torch.randn(g, d, **bf)]
    for t in inputs:
        t.requires_grad_()
    mixed, bias, qn, kn = inputs
    doc_start = (torch.rand(s, b, device=dev) < 0.02) if docs else None
    args = (mixed, layout, bias, doc_start, qn, kn, 1e-6)
    eager = extras.prepare(*args)
    fused = extras.fused(extras.prepare, True, dev)(*args)
    cot = [torch.randn_like(t) for t in eager]
    for name, a, e in zip(("q", "k", "v", "log_f", "ogate"), fused, eager):
        assert a.dtype == e.dtype and a.shape == e.shape
        if name != "ogate":
            assert a.transpose(0, 1).is_contiguous() and e.transpose(0, 1).is_contiguous(), name
        _close(a, e, name)
    for i, (a, e) in enumerate(zip(torch.autograd.grad(fused, inputs, cot), torch.autograd.grad(eager, inputs, cot))):
        _close(a, e, f"grad of input {i}")

    out = torch.randn(s, b, h, d, **bf).requires_grad_()
    ogate = torch.randn(s, b, h, d, **bf).requires_grad_()
    onorm = (1 + 0.1 * torch.randn(h, d, **bf)).requires_grad_()
    eager = extras.finish(out, ogate, onorm, 1e-6)
    fused = extras.fused(extras.finish, True, dev)(out, ogate, onorm, 1e-6)
    _close(fused, eager, "finish")
    cot = torch.randn_like(eager)
    for a, e in zip(torch.autograd.grad(fused, (out, ogate, onorm), cot),
                    torch.autograd.grad(eager, (out, ogate, onorm), cot)):
        _close(a, e, "finish grad")


def test_fused_finish_with_zero_packed_parameters_compiles_once():
    """Output-norm weights as DeepSpeed's ZeRO leaves them: Parameters viewing a flat bf16
    buffer, one 16-byte aligned and one 2 bytes off (before the alignment fix this gave
    "misaligned address" on an H200). Both layers equal eager, forward and backward, and share
    one compiled graph."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    extras._compiled.clear()
    dev = torch.device("cuda")
    s, b, h, d = 300, 2, 4, 64
    bf = {"device": dev, "dtype": torch.bfloat16}
    flat = 1 + 0.1 * torch.randn(8 + 2 * h * d + 1, **bf)
    for offset in (8, 8 + h * d + 1):  # aligned, then 2 bytes off
        onorm = torch.nn.Parameter(flat[offset:offset + h * d].view(h, d))
        out = torch.randn(s, b, h, d, **bf).requires_grad_()
        ogate = torch.randn(s, b, h, d, **bf).requires_grad_()
        eager = extras.finish(out, ogate, onorm, 1e-6)
        fused = extras.fused(extras.finish, True, dev)(out, ogate, onorm, 1e-6)
        _close(fused, eager, f"finish at offset {offset}")
        cot = torch.randn_like(eager)
        for a, e in zip(torch.autograd.grad(fused, (out, ogate, onorm), cot),
                        torch.autograd.grad(eager, (out, ogate, onorm), cot)):
            _close(a, e, f"finish grad at offset {offset}")
    torch.cuda.synchronize()
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
