"""Context-parallel FoX attention benchmark.

Single-GPU mode (default): every rank's share of each ring step is run on one GPU and timed
(forward + backward of the blocks that rank computes at that step), giving per-step
compute per rank, the critical path (slowest rank per step, summed over steps), the steps
and bytes skipped, and the ratio to the single-GPU op on the whole sequence.

    python tools/bench_cp.py --cp 2 4 8 --lengths 32768 65536 131072

Multi-GPU mode (one process per GPU, NCCL): the real ring (--cp-comm-type p2p) timed end to
end (slowest rank) for exact FoX, ACP without chunk skipping (every chunk pair computed and
sent) and ACP with it, and the head-parallel op (a2a) for exact FoX, ACP with heads dealt
evenly and ACP with heads dealt by estimated cost; bytes sent and not sent; NCCL kernel time
and the part of it not overlapped by compute (one profiled call, busiest rank); rank 0 also
times the one-GPU op on the whole sequence where it fits, giving the speed-up and scaling
efficiency (single / (CP x time)).

    torchrun --nproc_per_node 4 tools/bench_cp.py --multi-gpu --lengths 32768 65536 131072
    TRITON_INTERPRET=1 torchrun --nproc_per_node 2 tools/bench_cp.py --multi-gpu --device cpu \
        --lengths 64 --heads 2 --head-dim 16 --iters 1      # smoke run on CPU (gloo)

Setting as the kernel benchmark: 16 heads, head_dim 128, bf16, q/k RMS-normalised,
logit_bound = sqrt(128), log_eps = -10, gate spectrum (b): half-lives 4..4096 tokens.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_attention import gate_spectrum, make_inputs  # noqa: E402


def _bench(fn):
    if not torch.cuda.is_available():  # CPU smoke run (--device cpu): one timed call
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3
    from triton.testing import do_bench

    return do_bench(fn, warmup=5, rep=25, return_mode="median")


def single_gpu(args):
    from megatron_fox.ops import forgetting_attention, set_data_checks
    from megatron_fox.ops.forgetting_attn.block import block_backward, block_forward
    from megatron_fox.parallel import skip_table
    from megatron_fox.parallel.exchange import _heads_needed, _needed
    from megatron_fox.parallel.layout import chunk_ids

    set_data_checks(False)
    dev = torch.device(args.device)
    H, D = args.heads, args.head_dim
    bound = math.sqrt(D)
    rows = []
    for L in args.lengths:
        q, k, v = make_inputs(1, L, H, D, dev)
        g = gate_spectrum(1, L, H, 4, 4096, dev)
        do = torch.randn_like(q)
        ins = [t.detach().requires_grad_() for t in (q, k, v, g)]

        def whole():
            o = forgetting_attention(*ins, log_eps=args.log_eps, logit_bound=bound)
            torch.autograd.grad(o, ins[:3], do)

        t_whole = _bench(whole)
        c = torch.cumsum(g.transpose(1, 2), -1).contiguous()  # [1, H, L] global prefix sums
        U = torch.full((1, H), bound, device=dev)
        delta = -(2.0 * U + math.log(L)) + args.log_eps
        for P in args.cp:
            n = 2 * P
            size = L // n
            sl = [slice(j * size, (j + 1) * size) for j in range(n)]
            lf = g.transpose(1, 2)
            offsets = torch.stack([c[..., s.start] - lf[..., s.start] for s in sl], -1)
            chunk_sums = torch.stack([c[..., s.stop - 1] for s in sl], -1) - offsets
            live, heads = skip_table(offsets, chunk_sums, delta)
            causal = [[j <= i for j in range(n)] for i in range(n)]
            plan = {"size": P, "live": live, "heads": heads, "num_heads": H, "group_size": 1}
            kv_head_bytes, c_head_bytes = 2 * size * D * 2, size * 4  # k and v bf16; prefix sums fp32
            chunk_bytes = H * (kv_head_bytes + c_head_bytes)
            per_step, skipped_steps, sent, not_sent = [], 0, 0, 0
            for s in range(P):
                times = []
                for r in range(P):
                    src = (r - s) % P
                    blocks = _needed(r, src, P, live)
                    if s > 0:
                        step_sent = 0
                        for half in {kh for _, kh, _ in blocks}:
                            sel = _heads_needed(r, src, half, plan)
                            step_sent += chunk_bytes if sel is None else (
                                len(sel[0]) * kv_head_bytes + len(sel[1]) * c_head_bytes)
                        sent += step_sent
                        not_sent += len({kh for _, kh, _ in _needed(r, src, P, causal)}) * chunk_bytes - step_sent
                        skipped_steps += not blocks
                    qc, kc = chunk_ids(r, P), chunk_ids(src, P)
                    work = [(sl[qc[qh]], sl[kc[kh]], cz) for qh, kh, cz in blocks]

                    def step(work=work):
                        for qs, ks, cz in work:
                            o, lse, _ = block_forward(q[:, qs], k[:, ks], v[:, ks], c[..., qs], c[..., ks],
                                                      sm_scale=D ** -0.5, causal=cz, delta=delta)
                            block_backward(q[:, qs], k[:, ks], v[:, ks], o, do[:, qs], lse, c[..., qs], c[..., ks],
                                           sm_scale=D ** -0.5, causal=cz, delta=delta)

                    times.append(_bench(step) if work else 0.0)
                per_step.append(times)
            critical = sum(max(t) for t in per_step)
            # each rank's KV is its own (sent directly, not relayed): without step barriers a rank
            # only waits for its own work, so the slowest rank's total bounds the ring too
            slowest_rank = max(sum(per_step[s][r] for s in range(P)) for r in range(P))
            row = {"L": L, "cp": P, "whole_ms": round(t_whole, 2), "critical_ms": round(critical, 2),
                   "speedup": round(t_whole / critical, 2), "efficiency": round(t_whole / critical / P, 2),
                   "slowest_rank_ms": round(slowest_rank, 2), "speedup_async": round(t_whole / slowest_rank, 2),
                   "steps": P - 1, "rank_steps_skipped": skipped_steps, "rank_steps": P * (P - 1),
                   "bytes_sent": sent, "bytes_not_sent": not_sent,
                   "per_step_ms": [[round(t, 2) for t in ts] for ts in per_step]}
            rows.append(row)
            print(json.dumps(row), flush=True)
        torch.cuda.empty_cache()
    name = torch.cuda.get_device_name() if dev.type == "cuda" else "CPU"
    print(f"\nGPU: {name}  torch {torch.__version__}  {time.strftime('%Y-%m-%d')}")
    print("| L | CP | one GPU ms | critical path ms | speed-up | efficiency | slowest rank ms | speed-up | "
          "rank-steps skipped | MB sent | MB not sent |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['L']} | {r['cp']} | {r['whole_ms']} | {r['critical_ms']} | {r['speedup']} | {r['efficiency']} | "
              f"{r['slowest_rank_ms']} | {r['speedup_async']} | {r['rank_steps_skipped']}/{r['rank_steps']} | "
              f"{r['bytes_sent'] / 2**20:.0f} | "
              f"{r['bytes_not_sent'] / 2**20:.0f} |")
    return rows


def multi_gpu(args):
    """The real ring under torchrun: fwd+bwd time (slowest rank) of exact FoX, ACP without
    chunk skipping and ACP with it; bytes sent and not sent; rank 0 also times the one-device
    op on the whole sequence where it fits, for the speed-up and scaling efficiency."""
    import torch.distributed as dist

    from megatron_fox.ops import forgetting_attention, set_data_checks
    from megatron_fox.parallel import split_for_context_parallel

    set_data_checks(False)
    cuda = args.device == "cuda"
    dist.init_process_group("nccl" if cuda else "gloo")
    r, P = dist.get_rank(), dist.get_world_size()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", r)))
    dev = torch.device(args.device)

    def sync():
        if cuda:
            torch.cuda.synchronize()

    def timed(step, together=True):  # together: every rank times it (aligned by a barrier)
        for _ in range(args.warmup):  # the last untimed call's output is what --check compares
            out = step()
        sync()
        if together:
            dist.barrier()
        t0 = time.perf_counter()
        for _ in range(args.iters):
            step()
        sync()
        return (time.perf_counter() - t0) / args.iters * 1e3, out

    H, D = args.heads, args.head_dim
    rows, check = [], args.check
    for L in args.lengths:
        torch.manual_seed(0)
        q, k, v = make_inputs(1, L, H, D, dev)
        g = gate_spectrum(1, L, H, 4, 4096, dev)
        do = torch.randn_like(q)
        parts = [split_for_context_parallel(t, 1, r, P).detach().requires_grad_() for t in (q, k, v, g)]
        do_part = split_for_context_parallel(do, 1, r, P)
        single = None
        if r == 0:  # the one-device op on the whole sequence, ACP on (None if it does not fit)
            full = [t.detach().requires_grad_() for t in (q, k, v, g)]

            def one_device():
                o = forgetting_attention(*full, log_eps=args.log_eps, logit_bound=math.sqrt(D))
                torch.autograd.grad(o, full[:3], do)
            try:
                single, _ = timed(one_device, together=False)
            except torch.OutOfMemoryError:
                single = None
            del full
        dist.barrier()
        for mode, log_eps, attn in _modes(args, parts, D):
            def step():
                o, stats = attn()
                torch.autograd.grad(o, parts[:3], do_part)
                return stats

            ms, stats = timed(step)
            comm = comm_overlap(step) if cuda else (0.0, 0.0)
            t = torch.tensor([ms, *comm], device=dev, dtype=torch.float64)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)  # slowest rank; most communication
            b = torch.tensor([stats.bytes_sent, getattr(stats, "bytes_not_sent", 0), getattr(stats, "steps_skipped", 0),
                              getattr(stats, "steps", 0)], device=dev, dtype=torch.float64)
            dist.all_reduce(b)
            ms = t[0].item()
            row = {"L": L, "cp": P, "mode": mode, "fwd_bwd_ms": round(ms, 2), "bytes_sent": int(b[0]),
                   "bytes_not_sent": int(b[1]), "rank_steps_skipped": f"{int(b[2])}/{int(b[3])}",
                   "comm_ms": round(t[1].item(), 2),
                   "comm_exposed_ms": round(t[2].item(), 2),
                   "comm_hidden": round(1 - t[2].item() / t[1].item(), 3) if t[1].item() > 0 else None,
                   "single_device_acp_ms": None if single is None else round(single, 2)}
            if check:
                row.update(check_against_one_device(q, k, v, g, do, parts, do_part, log_eps, attn, r, P))
                if cuda:
                    row["host_syncs"] = host_syncs(step)
            if single is not None and mode in ("acp", "acp_memory", "a2a_acp"):
                row["speedup"] = round(single / ms, 2)
                row["scaling_efficiency"] = round(single / (P * ms), 3)
            rows.append(row)
            if r == 0:
                print(json.dumps(row), flush=True)
        check = False  # the first length only
        if cuda:
            torch.cuda.empty_cache()
    if r == 0:
        name = torch.cuda.get_device_name() if cuda else "CPU"
        print(f"\n{P} x {name}  torch {torch.__version__}  {time.strftime('%Y-%m-%d')}")
        print("| L | CP | mode | fwd+bwd ms | rank-steps skipped | MB sent | MB not sent | comm ms | exposed ms | hidden |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        for w in rows:
            print(f"| {w['L']} | {w['cp']} | {w['mode']} | {w['fwd_bwd_ms']} | {w['rank_steps_skipped']} | "
                  f"{w['bytes_sent'] / 2**20:.0f} | "
                  f"{w['bytes_not_sent'] / 2**20:.0f} | {w['comm_ms']} | {w['comm_exposed_ms']} | {w['comm_hidden']} |")
    return rows


def _modes(args, parts, D):
    """(name, log_eps, call) for each way of running the layer: the ring (p2p) exact, with ACP
    but every chunk pair sent, with chunk skipping every call (waiting for the skip table),
    with chunk skipping as the layer does it (acp_memory: wait and skip only after a call
    with a dead chunk pair); head-parallel (a2a) exact, with ACP and heads dealt evenly, with
    heads dealt by estimated ACP cost. call() -> (o, stats)."""
    import torch.distributed as dist

    from megatron_fox.parallel import (ChunkSkipMemory, HeadCostMemory, context_parallel_forgetting_attention,
                                       head_parallel_forgetting_attention)

    kw = dict(cp_group=dist.group.WORLD, logit_bound=math.sqrt(D), return_stats=True,
              backward_pruning=args.backward_pruning)
    eps = args.log_eps
    modes = []
    if "p2p" in args.cp_comm_type:
        modes += [(name, le, functools.partial(context_parallel_forgetting_attention, *parts, log_eps=le,
                                               skip_chunks=skip, **kw))
                  for name, le, skip in (("exact", None, True), ("acp_no_chunk_skip", eps, False), ("acp", eps, True))]
        modes.append(("acp_memory", eps, functools.partial(context_parallel_forgetting_attention, *parts, log_eps=eps,
                                                           skip_memory=ChunkSkipMemory(), **kw)))
    if "a2a" in args.cp_comm_type:  # dealt by cost as in the layer: by the previous call's costs, no host wait
        modes += [(name, le, functools.partial(head_parallel_forgetting_attention, *parts, log_eps=le, balance=bal,
                                               cost_memory=HeadCostMemory() if bal else None, **kw))
                  for name, le, bal in (("a2a_exact", None, True), ("a2a_acp_unbalanced", eps, False),
                                        ("a2a_acp", eps, True))]
    return modes


def comm_overlap(step) -> tuple[float, float]:
    """One profiled call of step: (ms of NCCL kernels, ms of them with no other kernel running
    on this GPU at the same time). NCCL kernel time includes waiting for the peer, so
    `exposed` is what the ring costs on top of compute on this rank."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    for _ in range(2):  # the first profiled call pays the profiler's own start-up: keep the second
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            step()
            torch.cuda.synchronize()
    kernels = [(e.time_range.start, e.time_range.end, "nccl" in e.name.lower())
               for e in prof.events() if e.device_type == DeviceType.CUDA]
    busy = []  # union of the non-NCCL kernel intervals, merged
    for a, b, _ in sorted(x for x in kernels if not x[2]):
        if busy and a <= busy[-1][1]:
            busy[-1][1] = max(busy[-1][1], b)
        else:
            busy.append([a, b])
    total = hidden = 0.0
    for a, b, is_comm in kernels:
        if is_comm:
            total += b - a
            hidden += sum(max(0.0, min(b, y) - max(a, x)) for x, y in busy)
    return total / 1e3, (total - hidden) / 1e3


