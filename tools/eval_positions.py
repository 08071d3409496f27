"""Loss by position in the document: the long-context evaluation of the FoX papers.

    python tools/eval_positions.py --config configs/fox_pro_125m.yaml --load checkpoints/125m \\
        --eval-samples 64 --bins 12 --compare-acp --json loss_by_position.json

Runs the model (one process, TP = PP = CP = 1) over samples of the validation split (or
--dataset train), takes each token's loss, and averages it over log-spaced bins of its
position inside its document (documents restart the position, as they restart attention
and the forget gate). --compare-acp evaluates the same tokens with ACP off too and reports
the difference per bin: ACP should not change the loss at any position. A model fine-tuned
with --fox-context-pruning is evaluated with its hard keep decisions (--context-pruning-alpha,
default inf, as in decoding) and the fraction of token pairs it kept is printed;
--compare-context-pruning evaluates the same tokens with every token kept too.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def position_bins(max_len: int, bins: int) -> list[int]:
    """Edges [0, 1, ..., max_len] of at most `bins` log-spaced bins over positions."""
    edges = sorted({0} | {int(round(math.exp(math.log(max_len) * i / bins))) for i in range(bins + 1)})
    return [e for e in edges if e < max_len] + [max_len]


def loss_by_position(model, dataset, args, eod: int, samples: int, edges: list[int]):
    """Per-bin (sum of token losses, token count) over the first `samples` samples, and the
    mean kept fraction of learned context pruning (None where the model has none or it is off)."""
    import torch

    from megatron_fox.layers.context_pruning import context_pruning_modules
    from megatron_fox.training.step import collate, model_forward, with_documents

    pruning = [m for m in context_pruning_modules(model) if m.enabled]
    kept = []
    sums, counts = torch.zeros(len(edges) - 1, dtype=torch.float64), torch.zeros(len(edges) - 1, dtype=torch.float64)
    device = next(model.parameters()).device
    bounds = torch.tensor(edges[1:-1])
    from tqdm import tqdm

    for i in tqdm(range(samples), desc="samples", disable=not args.progress_bar, dynamic_ncols=True):
        batch = with_documents(collate([dataset[i % len(dataset)]]), eod)
        cu = batch["cu_seqlens"].long()
        s = batch["tokens"].shape[1]
        t = torch.arange(s)
        pos = t - cu[torch.searchsorted(cu, t, right=True) - 1]  # position inside its document
        with torch.no_grad():
            loss = model_forward(model, {k: v.to(device) for k, v in batch.items()}, args, eod)[0].double().cpu()
        kept += [float(m.last_kept_fraction) for m in pruning]
        mask = batch["loss_mask"][0].bool()
        which = torch.bucketize(pos, bounds, right=True)
        sums.index_add_(0, which[mask], loss[mask])
        counts.index_add_(0, which[mask], torch.ones_like(loss[mask]))
    return sums, counts, (sum(kept) / len(kept) if kept else None)


def main(argv=None) -> None:
    # no abbreviations: the training flags in the rest must reach parse_args whole
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--eval-samples", type=int, default=32)
    p.add_argument("--bins", type=int, default=12)
    p.add_argument("--dataset", choices=["valid", "train"], default="valid")
    p.add_argument("--compare-acp", action="store_true", help="also evaluate with ACP off; report the difference")
    p.add_argument("--context-pruning-alpha", type=float, default=float("inf"),
                   help="learned context pruning's sparse-sigmoid alpha (inf: hard decisions, as in decoding)")
    p.add_argument("--compare-context-pruning", action="store_true",
                   help="also evaluate with every token kept (needs --fox-context-pruning)")
    p.add_argument("--json", default=None)
    opts, rest = p.parse_known_args(argv)

    from megatron_fox.train import build_data, build_model_and_engine, for_inference, init_distributed
    from megatron_fox.training.arguments import parse_or_exit

    args = parse_or_exit(rest, "eval_positions")
    for key in ("tensor_model_parallel_size", "pipeline_model_parallel_size", "context_parallel_size"):
        if getattr(args, key) != 1:
            p.error(f"--{key.replace('_', '-')} must be 1 here (one process)")
    if opts.eval_samples < 1 or opts.bins < 1:
        p.error("--eval-samples and --bins must be >= 1")
    if not opts.context_pruning_alpha >= 1:
        p.error(f"--context-pruning-alpha must be >= 1, got {opts.context_pruning_alpha}")
    if opts.compare_context_pruning and not args.fox_context_pruning:
        p.error("--compare-context-pruning needs a model with --fox-context-pruning")
    if opts.dataset == "valid":  # make the builder carve out enough validation samples
        args.eval_interval, args.eval_iters = max(1, args.train_iters), -(-opts.eval_samples // args.global_batch_size)
    for_inference(args)
    device = init_distributed(args)
    train_ds, valid_ds, _, tokenizer = build_data(args)
    dataset = valid_ds if opts.dataset == "valid" else train_ds
    if dataset is None or len(dataset) == 0:
        p.error(f"the {opts.dataset} split is empty (see --split, or --valid-data-path)")
    model, engine, step, _ = build_model_and_engine(args, device, tokenizer)
    engine.model.eval()
    edges = position_bins(args.seq_length, opts.bins)
    from megatron_fox.layers.context_pruning import set_context_pruning_state

    set_context_pruning_state(model, alpha=opts.context_pruning_alpha)
    base = "pruned" if args.fox_context_pruning else "acp" if args.acp else "exact"
    runs = {base: (model.config.acp_log_eps, True)}  # name: (ACP's log_eps, learned pruning on)
    if opts.compare_acp and args.acp:
        runs["exact"] = (None, True)
    if opts.compare_context_pruning:
        runs["all kept"] = (model.config.acp_log_eps, False)
    results = {}
    for name, (log_eps, pruning) in runs.items():
        model.config.acp_log_eps = log_eps  # every layer reads the shared config at forward time
        set_context_pruning_state(model, enabled=pruning)
        sums, counts, kept = loss_by_position(engine.model, dataset, args, tokenizer.eod, opts.eval_samples, edges)
        results[name] = {"loss": (sums / counts.clamp_min(1)).tolist(), "tokens": counts.long().tolist(),
                         "overall": (sums.sum() / counts.sum()).item(), "kept": kept}
    rows = [{"positions": [edges[b], edges[b + 1]], "tokens": results[next(iter(results))]["tokens"][b],
             **{f"loss_{n}": r["loss"][b] for n, r in results.items()}} for b in range(len(edges) - 1)]
    print(f"checkpoint step {step}; {opts.eval_samples} samples of {args.seq_length} tokens ({opts.dataset})")
    print("| positions | tokens | " + " | ".join(f"loss ({n})" for n in results) + " |")
    print("|---|---|" + "---|" * len(results))
    for r in rows:
        print(f"| {r['positions'][0]}-{r['positions'][1] - 1} | {r['tokens']} | "
              + " | ".join(f"{r[f'loss_{n}']:.4f}" for n in results) + " |")
    summary = {n: r["overall"] for n, r in results.items()}
    summary.update({f"kept_{n}": r["kept"] for n, r in results.items() if r["kept"] is not None})
    if base != "exact" and "exact" in results:
        summary["max_abs_diff_by_bin"] = max(abs(a - b) for a, b, c in zip(
            results[base]["loss"], results["exact"]["loss"], results[base]["tokens"]) if c)
    print("overall:", json.dumps(summary))
    if opts.json:
        with open(opts.json, "w") as f:
            json.dump({"step": step, "samples": opts.eval_samples, "rows": rows, "summary": summary}, f, indent=1)


if __name__ == "__main__":
    main()
