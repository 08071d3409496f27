"""Benchmark of the FoX attention op (exact and with ACP) against torch SDPA and fla-core.

Setting (issue 3): 64k tokens a step (batch = 65536 / L), 16 heads, head_dim 128, bf16,
q and k RMS-normalised so U = sqrt(head_dim) bounds |logit|, log_eps = -10. Forget gates
constant per head with 10% noise, half-lives log-spaced over the heads: spectrum (a)
16..L tokens, spectrum (b) 4..4096 tokens. Rows fox_acp_*_lse: the backward prunes by the
rows' log-sum-exp (backward_pruning="lse"), its skipped fraction in the last column;
fox_exact skips only blocks whose weights are zero in float32 (the forward finds them by the
diagonal logits, the backward by the rows' lse; same output and gradients to the bit),
fox_exact_noskip computes every causal block.

    python tools/bench_attention.py                    # the table (needs a CUDA GPU)
    python tools/bench_attention.py --lengths 16384 --sweep   # tile sweep at one length
    python tools/bench_attention.py --check            # GPU correctness vs the reference
    python tools/bench_attention.py --clocks           # also the SM clock while each fwd+bwd is timed

TFLOP/s are dense-causal equivalents: forward 2 * 2 * B * H * L^2 / 2 * D, forward+backward
3.5 times that (the same count for every row, so pruned rows show higher figures).
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import math
import sys
import time

import torch
import torch.nn.functional as F

from gpu_clocks import ClockSampler


def gate_spectrum(B, L, H, lo, hi, device, noise=0.1):
    """log f [B, L, H]: per head half-life log-spaced in [lo, hi], 10% multiplicative noise."""
    half_life = torch.logspace(math.log10(lo), math.log10(hi), H, device=device)
    base = -math.log(2.0) / half_life  # log f with f ** half_life = 1/2
    noisy = base * (1.0 + noise * torch.randn(B, L, H, device=device))
    return noisy.clamp(max=0.0).float().contiguous()


def make_inputs(B, L, H, D, device, dtype=torch.bfloat16):
    q = F.rms_norm(torch.randn(B, L, H, D, device=device), (D,)).to(dtype)
    k = F.rms_norm(torch.randn(B, L, H, D, device=device), (D,)).to(dtype)
    v = torch.randn(B, L, H, D, device=device, dtype=dtype)
    return q, k, v


def bench(fn, warmup=50, rep=400):
    """Median ms of fn over rep ms of runs and at least 10 of them (do_bench flushes L2
    before each); fewer runs of a long step left tables of the same code ~20% apart."""
    from triton.testing import do_bench

    est = do_bench(fn, warmup=1, rep=1, return_mode="median")
    return do_bench(fn, warmup=warmup, rep=max(rep, 10 * est), return_mode="median")


def fwd_and_fwdbwd(run, inputs, clocks=False):
    """Median ms of run(*inputs) and of its forward+backward (autograd.grad, no accumulation),
    and with `clocks` the GPU clock summary while the latter was timed, else None."""
    for t in inputs:
        t.requires_grad_(True)
    with torch.no_grad():
        t_fwd = bench(lambda: run(*inputs))
    out = run(*inputs)
    dout = torch.randn_like(out)

    def step():
        o = run(*inputs)
        torch.autograd.grad(o, inputs, dout)

    if not clocks:
        return t_fwd, bench(step), None
    with ClockSampler(torch.cuda.current_device()) as sampler:
        t_all = bench(step)
    return t_fwd, t_all, sampler.summary()


def flops_fwd(B, L, H, D):
    return 4.0 * B * H * L * L / 2 * D


def row(name, L, t_fwd, t_all, clocks, fl, skipped=None, bwd_skipped=None):
    """skipped: fraction of causal pairs the forward skips; bwd_skipped: the backward (dQ tile)."""
    r = {"impl": name, "L": L, "fwd_ms": round(t_fwd, 3), "fwdbwd_ms": round(t_all, 3),
         "fwd_tflops": round(fl / t_fwd / 1e9, 1), "fwdbwd_tflops": round(3.5 * fl / t_all / 1e9, 1),
         "skipped": None if skipped is None else round(skipped, 3),
         "bwd_skipped": None if bwd_skipped is None else round(bwd_skipped, 3)}
    if clocks is not None:
        r["clocks"] = clocks
    return r


def run_table(args):
    from megatron_fox.ops import forgetting_attention, set_data_checks, set_zero_block_skipping

    set_data_checks(False)
    dev = torch.device("cuda")
    H, D = args.heads, args.head_dim
    rows = []
    try:
        from fla.ops.forgetting_attn import parallel_forgetting_attn
    except Exception as e:  # noqa: BLE001
        print(f"fla-core not importable ({e}); its rows are left out", file=sys.stderr)
        parallel_forgetting_attn = None
    bound = math.sqrt(D)
    wanted = set(args.impls) if args.impls else None

    def want(name):
        return wanted is None or name in wanted

    measure = functools.partial(fwd_and_fwdbwd, clocks=args.clocks)

    if not want("fla_forgetting_attn"):
        parallel_forgetting_attn = None
    for L in args.lengths:
        B = max(1, args.tokens // L)
        fl = flops_fwd(B, L, H, D)
        q, k, v = make_inputs(B, L, H, D, dev)
        spectra = {"a": gate_spectrum(B, L, H, 16, L, dev), "b": gate_spectrum(B, L, H, 4, 4096, dev)}

        qh, kh, vh = (t.transpose(1, 2).contiguous() for t in (q, k, v))
        for backend_name, backend in (("sdpa_flash", "FLASH_ATTENTION"), ("sdpa_cudnn", "CUDNN_ATTENTION")):
            from torch.nn.attention import SDPBackend, sdpa_kernel

            if not want(backend_name):
                continue
            try:
                with sdpa_kernel(getattr(SDPBackend, backend)):
                    tf, ta, clk = measure(lambda a, b, c: F.scaled_dot_product_attention(a, b, c, is_causal=True),
                                          [qh, kh, vh])
                rows.append(row(backend_name, L, tf, ta, clk, fl))
            except RuntimeError as e:
                print(f"{backend_name} failed at L={L}: {e}", file=sys.stderr)
        del qh, kh, vh
        if parallel_forgetting_attn is not None:
            g = spectra["b"]
            tf, ta, clk = measure(lambda a, b, c, gg: parallel_forgetting_attn(a, b, c, gg), [q, k, v, g])
            rows.append(row("fla_forgetting_attn", L, tf, ta, clk, fl))
        g = spectra["b"]
        for impl, skip_zero in (("fox_exact", True), ("fox_exact_noskip", False)):
            if not want(impl):
                continue
            was = set_zero_block_skipping(skip_zero)
            _, stats = forgetting_attention(q, k, v, g, return_stats=True)
            tf, ta, clk = measure(lambda a, b, c, gg: forgetting_attention(a, b, c, gg), [q, k, v, g])
            rows.append(row(impl, L, tf, ta, clk, fl, stats.skipped_fraction.item(),
                            stats.backward_skipped_fraction.item()))
            set_zero_block_skipping(was)
        for (name, g), (suffix, pruning) in itertools.product(spectra.items(), (("", "bound"), ("_lse", "lse"))):
            impl = f"fox_acp_{name}{suffix}"
            if not want(impl):
                continue
            acp = dict(log_eps=args.log_eps, logit_bound=bound, backward_pruning=pruning)
            _, stats = forgetting_attention(q, k, v, g, return_stats=True, **acp)
            tf, ta, clk = measure(lambda a, b, c, gg: forgetting_attention(a, b, c, gg, **acp), [q, k, v, g])
            rows.append(row(impl, L, tf, ta, clk, fl, stats.skipped_fraction.item(),
                            stats.backward_skipped_fraction.item()))
        for r in rows:
            if r["L"] == L:
                print(json.dumps(r), flush=True)
        del q, k, v, spectra
        torch.cuda.empty_cache()
    return rows


def run_sweep(args):
    """Time each candidate tile of the three Triton kernels at one length (spectrum b, exact
    and ACP); the Gluon forward is off meanwhile (it would replace 128 x 128 forward tiles)."""
    from megatron_fox.ops import (KernelConfig, Tile, forgetting_attention, set_data_checks, set_gluon_forward,
                                  set_kernel_config)
    from megatron_fox.ops.forgetting_attn.tiles import kernel_config

    set_data_checks(False)
    gluon_was = set_gluon_forward(False)
    dev = torch.device("cuda")
    H, D = args.heads, args.head_dim
    L = args.lengths[0]
    B = max(1, args.tokens // L)
    q, k, v = make_inputs(B, L, H, D, dev)
    g = gate_spectrum(B, L, H, 4, 4096, dev)
    base = kernel_config(D, dev)
    fwd_tiles = [Tile(128, 64, 8, 3), Tile(128, 64, 8, 3, True), Tile(128, 128, 8, 3, True), Tile(128, 64, 8, 2, True),
                 Tile(128, 64, 8, 4, True), Tile(128, 128, 8, 2, True), Tile(64, 64, 4, 3, True)]
    dkdv_tiles = [Tile(64, 128, 8, 2), Tile(64, 128, 8, 3), Tile(32, 128, 8, 2), Tile(32, 128, 8, 3),
                  Tile(32, 64, 4, 3), Tile(64, 64, 4, 2), Tile(64, 128, 8, 2, True)]
    dq_tiles = [Tile(128, 64, 8, 3), Tile(128, 64, 8, 3, True), Tile(128, 64, 8, 2, True), Tile(128, 128, 8, 2, True),
                Tile(64, 64, 4, 3, True), Tile(128, 32, 8, 3, True)]
    if args.head_dim <= 64:
        fwd_tiles += [Tile(128, 64, 4, 3), Tile(128, 64, 4, 3, True), Tile(128, 128, 8, 3, False)]
    if args.sweep_only:
        fwd_tiles = fwd_tiles if "fwd" in args.sweep_only else []
        dkdv_tiles = dkdv_tiles if "dkdv" in args.sweep_only else []
        dq_tiles = dq_tiles if "dq" in args.sweep_only else []
    results = []
    for log_eps in (None, args.log_eps):
        kw = dict(log_eps=log_eps, logit_bound=math.sqrt(D))
        for t in fwd_tiles:
            set_kernel_config(KernelConfig(fwd=t, dkdv=base.dkdv, dq=base.dq))
            try:
                ms = bench(lambda: forgetting_attention(q, k, v, g, **kw))
            except Exception as e:  # noqa: BLE001 (out of resources for this tile)
                ms = float("nan")
                print(f"fwd {t}: {type(e).__name__}", file=sys.stderr)
            results.append({"kernel": "fwd", "tile": t.__dict__, "log_eps": log_eps, "ms": round(ms, 3)})
            print(json.dumps(results[-1]), flush=True)
        qg, kg, vg = (x.detach().requires_grad_() for x in (q, k, v))
        for kernel, tiles in (("dkdv", dkdv_tiles), ("dq", dq_tiles)):
            for t in tiles:
                cfg = KernelConfig(fwd=base.fwd, dkdv=t if kernel == "dkdv" else base.dkdv,
                                   dq=t if kernel == "dq" else base.dq)
                set_kernel_config(cfg)
                o = forgetting_attention(qg, kg, vg, g, **kw)
                do = torch.randn_like(o)
                try:
                    ms = bench(lambda: torch.autograd.grad(o, (qg, kg, vg), do, retain_graph=True))
                except Exception as e:  # noqa: BLE001
                    ms = float("nan")
                    print(f"{kernel} {t}: {type(e).__name__}", file=sys.stderr)
                results.append({"kernel": f"bwd({kernel})", "tile": t.__dict__, "log_eps": log_eps, "ms": round(ms, 3)})
                print(json.dumps(results[-1]), flush=True)
    set_kernel_config(None)
    set_gluon_forward(gluon_was)
    return results


def kernel_times(step, reps: int = 5) -> dict:
    """{kernel name: CUDA ms per call of step()} (torch.profiler over `reps` calls after 3 warm-up calls)."""
    from torch.profiler import ProfilerActivity, profile

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            step()
        torch.cuda.synchronize()
    return {e.key: e.device_time_total / reps / 1e3 for e in prof.key_averages() if e.device_time_total > 0}


def print_kernel_times(title: str, per: dict, top: int = 8) -> None:
    """The total and the `top` costliest kernels of a `kernel_times` dict."""
    print(f"{title}: CUDA time {sum(per.values()):.2f} ms")
    for name, ms in sorted(per.items(), key=lambda kv: -kv[1])[:top]:
        print(f"  {ms:8.3f} ms  {name[:90]}")


def run_profile(args):
    """Per-kernel CUDA time of one forward+backward (torch.profiler), exact and ACP (spectrum b)."""
    from megatron_fox.ops import forgetting_attention, set_data_checks

    set_data_checks(False)
    dev = torch.device("cuda")
    H, D = args.heads, args.head_dim
    for L in args.lengths:
        B = max(1, args.tokens // L)
        q, k, v = make_inputs(B, L, H, D, dev)
        g = gate_spectrum(B, L, H, 4, 4096, dev)
        for t in (q, k, v):
            t.requires_grad_(True)
        for log_eps, pruning in ((None, "bound"), (args.log_eps, "bound"), (args.log_eps, "lse")):
            def step():
                o = forgetting_attention(q, k, v, g, log_eps=log_eps, logit_bound=math.sqrt(D),
                                         backward_pruning=pruning)
                torch.autograd.grad(o, (q, k, v), torch.ones_like(o))
            per = kernel_times(step)
            print_kernel_times(f"L={L} log_eps={log_eps} backward_pruning={pruning}, per fwd+bwd", per)


def run_boundaries(args):
    """Host and GPU time of one block-boundary search (the dQ start and the dK/dV end with the
    backward's per-block threshold, the forward's start with one per head): the Triton launch
    against the torch ops, same integers asserted. Host ms: wall time of 200 calls in a row
    (launch-bound when the GPU keeps up); GPU ms: CUDA events around them."""
    from megatron_fox.ops.forgetting_attn import boundary

    dev = torch.device("cuda")
    H = args.heads
    print("| L | search | torch host ms | torch GPU ms | triton host ms | triton GPU ms |\n|---|---|---|---|---|---|")
    for L in args.lengths:
        B = max(1, args.tokens // L)
        c = torch.cumsum(gate_spectrum(B, L, H, 4, 4096, dev).transpose(1, 2), -1).contiguous()
        delta = torch.full((B, H), -(2 * math.sqrt(args.head_dim) + math.log(L)) + args.log_eps, device=dev)
        U, lse = torch.full_like(delta, math.sqrt(args.head_dim)), torch.randn(B, H, L, device=dev)
        thr64, thr128 = (boundary.lse_threshold(delta, U, lse, bm) for bm in (64, 128))
        cases = {"fwd start (delta per head, 128x128)": lambda: boundary.key_block_start(c, c, delta, None, 128, 128),
                 "dQ start (per block, 128x64)": lambda: boundary.key_block_start(c, c, thr128, None, 128, 64),
                 "dK/dV end (per block, 64x64)": lambda: boundary.query_block_end(c, c, thr64, None, 64, 64)}
        for name, fn in cases.items():
            cells, results = [], []
            for fused in (False, True):
                boundary._fused_on = fused
                results.append(fn())
                torch.cuda.synchronize()
                t0, e0, e1 = time.perf_counter(), torch.cuda.Event(True), torch.cuda.Event(True)
                e0.record()
                for _ in range(200):
                    fn()
                e1.record()
                host = (time.perf_counter() - t0) / 200 * 1e3
                torch.cuda.synchronize()
                cells += [f"{host:.4f}", f"{e0.elapsed_time(e1) / 200:.4f}"]
            boundary._fused_on = True
            assert torch.equal(results[0], results[1]), name
            print(f"| {L} | {name} | " + " | ".join(cells) + " |", flush=True)


def run_check(args):
    """Correctness on the GPU with the tuned tiles: op vs float64 reference."""
    from megatron_fox.ops import forgetting_attention, forgetting_attention_reference

    dev = torch.device("cuda")
    worst = 0.0
    for (B, L, H, Hkv, D, dtype, varlen, log_eps) in [
        (2, 1000, 4, 2, 128, torch.bfloat16, False, None), (2, 1000, 4, 2, 128, torch.bfloat16, False, -10.0),
        (1, 1500, 4, 4, 64, torch.bfloat16, True, -10.0), (2, 1000, 4, 2, 64, torch.bfloat16, False, None),
        (1, 777, 2, 1, 128, torch.float32, True, None),
        (1, 2048, 2, 2, 128, torch.float16, False, -10.0),
        (2, 1001, 4, 4, 128, torch.bfloat16, False, -10.0),  # T % 4 != 0: padded prefix-sum rows (TMA)
    ]:
        q = torch.randn(B, L, H, D, device=dev, dtype=dtype, requires_grad=True)
        k = torch.randn(B, L, Hkv, D, device=dev, dtype=dtype, requires_grad=True)
        v = torch.randn(B, L, Hkv, D, device=dev, dtype=dtype, requires_grad=True)
        g = F.logsigmoid(torch.randn(B, L, H, device=dev) + 1.0).requires_grad_()
        cu = torch.tensor([0, 100, 101, 600, L], device=dev, dtype=torch.int32) if varlen else None
        o = forgetting_attention(q, k, v, g, log_eps=log_eps, cu_seqlens=cu)
        r = forgetting_attention_reference(q, k, v, g, cu_seqlens=cu, dtype=torch.float64)
        do = torch.randn_like(o)
        errs = [((o.double() - r.double()).norm() / r.double().norm()).item()]
        for a, b in zip(torch.autograd.grad(o, (q, k, v, g), do), torch.autograd.grad(r, (q, k, v, g), do)):
            errs.append(((a.double() - b.double()).norm() / b.double().norm()).item())
        worst = max(worst, max(errs) if dtype != torch.float32 else 0.0)
        print(f"check B={B} L={L} H={H}/{Hkv} D={D} {dtype} varlen={varlen} log_eps={log_eps}: rel err "
              f"o {errs[0]:.2e} dq {errs[1]:.2e} dk {errs[2]:.2e} dv {errs[3]:.2e} dlogf {errs[4]:.2e}", flush=True)
    print(f"worst relative error (16-bit cases): {worst:.2e}")


def run_grad_error(args):
    """Error of each mode's bf16 gradients at the benchmark's sizes (spectrum b, batch 1) against
    exact FoX on float32 inputs (ieee dots), overall and over the first and last eighth of the
    positions (d log f sums dS over every pair that straddles a position: far pairs pile up
    at the start). Also whether exact FoX with its zero blocks skipped gives the same bf16
    output and gradients, to the bit, as computing them."""
    from megatron_fox.ops import forgetting_attention, set_zero_block_skipping

    dev = torch.device("cuda")
    H, D = args.heads, args.head_dim
    for L in args.lengths:
        q, k, v = make_inputs(1, L, H, D, dev)
        g = gate_spectrum(1, L, H, 4, 4096, dev)
        do = torch.randn(1, L, H, D, device=dev, dtype=torch.bfloat16)

        def grads(dtype, **acp):
            ins = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)] + [g.clone().requires_grad_()]
            o = forgetting_attention(*ins, **acp)
            return (o.detach(),) + torch.autograd.grad(o, ins, do.to(dtype))

        was = set_zero_block_skipping(False)
        dense = grads(torch.bfloat16)
        set_zero_block_skipping(True)
        same = [torch.equal(a, b) for a, b in zip(grads(torch.bfloat16), dense)]
        set_zero_block_skipping(was)
        print(f"exact FoX L={L}, zero blocks skipped vs computed: o, dq, dk, dv, dlogf bit-identical {same}",
              flush=True)
        ref = grads(torch.float32)[1:]
        e = L // 8
        for name, acp in (("exact", {}), ("acp_bound", dict(log_eps=args.log_eps, logit_bound=math.sqrt(D))),
                          ("acp_lse", dict(log_eps=args.log_eps, logit_bound=math.sqrt(D), backward_pruning="lse"))):
            cells = []
            for gname, a, r in zip(("dq", "dk", "dv", "dlogf"), grads(torch.bfloat16, **acp)[1:], ref):
                a, r = a.double(), r.double()
                parts = [(a - r).norm() / r.norm(), (a[:, :e] - r[:, :e]).norm() / r[:, :e].norm(),
                         (a[:, -e:] - r[:, -e:]).norm() / r[:, -e:].norm()]
                cells.append(f"{gname} " + "/".join(f"{x.item():.2e}" for x in parts))
            print(f"grad error L={L} {name} (all/first/last eighth): " + "  ".join(cells), flush=True)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", type=int, nargs="+", default=[4096, 8192, 16384, 32768])
    p.add_argument("--tokens", type=int, default=65536, help="tokens a step (batch = tokens / length)")
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--log-eps", type=float, default=-10.0)
    p.add_argument("--sweep", action="store_true", help="tile sweep at the first length")
    p.add_argument("--sweep-only", nargs="+", choices=["fwd", "dkdv", "dq"], default=None,
                   help="kernels the sweep covers (default: all three)")
    p.add_argument("--check", action="store_true", help="correctness vs the reference, then exit")
    p.add_argument("--grad-error", action="store_true",
                   help="bf16 gradient error of exact / ACP bound / ACP lse against float32 exact, then exit")
    p.add_argument("--profile", action="store_true", help="per-kernel time of one forward+backward")
    p.add_argument("--boundaries", action="store_true",
                   help="time the block-boundary searches, Triton launch vs torch ops, then exit")
    p.add_argument("--json", type=str, default=None, help="write rows to this file")
    p.add_argument("--clocks", action="store_true",
                   help="sample the SM clock and power (nvidia-smi) while each fwd+bwd figure is timed")
    p.add_argument("--impls", nargs="+", default=None,
                   choices=["sdpa_flash", "sdpa_cudnn", "fla_forgetting_attn", "fox_exact", "fox_exact_noskip",
                            "fox_acp_a", "fox_acp_b", "fox_acp_a_lse", "fox_acp_b_lse"],
                   help="rows of the table to run (default: all)")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        p.error("needs a CUDA GPU")
    import megatron_fox
    import triton

    print(f"GPU: {torch.cuda.get_device_name()}  torch {torch.__version__}  triton {triton.__version__}  "
          f"date {time.strftime('%Y-%m-%d')}  megatron_fox from {megatron_fox.__path__[0]}", flush=True)
    if args.check or args.profile or args.grad_error or args.boundaries:
        (run_check if args.check else run_grad_error if args.grad_error else run_boundaries if args.boundaries
         else run_profile)(args)
        return
    rows = run_sweep(args) if args.sweep else run_table(args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    if not args.sweep:
        clock_cols = " SM MHz (median, min) | power-capped |" if args.clocks else ""
        print(f"\n| impl | L | fwd ms | fwd TF/s | fwd+bwd ms | fwd+bwd TF/s | skipped | bwd skipped |{clock_cols}")
        print("|---|---|---|---|---|---|---|---|" + ("---|---|" if args.clocks else ""))
        for r in rows:
            clock_cells = ""
            if args.clocks:
                c = r.get("clocks")  # None where nvidia-smi gave no samples
                clock_cells = f" {c['sm_mhz_median']:.0f}, {c['sm_mhz_min']:.0f} | {c['power_capped']} |" if c else " | |"
            print(f"| {r['impl']} | {r['L']} | {r['fwd_ms']} | {r['fwd_tflops']} | {r['fwdbwd_ms']} | "
                  f"{r['fwdbwd_tflops']} | {_cell(r['skipped'])} | {_cell(r['bwd_skipped'])} |{clock_cells}")


def _cell(x):
    return "" if x is None else x


if __name__ == "__main__":
    main()