def host_syncs(step) -> list:
    """The stream-synchronising calls one step makes on this rank (torch's sync debug mode):
    each stalls the host until the GPU catches up, and with it the overlap of the ring."""
    import warnings

    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            step()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    return [str(w.message)[:80] for w in caught if "synchroniz" in str(w.message).lower()]


def check_against_one_device(q, k, v, g, do, parts, do_part, log_eps, attn, r, P) -> dict:
    """Max error of this rank's output (attn() -> (o, stats)) and gradients against the one-device op on the
    whole sequence (same log_eps and bound), relative to the reference's max; max over ranks."""
    import torch.distributed as dist

    from megatron_fox.ops import forgetting_attention
    from megatron_fox.parallel import split_for_context_parallel

    D = q.shape[-1]
    full = [t.detach().requires_grad_() for t in (q, k, v, g)]
    ref = forgetting_attention(*full, log_eps=log_eps, logit_bound=math.sqrt(D))
    ref_grads = torch.autograd.grad(ref, full[:3], do)
    o, _ = attn()
    grads = torch.autograd.grad(o, parts[:3], do_part)
    errs = []
    for mine, whole in zip((o, *grads), (ref, *ref_grads)):
        part = split_for_context_parallel(whole, 1, r, P)
        errs.append(((mine.float() - part.float()).abs().max() / whole.float().abs().max()).item())
    e = torch.tensor(errs, device=q.device)
    dist.all_reduce(e, op=dist.ReduceOp.MAX)
    return {"rel_err_" + n: float(f"{x:.2e}") for n, x in zip(("o", "dq", "dk", "dv"), e.tolist())}


