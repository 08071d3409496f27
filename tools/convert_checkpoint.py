"""Convert between the public FoX code's Hugging Face checkpoints and megatron_fox.

    # public -> megatron_fox: a full (TP = PP = 1) state dict for --pretrained-checkpoint
    python tools/convert_checkpoint.py from-public --input fox-pro-760m-longcrawl64-48b/ \\
        --output fox_pro_760m.pt --config configs/fox_pro_760m.yaml --vocab-size 50257
    # megatron_fox full state dict -> public names (model.safetensors needs `safetensors`)
    python tools/convert_checkpoint.py to-public --input fox_pro_760m.pt --output out/pytorch_model.bin \\
        --config configs/fox_pro_760m.yaml --share-qk-norm
    # a training checkpoint (megatron_fox.train --save, any TP/PP) -> a full state dict
    python tools/convert_checkpoint.py from-megatron --input checkpoints/760m --output fox_pro_760m.pt \\
        --config configs/fox_pro_760m.yaml --vocab-size 50257 [--iteration N]
    # or with the model's flags saved in the checkpoint (args.json)
    python tools/convert_checkpoint.py from-megatron --input checkpoints/760m --output fox_pro_760m.pt \\
        --use-checkpoint-args

The model options (layers, heads, FoX-Pro switches, tied embeddings) come from the usual
training flags / --config and must match the checkpoint; a mismatch stops with the tensor
name. The released checkpoints share the QK-norm weights across heads: they are expanded
per head on import (megatron_fox's norms are per head), and --share-qk-norm writes them back
shared. Their QK-norm epsilon is 1e-5 (megatron_fox's --fox-qk-norm-eps default).
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _from_megatron(root: str, iteration, args) -> dict:
    """The full state dict (GPTModel names) of the checkpoint under root: per-rank files
    merged, or a dist_checkpointing folder loaded into a TP = PP = 1 model of this config
    (a HybridModel "*-" * N renamed to the GPTModel's layers)."""
    from megatron_fox.checkpoint import hybrid_to_gpt_names, iteration_dir, read_latest
    from megatron_fox.checkpoint.export import merge_rank_files, rank_files

    path = iteration_dir(root, read_latest(root) if iteration is None else iteration)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"input: no checkpoint folder {path}")
    if rank_files(path):
        return merge_rank_files(path, args.num_layers)
    if args.vocab_size is None:
        raise ValueError("vocab_size: give --vocab-size (the tokenizer's) to rebuild the model")
    from megatron.core import dist_checkpointing

    from megatron_fox.train import init_distributed
    from megatron_fox.training.model import build_model, embedding_ids, padded_vocab_size, transformer_config

    for key in ("tensor_model_parallel_size", "pipeline_model_parallel_size", "context_parallel_size"):
        setattr(args, key, 1)  # one process holds the whole model; the loader reshards
    device = init_distributed(args)
    model = build_model(args, transformer_config(args, device), padded_vocab_size(embedding_ids(args), args))
    try:
        loaded = dist_checkpointing.load({"model": model.sharded_state_dict()}, path)["model"]
    except dist_checkpointing.core.CheckpointingException as e:
        raise ValueError(f"input: {path} does not load into this config's model: {e}") from e
    model.load_state_dict(loaded)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
    return state if args.hybrid_layer_pattern is None else hybrid_to_gpt_names(state)


def main(argv=None) -> None:
    # no abbreviations: the training flags in the rest must reach parse_args whole
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("direction", choices=["from-public", "to-public", "from-megatron"])
    p.add_argument("--input", required=True, help="file or Hugging Face model folder")
    p.add_argument("--output", required=True, help=".pt / .bin file (or .safetensors)")
    p.add_argument("--share-qk-norm", action="store_true", help="to-public: one QK-norm vector for all heads")
    p.add_argument("--iteration", type=int, default=None,
                   help="from-megatron: the checkpoint's iteration (default: the latest)")
    opts, rest = p.parse_known_args(argv)

    import torch

    from megatron_fox.checkpoint.public_fox import FoxLayout, from_public_fox, load_state_file, to_public_fox
    from megatron_fox.training.arguments import parse_or_exit

    if opts.direction == "from-megatron" and "--use-checkpoint-args" in rest and "--load" not in rest:
        rest = [*rest, "--load", opts.input]  # the model's flags saved with the input checkpoint
    args = parse_or_exit(rest, "convert_checkpoint")
    layout = FoxLayout.from_args(args)
    try:
        if opts.direction != "from-megatron" and (not args.fox_forget_gate or args.position_embedding_type != "none"):
            raise ValueError("fox_forget_gate / position_embedding_type: the public FoX format holds FoX models "
                             "(forget gate, no position embedding), not the Transformer baseline or rope")
        if opts.direction != "from-megatron" and args.fox_forget_gate_type != "data_dependent":
            raise ValueError("fox_forget_gate_type: the public FoX format holds data-dependent forget gates")
        if opts.direction != "from-megatron" and args.num_experts is not None:
            raise ValueError("num_experts: the public FoX format holds dense MLPs, not Mixture-of-Experts layers")
        if opts.direction == "from-megatron":
            out = _from_megatron(opts.input, opts.iteration, args)
        elif opts.direction == "from-public":
            out = from_public_fox(load_state_file(opts.input), layout)
        else:
            out = to_public_fox(load_state_file(opts.input), layout, share_qk_norm=opts.share_qk_norm)
    except (KeyError, ValueError, FileNotFoundError, ImportError) as e:
        print(f"convert_checkpoint: error: {e}", file=sys.stderr)
        sys.exit(2)
    os.makedirs(os.path.dirname(os.path.abspath(opts.output)), exist_ok=True)
    out = {k: v.contiguous() for k, v in out.items()}
    if opts.output.endswith(".safetensors"):
        from safetensors.torch import save_file

        save_file(out, opts.output)
    else:
        torch.save(out, opts.output)
    n = sum(t.numel() for t in out.values())
    print(f"wrote {opts.output}: {len(out)} tensors, {n / 1e6:.1f}M values ({opts.direction})")


if __name__ == "__main__":
    main()
