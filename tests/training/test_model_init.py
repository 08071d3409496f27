"""The trainer's model build: the layout-invariant initialisation keeps the fused
projection's alignment rows zero (it re-draws every matrix, those rows included)."""

import torch

from megatron_fox.training.cpu_compat import route_megatron_buffers_to_cpu


def test_built_model_has_zero_alignment_rows_and_random_others(megatron_world):
    from megatron_fox.training.arguments import parse_args
    from megatron_fox.training.model import build_model, padded_vocab_size, transformer_config

    route_megatron_buffers_to_cpu()
    # 4 heads of 16 in 2 groups: q 32 | k 16 | v 16 | forget gate 2 | output gate 32 | shift 2 = 100 rows, 4 to align
    args = parse_args(["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4",
                       "--num-query-groups", "2", "--ffn-hidden-size", "128", "--seq-length", "32",
                       "--micro-batch-size", "2", "--global-batch-size", "2", "--vocab-size", "96", "--device", "cpu"])
    model = build_model(args, transformer_config(args, torch.device("cpu")), padded_vocab_size(96, args))
    weights = {n: p for n, p in model.named_parameters() if n.endswith("linear_qkv.weight")}
    assert len(weights) == 2
    for name, w in weights.items():
        assert w.shape == (2 * 104, 64), name
        rows = w.detach().view(2, 104, 64)
        assert rows[:, 100:].abs().max() == 0, name
        assert rows[:, :100].abs().min(-1).values.gt(0).all(), name  # every real row drawn
        assert abs(rows[:, :100].std().item() - args.init_method_std) < 0.2 * args.init_method_std
