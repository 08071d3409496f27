"""Profile the CP ring (ACP, every chunk sent) at one length, backward pruning bound vs lse, per rank."""
import collections, math, os, sys, time
import torch, torch.distributed as dist
sys.path.insert(0, "tools")
from bench_attention import gate_spectrum, make_inputs
from megatron_fox.ops import set_data_checks
from megatron_fox.parallel import context_parallel_forgetting_attention, split_for_context_parallel
from torch.profiler import ProfilerActivity, profile
from torch.autograd import DeviceType

set_data_checks(False)
dist.init_process_group("nccl"); r, P = dist.get_rank(), dist.get_world_size(); torch.cuda.set_device(r)
dev = torch.device("cuda"); L = int(sys.argv[1]); H, D = 16, 128
torch.manual_seed(0)
q, k, v = make_inputs(1, L, H, D, dev); g = gate_spectrum(1, L, H, 4, 4096, dev); do = torch.randn_like(q)
parts = [split_for_context_parallel(t, 1, r, P).detach().requires_grad_() for t in (q, k, v, g)]
do_part = split_for_context_parallel(do, 1, r, P)
for bp in ("bound", "lse", "bound", "lse"):
    def step():
        o = context_parallel_forgetting_attention(*parts, cp_group=dist.group.WORLD, log_eps=-10.0, logit_bound=math.sqrt(D),
                                                  skip_chunks=False, backward_pruning=bp)
        torch.autograd.grad(o, parts[:3], do_part)
    for _ in range(3): step()
    torch.cuda.synchronize(); dist.barrier()
    t0 = time.perf_counter()
    for _ in range(10): step()
    torch.cuda.synchronize(); wall = (time.perf_counter() - t0) / 10 * 1e3
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        for _ in range(3): step()
        torch.cuda.synchronize()
    ks = [e for e in prof.events() if e.device_type == DeviceType.CUDA]
    comp = sum(e.time_range.end - e.time_range.start for e in ks if "nccl" not in e.name.lower()) / 3e3
    nccl = sum(e.time_range.end - e.time_range.start for e in ks if "nccl" in e.name.lower()) / 3e3
    span = (max(e.time_range.end for e in ks) - min(e.time_range.start for e in ks)) / 3e3
    by = collections.Counter(); cnt = collections.Counter()
    for e in ks:
        by[e.name[:50]] += (e.time_range.end - e.time_range.start) / 3e3; cnt[e.name[:50]] += 1
    launches = sum(cnt.values()) / 3
    print(f"rank {r} {bp}: wall {wall:.2f} ms/step, gpu span {span:.2f}, compute kernels {comp:.2f}, nccl {nccl:.2f}, "
          f"kernels/step {launches:.0f}; top: " + "; ".join(f"{n} {t:.2f}ms x{cnt[n]//3}" for n, t in by.most_common(6)), flush=True)
dist.destroy_process_group()
