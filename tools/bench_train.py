"""Training throughput and loss of a FoX config with ACP off and on (--acp-modes), same data.

    python tools/bench_train.py --config configs/fox_pro_125m.yaml --lengths 4096 16384 \
        --tokens-per-step 131072 --train-iters 40

One GPU, or several under `torchrun --nproc-per-node N tools/bench_train.py ...` (rank 0
reports tokens/s of the whole job and rank 0's memory; layout flags such as
--expert-model-parallel-size after `--`).

Each (length, ACP) pair trains from the same seed on the same batches (the embedded corpus
unless --data-path is given) and reports median tokens/s after warm-up, the mean loss of the
last 10 steps, and the fraction of attention FLOPs skipped in the forward and the backward.
ACP off is exact FoX, which still skips the blocks whose weights are zero in float32 (the
same numbers to the bit; MEGATRON_FOX_SKIP_ZERO=0 computes every block).

Baselines of the same size in the same trainer: mode `transformer` is a Llama-style
Transformer (RoPE, no forget gate, none of FoX-Pro's gates, norms or shifts; attention by
torch SDPA, cuDNN first, across document borders as Megatron-LM's default), mode
`transformer-pro` the same with FoX-Pro's output gate, output norm, QK-norm and KV-shift.
"""

from __future__ import annotations

import argparse
import collections
import cProfile
import io
import pstats
import gc
import json
import os
import statistics
import time
import warnings

import torch


def _profiled(run, args, top=28):
    """Train under torch.profiler (CUDA activity, steps 5-7 recorded): the kernels by total
    time a step and how busy the GPU was over those steps' wall time. Then cProfile over
    steps 9-11 (apart, so its overhead does not enter the busy figure): the host-side Python
    functions by own time (needs --train-iters >= 11)."""
    from torch.profiler import ProfilerActivity, profile, schedule

    # repeat=1: one window; with the default (0) the cycle restarts and the averages would
    # hold whatever the last, possibly partial, window recorded
    prof = profile(activities=[ProfilerActivity.CUDA], schedule=schedule(wait=3, warmup=1, active=3, repeat=1))
    host = cProfile.Profile()
    marks, syncs = [], warnings.catch_warnings(record=True)

    def on_step(step, record):
        marks.append(time.perf_counter())
        prof.step()
        if step == 7:  # step 8 runs in torch's sync debug mode: every stream sync it makes is listed
            syncs.caught = syncs.__enter__()
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
        elif step == 8:
            torch.cuda.set_sync_debug_mode(0)
            syncs.__exit__(None, None, None)
            host.enable()
        elif step == 11:
            host.disable()

    with prof:
        hist = run(args, on_step=on_step)
    found = collections.Counter(f"{os.path.relpath(w.filename)}:{w.lineno}" for w in getattr(syncs, "caught", [])
                                if "synchroniz" in str(w.message).lower())
    print(f"stream syncs in step 8: {sum(found.values())}" + "".join(f"\n  {n:4d} x {where}" for where, n in
                                                                  found.most_common(12)))
    events = [e for e in prof.key_averages() if e.device_time_total > 0]
    kernel_ms = sum(e.self_device_time_total for e in events) / 3 / 1e3
    step_ms = statistics.median(1e3 * (b - a) for a, b in zip(marks[3:6], marks[4:7]))
    print(f"profile L={args.seq_length} ACP={'on' if args.acp else 'off'}: step {step_ms:.1f} ms wall, "
          f"CUDA kernels {kernel_ms:.1f} ms a step ({100 * kernel_ms / step_ms:.0f}% busy)")
    for e in sorted(events, key=lambda e: -e.self_device_time_total)[:top]:
        print(f"  {e.self_device_time_total / 3 / 1e3:8.2f} ms  x{e.count // 3:<5d} {e.key[:100]}")
    if len(marks) < 11:
        print("host profile skipped: it needs --train-iters >= 11")
        return hist
    print("host (Python) time of steps 9-11, by function's own time:")
    out = io.StringIO()
    pstats.Stats(host, stream=out).sort_stats("tottime").print_stats(top)
    print("\n".join(line for line in out.getvalue().splitlines() if line.strip())[-6000:])
    return hist


