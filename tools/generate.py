"""Generate text with a trained FoX model (one process; CPU or one GPU).

    python tools/generate.py --config configs/tiny.yaml --load checkpoints/tiny \\
        --prompt "def main(" --max-new-tokens 64 [--temperature 0.8 --top-k 40 --top-p 0.95] [--evict-log-eps -10]

Training flags (--config, model sizes, --data-path/--tokenizer-model, --device, ...) are the
ones the model was trained with; without --data-path the embedded corpus's tokenizer is used,
as in training. Cached keys that ACP has pruned for good are evicted (the bound needs
QK-norm; --evict-log-eps none keeps every key). Prints the text and the cache sizes.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _log_eps(value: str):
    if value.lower() == "none":
        return None
    try:
        return float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number <= 0 or 'none', got {value!r}") from None


def main(argv=None) -> None:
    # no abbreviations: the training flags in the rest must reach parse_args whole
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling: the most likely tokens up to this "
                                                             "probability (with --temperature > 0)")
    p.add_argument("--evict-log-eps", type=_log_eps, default=-10.0, help="ACP eviction tolerance, or 'none'")
    p.add_argument("--max-length", type=int, default=None, help="prompt + generation bound (default: seq length)")
    p.add_argument("--gen-seed", type=int, default=0)
    p.add_argument("--context-pruning-alpha", type=float, default=float("inf"),
                   help="a model trained with --fox-context-pruning: the sparse sigmoid's alpha of the keep "
                        "decisions (inf: hard, keep iff the score is > 0)")
    p.add_argument("--check", action="store_true",
                   help="also compare cached decoding (no eviction) with the full forward pass on the output")
    opts, rest = p.parse_known_args(argv)

    import torch

    from megatron_fox.inference import FoxGenerator
    from megatron_fox.train import build_model_and_engine, for_inference, init_distributed, tokenizer_for
    from megatron_fox.training.arguments import parse_or_exit

    args = parse_or_exit(rest, "generate")
    if args.load is None and args.pretrained_checkpoint is None:
        p.error("--load (a checkpoint directory written by megatron_fox.train --save) or "
                "--pretrained-checkpoint (a full state dict) is required")
    for_inference(args)
    device = init_distributed(args)
    tokenizer = tokenizer_for(args)
    _, engine, step, _ = build_model_and_engine(args, device, tokenizer)
    max_length = args.seq_length if opts.max_length is None else opts.max_length
    try:
        gen = FoxGenerator(engine.model, max_length, evict_log_eps=opts.evict_log_eps,
                           context_pruning_alpha=opts.context_pruning_alpha)
        prompt = torch.tensor([tokenizer.tokenize(opts.prompt)], dtype=torch.long, device=device)
        t0 = time.perf_counter()
        out, cache = gen.generate(prompt, opts.max_new_tokens, temperature=opts.temperature, top_k=opts.top_k,
                                  top_p=opts.top_p, eod=tokenizer.eod,
                                  generator=torch.Generator(device=device).manual_seed(opts.gen_seed))
    except ValueError as e:
        print(f"generate: error: {e}", file=sys.stderr)
        sys.exit(2)
    dt = time.perf_counter() - t0
    new = out.shape[1] - prompt.shape[1]
    print(tokenizer.detokenize(out[0].tolist()))
    print(f"\n[checkpoint step {step}; {new} new tokens in {dt:.2f} s; cached keys per layer "
          f"{cache.cached_keys()}, evicted {cache.evicted_keys()}, dropped by context pruning "
          f"{cache.dropped_keys()}]", file=sys.stderr)
    if opts.check:
        err = _decode_error(gen, out, prompt.shape[1])
        print(f"[check: max |decoded - full forward| / max |full forward| = {err:.2e}]", file=sys.stderr)
        if err > 2e-2:
            sys.exit(3)


def _decode_error(gen, tokens, prompt_len):
    """Relative max error of teacher-forced cached decoding (no eviction) against the full
    forward pass of the model on the same tokens."""
    import torch

    from megatron_fox.inference import FoxGenerator

    exact = FoxGenerator(gen.model, gen.max_length, evict_log_eps=None,
                         context_pruning_alpha=gen.context_pruning_alpha)
    cache = exact.new_cache()
    parts = [exact.forward(tokens[:, :prompt_len], cache)]
    parts += [exact.forward(tokens[:, t:t + 1], cache) for t in range(prompt_len, tokens.shape[1])]
    with torch.no_grad():
        full = gen.model(tokens, None, None).float()
    return ((torch.cat(parts, dim=1) - full).abs().max() / full.abs().max()).item()


if __name__ == "__main__":
    main()
