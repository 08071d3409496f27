"""--fox-forget-gate-type: the data-independent gate and ALiBi's fixed one against explicit
distance-decay attention (ALiBi, Press et al. 2022), written here without the FoX op."""

import math

import pytest
import torch

from megatron_fox.layers.head_params import alibi_slopes
from megatron_fox.ops.token_shift import head_rms_norm


def test_alibi_slopes_are_the_papers():
    """ALiBi's slopes: 2^-1 .. 2^-8 for 8 heads, 2^-0.5 .. 2^-8 for 16; 12 heads take the 8
    of 8 heads, then every other of 16 heads' (2^-0.5, 2^-1.5, 2^-2.5, 2^-3.5)."""
    torch.testing.assert_close(alibi_slopes(8), torch.tensor([2.0 ** -i for i in range(1, 9)], dtype=torch.float64))
    torch.testing.assert_close(alibi_slopes(16), torch.tensor([2.0 ** (-i / 2) for i in range(1, 17)],
                                                             dtype=torch.float64))
    twelve = [2.0 ** -i for i in range(1, 9)] + [2.0 ** -(i + 0.5) for i in range(4)]
    torch.testing.assert_close(alibi_slopes(12), torch.tensor(twelve, dtype=torch.float64))


def _layer(kind):
    from megatron_fox.layers import FoxSelfAttention, FoxTransformerConfig, get_fox_layer_spec

    cfg = FoxTransformerConfig(num_layers=1, hidden_size=64, num_attention_heads=4, num_query_groups=2,
                               ffn_hidden_size=128, normalization="RMSNorm", add_bias_linear=False,
                               hidden_dropout=0.0, attention_dropout=0.0, use_cpu_initialization=True,
                               layernorm_epsilon=1e-6, fox_kv_shift=False, fox_output_gate=False,
                               fox_output_norm=False, acp_log_eps=-10.0, fox_forget_gate_type=kind)
    spec = get_fox_layer_spec("local").submodules.self_attention
    return FoxSelfAttention(cfg, spec.submodules, layer_number=1)


def _alibi_attention(q, k, v, per_head_log_f):
    """Causal softmax(q.k / sqrt(d) + (i - j) log f_h) v in float64, one document: q [s, b, H, d],
    k, v [s, b, G, d] (GQA), per_head_log_f [H] (ALiBi: -m_h)."""
    s, b, H, d = q.shape
    k, v = (t.repeat_interleave(H // t.shape[2], dim=2) for t in (k, v))
    scores = torch.einsum("ibhd,jbhd->bhij", q.double(), k.double()) / math.sqrt(d)
    dist = torch.arange(s)[:, None] - torch.arange(s)[None, :]
    scores = scores + per_head_log_f.double()[:, None, None] * dist
    scores = scores.masked_fill(dist < 0, float("-inf"))
    return torch.einsum("bhij,jbhd->ibhd", scores.softmax(-1), v.double())


@pytest.mark.parametrize("kind", ["alibi", "data_independent"])
def test_fixed_and_data_independent_gates_are_distance_decay(megatron_world, kind):
    """The layer's output equals explicit distance-decay attention with ALiBi's slopes (the
    data-independent gate starts there); its projection holds no gate rows; the
    data-independent bias gets the gradient of (i - j) * logsigmoid(b_h), the fixed gate has
    no parameter."""
    layer = _layer(kind)
    with torch.no_grad():
        for p in layer.head_params.parameters():
            if p.dim() == 2:  # QK-norm weights: non-trivial
                p.add_(0.3 * torch.randn_like(p))
    s, b, H, G, d = 20, 2, 4, 2, 16
    assert layer.linear_qkv.weight.shape[0] == G * (2 * d + d + d)  # q of 2 heads, k, v per group: no gate
    x = torch.randn(s, b, 64, requires_grad=True)
    out, _ = layer(x)
    W = layer.linear_qkv.weight.detach()
    per_group = (x @ W.t()).view(s, b, G, 4 * d).split([2 * d, d, d], dim=-1)
    hp = layer.head_params
    q = head_rms_norm(per_group[0].reshape(s, b, H, d), hp.q_norm, 1e-5)
    k = head_rms_norm(per_group[1], hp.k_norm, 1e-5)
    m = alibi_slopes(H)
    if kind == "alibi":
        assert not any("fgate" in n for n, _ in layer.named_parameters())
        log_f = -m
    else:
        torch.testing.assert_close(torch.nn.functional.logsigmoid(hp.fgate_bias.double()), -m)  # init
        log_f = torch.nn.functional.logsigmoid(hp.fgate_bias.double())
    o = _alibi_attention(q, k, per_group[2], log_f)
    ref = o.reshape(s, b, H * d) @ layer.linear_proj.weight.detach().double().t()
    torch.testing.assert_close(out.double(), ref, rtol=2e-4, atol=2e-5)
    if kind == "data_independent":
        w = torch.randn_like(out)
        (g,) = torch.autograd.grad((out * w).sum(), hp.fgate_bias)
        (gr,) = torch.autograd.grad((ref * w.double()).sum(), hp.fgate_bias)
        torch.testing.assert_close(g.double(), gr.double(), rtol=2e-3, atol=2e-5)
        assert g.abs().min() > 0

