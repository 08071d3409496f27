"""Model FLOPs in the throughput log (training/flops.py) against torch's FLOP counter on a
forward of the model, with the attention op swapped for the dense reference (whose two
s x s products the counter sees)."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from megatron_fox.ops import forgetting_attention_reference
from megatron_fox.training.cpu_compat import route_megatron_buffers_to_cpu
from megatron_fox.training.flops import attention_flops, matmul_weight_elements, step_flops

TINY = ["--num-layers", "3", "--hidden-size", "64", "--num-attention-heads", "4", "--num-query-groups", "2",
        "--ffn-hidden-size", "128", "--seq-length", "40", "--micro-batch-size", "2", "--global-batch-size", "2",
        "--vocab-size", "96", "--device", "cpu"]


@pytest.mark.parametrize("tied,extras,moe", [(False, True, False), (True, True, False), (False, False, False),
                                             (True, False, False), (False, True, True)])
def test_step_flops_match_flop_counter(megatron_world, monkeypatch, tied, extras, moe):
    """moe: layers 0 and 2 with 4 experts, top-2 (every token's matmuls through 2 of them,
    the router's and a shared expert's), layer 1 dense."""
    from megatron_fox.layers import core_attention
    from megatron_fox.training.arguments import parse_args
    from megatron_fox.training.model import build_model, padded_vocab_size, transformer_config

    route_megatron_buffers_to_cpu()
    flags = TINY + ([] if not tied else ["--no-untie-embeddings-and-output-weights"])
    flags += [] if extras else ["--no-fox-output-gate", "--no-fox-kv-shift", "--no-fox-qk-norm", "--no-acp"]
    flags += ["--num-experts", "4", "--moe-router-topk", "2", "--moe-ffn-hidden-size", "48", "--moe-layer-freq", "2",
              "--moe-shared-expert-intermediate-size", "40"] if moe else []
    args = parse_args(flags)
    model = build_model(args, transformer_config(args, torch.device("cpu")), padded_vocab_size(96, args)).eval()
    monkeypatch.setattr(core_attention, "forgetting_attention",
                        lambda *a, backward_pruning=None, **kw: forgetting_attention_reference(*a, **kw))
    tokens = torch.randint(0, 96, (2, 40))
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(tokens, None, None)
    measured = counter.get_total_flops()

    W = matmul_weight_elements(model, 2 / 4 if moe else 1.0)
    b, s, layers, heads, dh = 2, 40, 3, 4, 16
    dense_attention = layers * b * attention_flops(s, heads, dh, causal=False)
    assert measured == 2 * b * s * W + dense_attention
    # the logged step counts the causal pairs only, forward and backward
    causal_pairs = int(torch.ones(s, s).tril().sum())
    assert attention_flops(s, heads, dh) == 4 * heads * dh * causal_pairs
    assert step_flops(args, W) == 3 * (2 * b * s * W + layers * b * attention_flops(s, heads, dh))
    assert W > 3 * (64 * (48 if moe else 128) * 3)  # at least the SwiGLU weights of every layer


def test_params_norm_is_the_norm_of_all_parameters(megatron_world):
    from megatron_fox.training.arguments import parse_args
    from megatron_fox.training.flops import params_l2_norm
    from megatron_fox.training.model import build_model, padded_vocab_size, transformer_config

    route_megatron_buffers_to_cpu()
    args = parse_args(TINY)
    model = build_model(args, transformer_config(args, torch.device("cpu")), padded_vocab_size(96, args))
    flat = torch.cat([p.detach().double().flatten() for p in model.parameters()])
    assert params_l2_norm(model) == pytest.approx(flat.norm().item(), rel=1e-9)
