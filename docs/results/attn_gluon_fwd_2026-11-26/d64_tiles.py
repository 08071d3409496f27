import math, sys, json
import torch
sys.path.insert(0, "tools")
from bench_attention import gate_spectrum, make_inputs, bench
from megatron_fox.ops import forgetting_attention, set_data_checks, set_gluon_forward, set_kernel_config, KernelConfig, Tile
from megatron_fox.ops.forgetting_attn import gluon_fwd
from megatron_fox.ops.forgetting_attn.function import kernel_config
set_data_checks(False)
print(torch.cuda.get_device_name(), flush=True)
dev = torch.device("cuda")
base = kernel_config(64, dev)
big = KernelConfig(fwd=Tile(128, 128, 8, 3, tma=True), dkdv=base.dkdv, dq=base.dq)
variants = [("triton_128x64", None, False, None), ("triton_128x128", big, False, None),
            ("gluon_128x64_s4", None, True, (128, 64, 4)), ("gluon_128x128_s2", big, True, (128, 128, 2)),
            ("gluon_128x128_s3", big, True, (128, 128, 3))]
def use(cfg, gl_on, tiles):
    set_kernel_config(cfg); set_gluon_forward(gl_on)
    if tiles: gluon_fwd.TILES[64] = tiles
    else: gluon_fwd.TILES.pop(64, None)
H, D = 16, 64
# correctness of the d64 gluon tiles against triton
torch.manual_seed(0)
q, k, v = make_inputs(2, 1500, 4, D, dev); g = gate_spectrum(2, 1500, 4, 4, 4096, dev)
outs = {}
for name, cfg, gl_on, tiles in variants:
    use(cfg, gl_on, tiles)
    ins = [t.detach().clone().requires_grad_() for t in (q, k, v, g)]
    o = forgetting_attention(*ins, log_eps=-10.0, logit_bound=8.0)
    gr = torch.autograd.grad(o, ins, torch.ones_like(o))
    outs[name] = [o, *gr]
for name in outs:
    d = max(((a.float() - b.float()).abs().max() / b.float().abs().max()).item() for a, b in zip(outs[name], outs["triton_128x64"]))
    print("maxreldiff vs triton_128x64", name, f"{d:.1e}", flush=True)
for L in (4096, 16384):
    B = 65536 // L
    q, k, v = make_inputs(B, L, H, D, dev); g = gate_spectrum(B, L, H, 4, 4096, dev)
    for t in (q, k, v, g): t.requires_grad_(True)
    do = torch.randn_like(q)
    for rnd in (1, 2):
        for name, cfg, gl_on, tiles in variants:
            use(cfg, gl_on, tiles)
            res = {}
            for mode, eps in (("exact", None), ("acp", -10.0)):
                f = lambda: forgetting_attention(q, k, v, g, log_eps=eps, logit_bound=8.0)
                with torch.no_grad():
                    tf = bench(f)
                tb = bench(lambda: torch.autograd.grad(f(), (q, k, v, g), do))
                res[mode] = (round(tf, 3), round(tb, 3))
            print(json.dumps({"L": L, "round": rnd, "variant": name, **res}), flush=True)
