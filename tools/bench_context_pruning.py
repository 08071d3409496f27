"""Benchmark of learned context pruning's attention: the Triton kernels
(`ops.context_pruning.pruned_forgetting_attention`) against the materialised reference,
the kernels skipping ACP's blocks too (log_eps -10, U = sqrt(128)), FoX with ACP and no mask
(`forgetting_attention`, log_eps -10) and torch SDPA (cuDNN, dense
causal), plus the keep mask's own cost (interaction scores, sparse sigmoid, cumulative
product: the Triton kernels of `keep_mask` and the plain-PyTorch `keep_mask_reference`).

Setting: 16k tokens a step (batch = 16384 / L), 16 heads, head_dim 128, bf16, q and k
RMS-normalised, gate spectrum (b) of tools/bench_attention.py (half-lives 4..4096), a keep
mask at alpha 8 from interaction queries/keys (r = 64) under which a random fifth of the keys
stay for every later query and the rest leave after one (`--kept`; the fine-tunes in
docs/benchmarks.md learned to keep about a fifth of the pairs).

    python tools/bench_context_pruning.py                  # the table (needs a CUDA GPU)
    python tools/bench_context_pruning.py --lengths 1024   # one length
    python tools/bench_context_pruning.py --profile        # per-kernel CUDA time of each fwd+bwd
    python tools/bench_context_pruning.py --sweep          # tile shapes / warps of each kernel, one at a time
"""

from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F

from bench_attention import bench, gate_spectrum, kernel_times, make_inputs, print_kernel_times