_TRANSFORMER = ["--no-fox-forget-gate", "--position-embedding-type", "rope", "--no-reset-attention-mask"]
_BASELINES = {"transformer": _TRANSFORMER + ["--no-fox-output-gate", "--no-fox-output-norm", "--no-fox-qk-norm",
                                             "--no-fox-kv-shift"],
              "transformer-pro": _TRANSFORMER}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True)
    p.add_argument("--lengths", type=int, nargs="+", default=[4096, 16384])
    p.add_argument("--tokens-per-step", type=int, default=131072)
    p.add_argument("--micro-batch-tokens", type=int, default=65536,
                   help="tokens per micro-batch (small ones leave the run host-bound, docs/benchmarks.md)")
    p.add_argument("--train-iters", type=int, default=40)
    p.add_argument("--warmup-steps", type=int, default=5, help="steps left out of the tokens/s median")
    p.add_argument("--json", default=None)
    p.add_argument("--profile", action="store_true",
                   help="profile each run: top CUDA kernels and GPU busy time (steps 5-7), Python host time (steps 9-11)")
    p.add_argument("--acp-modes", nargs="+", default=["off", "lse"], choices=["off", "bound", "lse", *_BASELINES],
                   help="runs per length: ACP off, or on with the backward pruned by the bound or by the rows' lse; "
                        "or a Transformer baseline (transformer, transformer-pro)")
    p.add_argument("extra", nargs=argparse.REMAINDER, help="more trainer flags after --")
    args = p.parse_args(argv)
    from megatron_fox.train import run
    from megatron_fox.training.arguments import parse_args

    rows, rank0 = [], int(os.environ.get("RANK", "0")) == 0  # under torchrun: one process a GPU, rank 0 reports
    for L in args.lengths:
        for mode in args.acp_modes:
            acp = mode != "off"
            flags = ["--config", args.config, "--seq-length", str(L), "--train-iters", str(args.train_iters),
                     "--global-batch-size", str(args.tokens_per_step // L),
                     "--micro-batch-size", str(max(1, args.micro_batch_tokens // L)),
                     "--lr-warmup-iters", "10", "--log-interval", str(args.train_iters), "--no-progress-bar",
                     "--acp" if acp else "--no-acp", "--default-vocab-size", "8192",
                     "--acp-backward-pruning", mode if mode in ("bound", "lse") else "lse",
                     "--default-corpus-bytes", "8000000"] + _BASELINES.get(mode, []) + [a for a in args.extra if a != "--"]
            # a fresh compile state a run, as a training process has: the FoX-Pro extras of
            # earlier runs' shapes and options would otherwise fill torch.compile's cache
            # (8 entries) and leave later runs on the eager path, slower and larger
            torch._dynamo.reset()
            gc.collect()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            t0 = time.time()
            hist = _profiled(run, parse_args(flags)) if args.profile else run(parse_args(flags))
            rows.append({
                "L": L, "acp": mode, "steps": len(hist),
                "tokens_per_s": round(statistics.median(h["tokens_per_s"] for h in hist[args.warmup_steps:])),
                "tflops_per_gpu": round(statistics.median(h["tflops_per_gpu"] for h in hist[args.warmup_steps:]), 1),
                "loss_last10": round(sum(h["loss"] for h in hist[-10:]) / 10, 4),
                "final_loss": round(hist[-1]["loss"], 4),
                "acp_skipped": round(hist[-1].get("acp_skipped", 0.0), 3),
                "acp_bwd_skipped": round(hist[-1].get("acp_bwd_skipped", 0.0), 3),
                "skipped_by_layer": {k: round(v, 3) for k, v in hist[-1].get("acp_skipped_by_layer", {}).items()},
                "peak_mem_gb": round(torch.cuda.max_memory_allocated() / 2**30, 1),
                "wall_s": round(time.time() - t0, 1)})
            if rank0:
                print(json.dumps(rows[-1]), flush=True)
    if not rank0:
        return
    world = int(os.environ.get("WORLD_SIZE", "1"))
    print(f"\nGPU: {torch.cuda.get_device_name()}{' x %d' % world if world > 1 else ''}  torch {torch.__version__}  "
          f"{time.strftime('%Y-%m-%d')}")
    print("| L | ACP | tokens/s | model TFLOP/s | loss (mean last 10) | skipped fwd / bwd | peak GB |\n"
          "|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['L']} | {r['acp']} | {r['tokens_per_s']} | {r['tflops_per_gpu']} | {r['loss_last10']} | "
              f"{r['acp_skipped']} / {r['acp_bwd_skipped']} | {r['peak_mem_gb']} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
