"""Where the time between the profiler's kernel sum and the timed median of one fwd+bwd goes (16k)."""
import json, math, sys, time, os
import torch, triton
sys.path.insert(0, "tools")
from bench_attention import gate_spectrum, make_inputs, bench
from megatron_fox.ops import forgetting_attention, set_data_checks
from torch.profiler import ProfilerActivity, profile

set_data_checks(False)
dev = torch.device("cuda")
L, H, D = 16384, 16, 128
B = 65536 // L
q, k, v = make_inputs(B, L, H, D, dev)
g = gate_spectrum(B, L, H, 4, 4096, dev)
for t in (q, k, v):
    t.requires_grad_(True)
out = {}
for log_eps in (None, -10.0):
    o0 = forgetting_attention(q, k, v, g, log_eps=log_eps, logit_bound=math.sqrt(D))
    dout = torch.randn_like(o0)
    del o0
    def step():
        o = forgetting_attention(q, k, v, g, log_eps=log_eps, logit_bound=math.sqrt(D))
        torch.autograd.grad(o, (q, k, v), dout)
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    r = {}
    r["do_bench_median"] = bench(step)
    # back-to-back, no L2 flush
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize(); s.record()
    for _ in range(20):
        step()
    e.record(); torch.cuda.synchronize()
    r["back_to_back_20"] = s.elapsed_time(e) / 20
    # CPU time to enqueue one step (GPU busy meanwhile)
    torch.cuda.synchronize()
    t0 = time.perf_counter(); step(); t1 = time.perf_counter(); torch.cuda.synchronize(); t2 = time.perf_counter()
    r["cpu_enqueue_ms"] = (t1 - t0) * 1e3
    r["cpu_enqueue_plus_drain_ms"] = (t2 - t0) * 1e3
    # profiler trace over 10 steps: kernel busy vs span
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(10):
            step()
        torch.cuda.synchronize()
    fn = f"/tmp/trace_{log_eps}.json"
    prof.export_chrome_trace(fn)
    ev = [x for x in json.load(open(fn))["traceEvents"] if x.get("cat") == "kernel"]
    ev.sort(key=lambda x: x["ts"])
    busy = sum(x["dur"] for x in ev) / 1e3
    span = (ev[-1]["ts"] + ev[-1]["dur"] - ev[0]["ts"]) / 1e3
    gaps = sorted(((b["ts"] - (a["ts"] + a["dur"])) / 1e3, a["name"][:40], b["name"][:40]) for a, b in zip(ev, ev[1:]))[-6:]
    r["prof_kernel_ms_per_step"] = busy / 10
    r["prof_span_ms_per_step"] = span / 10
    r["largest_gaps_ms"] = gaps
    big = {}
    for x in ev:
        big.setdefault(x["name"][:30], []).append(x["dur"] / 1e3)
    r["per_kernel_first_last"] = {k2: (round(v2[0], 3), round(v2[-1], 3), round(sum(v2) / len(v2), 3)) for k2, v2 in big.items() if sum(v2) > 5}
    out[str(log_eps)] = r
    print(json.dumps({str(log_eps): r}, indent=1), flush=True)
json.dump(out, open(os.environ.get("OUT", "/tmp") + "/gap.json", "w"), indent=1)
