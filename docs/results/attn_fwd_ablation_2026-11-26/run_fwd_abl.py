"""Ablation of the forward kernel at 16k (timing only; outputs wrong by design)."""
import math
import sys
import time

import torch
import triton

sys.path.insert(0, "tools")
sys.path.insert(0, "gpu_abl")
import fwd_abl  # noqa: E402
from bench_attention import gate_spectrum, make_inputs  # noqa: E402

from megatron_fox.ops import forgetting_attention, set_data_checks  # noqa: E402
from megatron_fox.ops.forgetting_attn import function  # noqa: E402

set_data_checks(False)
dev = torch.device("cuda")
print(torch.cuda.get_device_name(), torch.__version__, triton.__version__, time.strftime("%Y-%m-%d %H:%M"), flush=True)


class Patched:
    def __init__(self, abl):
        self.abl = abl

    def __getitem__(self, grid):
        return lambda *a, **kw: fwd_abl.fwd_kernel[grid](*a, ABL=self.abl, **kw)


L, H, D = 16384, 16, 128
B = 65536 // L
q, k, v = make_inputs(B, L, H, D, dev)
g = gate_spectrum(B, L, H, 4, 4096, dev)
names = {0: "full", 1: "no c_j load (zeros)", 4: "c_j loaded, not added per logit", 2: "no diagonal block", 3: "no c_j load, no diagonal"}
for log_eps in (None, -10.0):
    kw = dict(log_eps=log_eps, logit_bound=math.sqrt(D))
    res = {}
    for rnd in range(3):
        for abl in names:
            function.fwd_kernel = Patched(abl)
            with torch.no_grad():
                ms = triton.testing.do_bench(lambda: forgetting_attention(q, k, v, g, **kw), warmup=50, rep=300)
            res.setdefault(abl, []).append(ms)
    base = sorted(res[0])[1]
    for abl, t in res.items():
        m = sorted(t)[1]
        print(f"log_eps={log_eps} {names[abl]:34s} median-of-3 {m:.3f} ms  delta {m - base:+.3f}  runs {['%.3f' % x for x in t]}", flush=True)
