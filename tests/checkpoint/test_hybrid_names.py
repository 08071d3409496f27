"""The FoX GPTModel -> HybridModel ("*-" * N) weight-name map, on the CPU model (the GPU
test tests/gpu/test_hybrid.py checks it against a real HybridModel)."""

import re

import pytest
import torch

from megatron_fox.checkpoint import gpt_to_hybrid_names, hybrid_to_gpt_names

TINY = ["--num-layers", "3", "--hidden-size", "64", "--num-attention-heads", "4", "--ffn-hidden-size", "128",
        "--seq-length", "32", "--micro-batch-size", "1", "--global-batch-size", "1", "--vocab-size", "96",
        "--device", "cpu"]


def test_layers_split_into_attention_and_mlp_halves(megatron_world):
    from megatron_fox.training.arguments import parse_args
    from megatron_fox.training.model import build_model, padded_vocab_size, transformer_config

    args = parse_args(TINY)
    state = build_model(args, transformer_config(args, torch.device("cpu")), padded_vocab_size(96, args)).state_dict()
    mapped = gpt_to_hybrid_names(state)
    assert len(mapped) == len(state)
    halves = {}
    for name, value in mapped.items():
        m = re.match(r"decoder\.layers\.(\d+)\.([a-z_]+)\.", name)
        if m:
            halves.setdefault(int(m.group(1)), set()).add(m.group(2))
    assert sorted(halves) == list(range(6))
    for i, parts in halves.items():
        want = {"input_layernorm", "self_attention"} if i % 2 == 0 else {"pre_mlp_layernorm", "mlp"}
        assert parts == want, (i, parts)
    for name, value in state.items():  # each tensor lands once, under its layer's half
        m = re.match(r"decoder\.layers\.(\d+)\.(.*)$", name)
        if m:
            i, rest = int(m.group(1)), m.group(2)
            target = f"decoder.layers.{2 * i + (0 if rest.startswith(('input_layernorm', 'self_attention')) else 1)}.{rest}"
        elif name.startswith("decoder.final_layernorm"):
            target = name.replace("final_layernorm", "final_norm")
        else:
            target = name
        assert mapped[target] is value, name
    back = hybrid_to_gpt_names(mapped)  # and back, every tensor under its own name
    assert set(back) == set(state) and all(back[k] is v for k, v in state.items())
    swapped = {k.replace("layers.2.", "layers.3.") if "layers.2." in k else k: v for k, v in mapped.items()}
    with pytest.raises(ValueError, match="hybrid_layer_pattern"):
        hybrid_to_gpt_names(swapped)