def keep_inputs(B, L, device, kept, r=64):
    """Interaction queries/keys [B, L, r] and beta: z_nj = q_n.k_j / sqrt(r) + beta is +2 for
    a random `kept` share of the keys j (kept by every later query) and -2 for the others."""
    g = torch.Generator(device=device).manual_seed(0)
    qi = 0.01 * torch.randn(B, L, r, device=device, generator=g)
    ki = 0.01 * torch.randn(B, L, r, device=device, generator=g)
    qi[..., 0] = r ** 0.5
    ki[..., 0] = torch.where(torch.rand(B, L, device=device, generator=g) < kept, 2.0, -2.0)
    return qi, ki, torch.tensor(0.0, device=device)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096])
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--kept", type=float, default=0.2, help="share of the keys every later query keeps")
    p.add_argument("--profile", action="store_true", help="per-kernel CUDA time (torch.profiler) of the mask's and "
                   "the attention's fwd+bwd instead of the table")
    p.add_argument("--sweep", action="store_true", help="time the mask at 4, 8, 16 warps and the attention with "
                   "each kernel's candidate (block m, block n, warps, stages) in turn, the others as configured")
    opts = p.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench_context_pruning: needs a CUDA GPU")
    sys.path.insert(0, ".")
    from megatron_fox.ops import set_data_checks

    set_data_checks(False)  # as the layer calls the ops: no host sync for the inputs' value checks
    print(f"{torch.cuda.get_device_name()}; {opts.tokens} tokens a step, {opts.heads} heads, head_dim "
          f"{opts.head_dim}, bf16; ms")
    if opts.profile:
        for L in opts.lengths:
            for title, step in one_length(L, opts, steps_only=True).items():
                print_kernel_times(f"L={L} {title}, per fwd+bwd (elapsed {bench(step):.2f} ms)", kernel_times(step),
                                   top=10)
        return
    if opts.sweep:
        for L in opts.lengths:
            run_sweep(L, opts)
        return
    print("| L | kept | mask triton fwd+bwd | mask reference fwd+bwd | dcp triton fwd | dcp triton fwd+bwd | "
          "dcp triton + acp fwd+bwd (skipped) | dcp reference fwd+bwd | fox acp fwd+bwd | sdpa cudnn fwd+bwd |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for L in opts.lengths:
        kept, row, skipped = one_length(L, opts)
        cells = [f"{t:.2f}" for t in row]
        cells[4] += f" ({skipped:.2f})"
        print(f"| {L} | {kept:.3f} | " + " | ".join(cells) + " |", flush=True)
        torch.cuda.empty_cache()


# candidates of the sweep besides the configured tiles: more warps or smaller tiles, fewer
# registers a thread (tools/kernel_report.py --kernel dcp_fwd dcp_dkdv dcp_dq dcp_dkeep)
_SWEEP = {"fwd": [(64, 64, 8, 2), (128, 64, 8, 2)],
          "dq": [(64, 64, 8, 2), (64, 32, 4, 2)],
          "dkdv": [(64, 64, 8, 2), (128, 32, 8, 2)],
          "dkeep": [(64, 64, 8, 2), (32, 128, 8, 2)]}


def run_sweep(L, opts):
    """ms fwd+bwd of the mask per warps setting, and of the attention with ACP per kernel config."""
    import importlib

    function = importlib.import_module("megatron_fox.ops.context_pruning.function")
    keep_mask = importlib.import_module("megatron_fox.ops.context_pruning.keep_mask")  # the module, not the op
    steps = one_length(L, opts, steps_only=True)
    warps_was = dict(keep_mask._WARPS)
    for w in (4, 8, 16):
        keep_mask._WARPS.update(probs=w, bwd=w)
        print(f"L={L} mask, {w} warps: {bench(steps['mask triton']):.3f} ms", flush=True)
    keep_mask._WARPS.update(warps_was)
    config_was = dict(function._CONFIG)
    print(f"L={L} dcp + acp, configured {config_was}: {bench(steps['dcp triton + acp']):.3f} ms", flush=True)
    for name, candidates in _SWEEP.items():
        for cfg in candidates:
            function._CONFIG[name] = cfg
            try:
                print(f"L={L} dcp + acp, {name} {cfg}: {bench(steps['dcp triton + acp']):.3f} ms", flush=True)
            except Exception as e:  # out of shared memory or registers: say so, go on
                print(f"L={L} dcp + acp, {name} {cfg}: failed ({type(e).__name__})", flush=True)
        function._CONFIG[name] = config_was[name]


def one_length(L, opts, steps_only=False):
    """(kept fraction, [ms of each column]) at sequence length L; with steps_only
    {name: fwd+bwd step} of the mask and the Triton attention with and without ACP."""
    from megatron_fox.ops import forgetting_attention
    from megatron_fox.ops.context_pruning import (keep_mask, keep_mask_reference, kept_fraction,
                                                  pruned_forgetting_attention, pruned_forgetting_attention_reference)

    dev, H, D = torch.device("cuda"), opts.heads, opts.head_dim
    B = max(1, opts.tokens // L)
    q, k, v = make_inputs(B, L, H, D, dev)
    log_f = gate_spectrum(B, L, H, 4, 4096, dev)
    qi, ki, beta = keep_inputs(B, L, dev, opts.kept)
    qi.requires_grad_()
    keep = keep_mask(qi, ki, beta, 8.0)
    leaves = [t.requires_grad_() for t in (q, k, v, log_f)]
    mask_in = keep.detach().requires_grad_()
    do = torch.randn_like(q)

    def fwd_bwd(fn, *extra):
        def run():
            torch.autograd.grad(fn(), [*leaves, *extra], do, allow_unused=True)
        return run

    def mask_cost(fn):
        def run():
            m = fn(qi, ki, beta, 8.0)
            torch.autograd.grad(m, qi, torch.ones_like(m))
        return run

    def dcp():
        return pruned_forgetting_attention(q, k, v, log_f, mask_in)

    def dcp_acp():
        return pruned_forgetting_attention(q, k, v, log_f, mask_in, log_eps=-10.0, logit_bound=D ** 0.5)

    def reference():
        return pruned_forgetting_attention_reference(q, k, v, log_f, mask_in)

    def acp():
        return forgetting_attention(q, k, v, log_f, log_eps=-10.0, logit_bound=D ** 0.5)

    def sdpa():
        with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.CUDNN_ATTENTION):
            return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                  is_causal=True).transpose(1, 2)

    if steps_only:
        return {"mask triton": mask_cost(keep_mask), "dcp triton": fwd_bwd(dcp, mask_in),
                "dcp triton + acp": fwd_bwd(dcp_acp, mask_in), "fox acp": fwd_bwd(acp)}
    row = [bench(mask_cost(keep_mask)), bench(mask_cost(keep_mask_reference))]
    with torch.no_grad():
        row.append(bench(dcp))
    row.append(bench(fwd_bwd(dcp, mask_in)))
    row.append(bench(fwd_bwd(dcp_acp, mask_in)))
    _, stats = pruned_forgetting_attention(q, k, v, log_f, mask_in, log_eps=-10.0, logit_bound=D ** 0.5,
                                           return_stats=True)
    try:
        row.append(bench(fwd_bwd(reference, mask_in), warmup=3, rep=50))
    except torch.OutOfMemoryError:
        row.append(float("nan"))
    torch.cuda.empty_cache()
    row += [bench(fwd_bwd(acp)), bench(fwd_bwd(sdpa))]
    return float(kept_fraction(keep.detach())), row, float(stats.skipped_fraction)


if __name__ == "__main__":
    main()
