"""Block-level forward/backward of context parallelism (diagonal and past chunk) against the
plain-PyTorch block reference, with the merged output and log-sum-exp of other chunks."""

import pytest
import torch
import torch.nn.functional as F

from megatron_fox.ops.forgetting_attn.block import _reference_backward, _reference_forward, block_backward, block_forward

from .test_forgetting_attention import check_close, make_inputs


@pytest.mark.parametrize("causal", [True, False])
def test_block_forward_backward(causal, device):
    B, T, H, Hkv, D = 1, 40, 4, 2, 64
    q, k, v, _ = (t.detach() for t in make_inputs(B, T, H, Hkv, D, torch.float32, device))
    c = torch.cumsum(F.logsigmoid(torch.randn(B, H, 2 * T, device=device) + 2.0), -1)
    c_q, c_k = (c[..., :T], c[..., :T]) if causal else (c[..., T:], c[..., :T])
    o, lse, _ = block_forward(q, k, v, c_q, c_k, sm_scale=D ** -0.5, causal=causal)
    c_q0, c_k0 = c_q - c_k[..., :1], c_k - c_k[..., :1]
    o_ref, lse_ref = _reference_forward(q, k, v, c_q0, c_k0, D ** -0.5, causal, None)
    check_close(o, o_ref, torch.float32, "o")
    check_close(lse, lse_ref, torch.float32, "lse")
    # as if merged with other chunks' partial results (so the row sums of dS are not ~0)
    o, lse = o + 0.3 * torch.randn_like(o), lse + 0.7
    do = torch.randn_like(o)
    got = block_backward(q, k, v, o, do, lse, c_q, c_k, sm_scale=D ** -0.5, causal=causal)
    ref = _reference_backward(q, k, v, o, do, lse, c_q0, c_k0, D ** -0.5, causal, None)
    for name, g, gr in zip(["dq", "dk", "dv", "dc_q", "dc_k"], got, ref):
        assert gr.abs().max() > 0, name
        check_close(g, gr, torch.float32, name)
