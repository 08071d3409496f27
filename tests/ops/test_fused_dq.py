"""The fused-dQ backward (dQ by atomic adds in the key-major kernel) against the reference.

Same tolerances as test_forgetting_attention.py; the two-kernel backward is the default
there, these tests switch the fused one on for the op and for the context-parallel block
functions (causal diagonal block and a fully visible past block).
"""

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from megatron_fox.ops import forgetting_attention, forgetting_attention_reference, kernel_config, set_deterministic, set_kernel_config
from megatron_fox.ops.forgetting_attn.block import _reference_backward, block_backward, block_forward

from .test_forgetting_attention import check_close, grads, make_inputs


@pytest.fixture
def fused(device):
    """Call with the input dtype: the default tiles of that dtype with fused dQ switched on."""
    def use(dtype=torch.float32):
        set_kernel_config(dataclasses.replace(kernel_config(128, device, dtype), fused_dq=True))
    yield use
    set_kernel_config(None)
    set_deterministic(False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("H,Hkv,D", [(2, 2, 128), (4, 2, 64)])
@pytest.mark.parametrize("log_eps", [None, -10.0])
def test_fused_dq_matches_reference(dtype, H, Hkv, D, log_eps, device, fused):
    fused(dtype)
    q, k, v, log_f = make_inputs(2, 53, H, Hkv, D, dtype, device, gate_shift=-1.0, rms_norm=True)
    out, stats = forgetting_attention(q, k, v, log_f, log_eps=log_eps, return_stats=True)
    if log_eps is not None:
        assert stats.skipped_fraction.item() > 0  # the kernel really skips blocks
    ref = forgetting_attention_reference(q, k, v, log_f, dtype=torch.float64)
    check_close(out, ref, dtype, "out")
    dout = torch.randn_like(out)
    for name, g, gr in zip("q k v log_fgate".split(), grads(out, (q, k, v, log_f), dout),
                           grads(ref, (q, k, v, log_f), dout)):
        check_close(g, gr, dtype, f"d{name}")


def test_fused_dq_packed_documents(device, fused):
    fused()
    q, k, v, log_f = make_inputs(1, 70, 4, 2, 64, torch.float32, device, gate_shift=0.0)
    cu = torch.tensor([0, 1, 30, 47, 70], dtype=torch.int32, device=device)
    out = forgetting_attention(q, k, v, log_f, cu_seqlens=cu)
    ref = forgetting_attention_reference(q, k, v, log_f, cu_seqlens=cu, dtype=torch.float64)
    dout = torch.randn_like(out)
    for name, g, gr in zip("q k v log_fgate".split(), grads(out, (q, k, v, log_f), dout),
                           grads(ref, (q, k, v, log_f), dout)):
        check_close(g, gr, torch.float32, f"d{name}")


@pytest.mark.parametrize("causal", [True, False])
def test_fused_dq_block_backward(causal, device, fused):
    fused()
    B, T, H, Hkv, D = 1, 40, 4, 2, 64
    q, k, v, log_f = make_inputs(B, T, H, Hkv, D, torch.float32, device)
    c = torch.cumsum(F.logsigmoid(torch.randn(B, H, 2 * T, device=device) + 2.0), -1)
    c_q, c_k = (c[..., T:], c[..., :T]) if not causal else (c[..., :T], c[..., :T])
    q, k, v = (t.detach() for t in (q, k, v))
    o, lse, _ = block_forward(q, k, v, c_q, c_k, sm_scale=D ** -0.5, causal=causal)
    do = torch.randn_like(o)
    # as if merged with other chunks' partial results (so the row sums of dS are not ~0)
    o, lse = o + 0.3 * torch.randn_like(o), lse + 0.7
    got = block_backward(q, k, v, o, do, lse, c_q, c_k, sm_scale=D ** -0.5, causal=causal)
    ref = _reference_backward(q, k, v, o, do, lse, c_q - c_k[..., :1], c_k - c_k[..., :1], D ** -0.5, causal, None)
    assert got[0].abs().max() > 0
    for name, g, gr in zip(["dq", "dk", "dv", "dc_q", "dc_k"], got, ref):
        check_close(g, gr, torch.float32, name)


def test_deterministic_mode_turns_fused_dq_off(device, fused):
    fused()
    assert kernel_config(64, device).fused_dq
    set_deterministic(True)
    assert not kernel_config(64, device).fused_dq
    q, k, v, log_f = make_inputs(1, 40, 2, 2, 64, torch.float32, device)
    out = forgetting_attention(q, k, v, log_f)
    dout = torch.randn_like(out)
    first = grads(out, (q, k, v, log_f), dout)
    second = grads(forgetting_attention(q, k, v, log_f), (q, k, v, log_f), dout)
    for a, b in zip(first, second):
        assert torch.equal(a, b)
