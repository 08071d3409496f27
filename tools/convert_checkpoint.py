"""Convert between the public FoX code's Hugging Face checkpoints and megatron_fox.

    # public -> megatron_fox: a full (TP = PP = 1) state dict for --pretrained-checkpoint
    python tools/convert_checkpoint.py from-public --input fox-pro-760m-longcrawl64-48b/ \\
        --output fox_pro_760m.pt --config configs/fox_pro_760m.yaml --vocab-size 50257
    # megatron_fox full state dict -> public names (model.safetensors needs `safetensors`)
    python tools/convert_checkpoint.py to-public --input fox_pro_760m.pt --output out/pytorch_model.bin \\
        --config configs/fox_pro_760m.yaml --share-qk-norm

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


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("direction", choices=["from-public", "to-public"])
    p.add_argument("--input", required=True, help="file or Hugging Face model folder")
    p.add_argument("--output", required=True, help=".pt / .bin file (or .safetensors)")
    p.add_argument("--share-qk-norm", action="store_true", help="to-public: one QK-norm vector for all heads")
    opts, rest = p.parse_known_args(argv)

    import torch

    from megatron_fox.checkpoint.public_fox import FoxLayout, from_public_fox, load_state_file, to_public_fox
    from megatron_fox.training.arguments import parse_args

    args = parse_args(rest)
    layout = FoxLayout.from_args(args)
    try:
        state = load_state_file(opts.input)
        if opts.direction == "from-public":
            out = from_public_fox(state, layout)
        else:
            out = to_public_fox(state, layout, share_qk_norm=opts.share_qk_norm)
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
