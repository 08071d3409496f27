"""The Transformer baseline's attention on CUDA (no forget gate: torch SDPA) equals softmax
attention computed in float64, forward and gradients, and the FoX op's path with log f = 0
(what it takes with packed documents). Runs only with MEGATRON_FOX_TEST_GPU=1 and CUDA."""

import os

import pytest
import torch

from megatron_fox.ops import forgetting_attention_reference

pytestmark = pytest.mark.skipif(
    os.environ.get("MEGATRON_FOX_TEST_GPU") != "1" or not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()


@pytest.mark.parametrize("d", [64, 128])
def test_sdpa_path_matches_float64_softmax_attention(d):
    from megatron_fox.layers import FoxCoreAttention, FoxTransformerConfig

    cfg = FoxTransformerConfig(num_layers=1, hidden_size=4 * d, num_attention_heads=4, num_query_groups=2,
                               use_cpu_initialization=True, fox_forget_gate=False, acp_log_eps=None)
    attn = FoxCoreAttention(cfg)
    s, b, h, g = 333, 2, 4, 2
    bf = {"device": "cuda", "dtype": torch.bfloat16, "requires_grad": True}
    q, k, v = torch.randn(s, b, h, d, **bf), torch.randn(s, b, g, d, **bf), torch.randn(s, b, g, d, **bf)
    out = attn(q, k, v, None)
    assert attn.skipped_fraction is None  # SDPA: nothing skipped, nothing reported
    zeros = torch.zeros(b, s, h, device="cuda")
    via_op = attn(q, k, v, zeros.transpose(0, 1))  # the Triton op, exact
    q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
    ref = forgetting_attention_reference(q32.transpose(0, 1), k32.transpose(0, 1), v32.transpose(0, 1), zeros,
                                         dtype=torch.float64).transpose(0, 1)
    assert _rel(out, ref) < 1e-2 and _rel(via_op, ref) < 1e-2, (_rel(out, ref), _rel(via_op, ref))
    cot = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), cot)
    grads_op = torch.autograd.grad(via_op, (q, k, v), cot)
    grads_ref = torch.autograd.grad(ref, (q32, k32, v32), cot.to(ref.dtype))
    for name, a, o, r in zip("qkv", grads, grads_op, grads_ref):
        assert _rel(a, r) < 2e-2 and _rel(o, r) < 2e-2, (name, _rel(a, r), _rel(o, r))
