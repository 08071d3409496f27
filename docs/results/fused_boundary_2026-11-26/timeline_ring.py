"""Timeline of the CP ring (ACP, every chunk sent), backward pruning bound vs lse, per rank:
GPU busy (union of kernels), idle gaps, NCCL time not covered by compute, host time per step."""
import math, os, sys, time
import torch, torch.distributed as dist
sys.path.insert(0, "tools")
from bench_attention import gate_spectrum, make_inputs
from megatron_fox.ops import set_data_checks
from megatron_fox.parallel import context_parallel_forgetting_attention, split_for_context_parallel
from torch.profiler import ProfilerActivity, profile
from torch.autograd import DeviceType

def union(iv):
    out = []
    for a, b in sorted(iv):
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return out

def covered(iv, cover):
    """length of iv (merged) not covered by cover (merged)."""
    tot = 0.0
    j = 0
    for a, b in iv:
        x = a
        while j < len(cover) and cover[j][1] <= x:
            j += 1
        k = j
        while k < len(cover) and cover[k][0] < b:
            lo, hi = max(cover[k][0], x), min(cover[k][1], b)
            if lo > x:
                tot += lo - x
            x = max(x, hi)
            k += 1
        if x < b:
            tot += b - x
    return tot

set_data_checks(False)
dist.init_process_group("nccl"); r, P = dist.get_rank(), dist.get_world_size(); torch.cuda.set_device(r)
dev = torch.device("cuda"); L = int(sys.argv[1]); H, D = 16, 128
out_dir = os.environ.get("OUT", ".")
torch.manual_seed(0)
q, k, v = make_inputs(1, L, H, D, dev); g = gate_spectrum(1, L, H, 4, 4096, dev); do = torch.randn_like(q)
parts = [split_for_context_parallel(t, 1, r, P).detach().requires_grad_() for t in (q, k, v, g)]
do_part = split_for_context_parallel(do, 1, r, P)
for rnd, bp in enumerate(("bound", "lse", "bound", "lse")):
    def step():
        o = context_parallel_forgetting_attention(*parts, cp_group=dist.group.WORLD, log_eps=-10.0, logit_bound=math.sqrt(D),
                                                  skip_chunks=False, backward_pruning=bp)
        torch.autograd.grad(o, parts[:3], do_part)
    for _ in range(3): step()
    torch.cuda.synchronize(); dist.barrier()
    t0 = time.perf_counter()
    for _ in range(10): step()
    torch.cuda.synchronize(); wall = (time.perf_counter() - t0) / 10 * 1e3
    dist.barrier()
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        for _ in range(3):
            h0 = time.perf_counter(); step(); host = (time.perf_counter() - h0) * 1e3
        torch.cuda.synchronize()
    if os.environ.get("TRACE") == "1" and rnd < 2:
        prof.export_chrome_trace(f"{out_dir}/trace_{L}_{bp}_rank{r}.json")
    ks = [e for e in prof.events() if e.device_type == DeviceType.CUDA]
    iv = [(e.time_range.start, e.time_range.end) for e in ks]
    comp = union([x for x, e in zip(iv, ks) if "nccl" not in e.name.lower()])
    nccl = union([x for x, e in zip(iv, ks) if "nccl" in e.name.lower()])
    allu = union(iv)
    span = (allu[-1][1] - allu[0][0]) / 3e3
    busy = sum(b - a for a, b in allu) / 3e3
    gaps = [(allu[i + 1][0] - allu[i][1]) for i in range(len(allu) - 1)]
    big = [x for x in gaps if x > 20]
    exposed = covered(nccl, comp) / 3e3
    streams = sorted({getattr(e, "device_index", 0) for e in ks})
    print(f"rank {r} {bp}: wall {wall:.2f} ms/step, last profiled step host {host:.2f} ms, gpu span {span:.2f}, busy {busy:.2f}, "
          f"compute {sum(b - a for a, b in comp) / 3e3:.2f}, nccl {sum(b - a for a, b in nccl) / 3e3:.2f} (not under compute {exposed:.2f}), "
          f"idle gaps>20us {len(big) / 3:.0f}/step summing {sum(big) / 3e3:.2f} ms, kernels/step {len(ks) / 3:.0f}", flush=True)
dist.destroy_process_group()