def a2a_split_bench(args):
    """One GPU: fwd+bwd of the op on the heads each rank gets when head-parallel (a2a)
    context parallelism deals heads by estimated ACP cost, against the op on all heads /P:
    how well the dealing balances the ranks' compute."""
    from megatron_fox.ops import forgetting_attention, set_data_checks
    from megatron_fox.ops.forgetting_attn.common import pruning_threshold
    from megatron_fox.parallel import assign_heads
    from megatron_fox.parallel.head_parallel import head_costs

    set_data_checks(False)
    dev, H, D = torch.device(args.device), args.heads, args.head_dim
    rows = []
    for L in args.lengths:
        torch.manual_seed(0)
        q, k, v = make_inputs(1, L, H, D, dev)
        g = gate_spectrum(1, L, H, 4, 4096, dev)
        do = torch.randn_like(q)
        delta = pruning_threshold(torch.full((1, H), math.sqrt(D), device=dev), L, args.log_eps)
        costs = head_costs(g.mean(1), delta, L).tolist()

        def run(heads):
            idx = torch.tensor(heads, device=dev)
            ins = [t.index_select(2, idx).contiguous().requires_grad_() for t in (q, k, v, g)]
            d = do.index_select(2, idx).contiguous()

            def step():
                o = forgetting_attention(*ins, log_eps=args.log_eps, logit_bound=math.sqrt(D))
                torch.autograd.grad(o, ins[:3], d)
            return _bench(step)
        whole = run(list(range(H)))
        for P in args.cp:
            per_rank = [round(run(b), 2) for b in assign_heads(costs, P)]
            rows.append({"L": L, "cp": P, "whole_ms": round(whole, 2), "per_rank_ms": per_rank,
                         "max_over_whole_per_rank": round(max(per_rank) / (whole / P), 3)})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def merge_bench(args):
    """Time one log-sum-exp merge of a chunk's partial output (the ring does one per block
    in the forward): the Triton kernel against the plain PyTorch passes, per L and CP."""
    from megatron_fox.ops.forgetting_attn.merge import merge_partial_, merge_reference_

    dev = torch.device(args.device)
    rows = []
    for L in args.lengths:
        for P in args.cp:
            n = L // (2 * P)
            o_acc = torch.randn(1, n, args.heads, args.head_dim, device=dev)
            lse = torch.randn(1, args.heads, n, device=dev)
            o_b = torch.randn(1, n, args.heads, args.head_dim, device=dev, dtype=torch.bfloat16)
            lse_b = torch.randn(1, args.heads, n, device=dev)
            t = {name: _bench(lambda f=f: f(o_acc, lse, o_b, lse_b))
                 for name, f in (("torch_ms", merge_reference_), ("triton_ms", merge_partial_))}
            rows.append({"L": L, "cp": P, "chunk": n, **{k: round(v, 3) for k, v in t.items()}})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cp", type=int, nargs="+", default=[2, 4, 8])
    p.add_argument("--lengths", type=int, nargs="+", default=[32768, 65536, 131072])
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--log-eps", type=float, default=-10.0)
    p.add_argument("--multi-gpu", action="store_true", help="real ring under torchrun (NCCL)")
    p.add_argument("--cp-comm-type", nargs="+", choices=["p2p", "a2a"], default=["p2p", "a2a"],
                   help="--multi-gpu: ring (p2p) and/or head-parallel (a2a) context parallelism")
    p.add_argument("--merge", action="store_true", help="time the partial-output merge alone (one GPU)")
    p.add_argument("--a2a-split", action="store_true",
                   help="one GPU: the op on each rank's heads as a2a deals them by cost (balance check)")
    p.add_argument("--backward-pruning", choices=["bound", "lse"], default="bound",
                   help="--multi-gpu: the backward kernels prune by the forward's rule or also by the rows' lse")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2, help="untimed calls before the timed ones (>= 1)")
    p.add_argument("--check", action="store_true",
                   help="multi-GPU: at the first length, compare the ring's output and gradients with the one-device op")
    p.add_argument("--json", default=None)
    p.add_argument("--device", default="cuda", help="cpu: smoke run at tiny sizes (TRITON_INTERPRET=1 or reference)")
    args = p.parse_args(argv)
    if args.device not in ("cuda", "cpu"):
        p.error(f"--device must be cuda or cpu, got {args.device!r}")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("needs CUDA (or --device cpu for a smoke run)")
    if args.warmup < 1:
        p.error(f"--warmup must be >= 1 (an untimed call's output is checked), got {args.warmup}")
    if args.multi_gpu:
        rows = multi_gpu(args)
    else:
        rows = merge_bench(args) if args.merge else a2a_split_bench(args) if args.a2a_split else single_gpu(args)
    if args.json and (not args.multi_gpu or int(os.environ.get("RANK", "0")) == 0):
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    if args.multi_gpu:
        import torch.distributed as dist

        dist.barrier()  # everything is written
        if args.device == "cpu":  # gloo's threads can abort the interpreter's teardown ("terminate called")
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(0)
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
