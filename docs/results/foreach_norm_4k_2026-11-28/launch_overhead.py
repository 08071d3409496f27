"""Host cost of the op: fwd+bwd of a tiny problem (GPU work ~nothing), per call, and of one
raw Triton launch through JITFunction.run vs the compiled kernel's runner."""
import time, torch, triton, triton.language as tl
from megatron_fox.ops import forgetting_attention

@triton.jit
def _k(X, Y, n, s1, s2, s3, s4, s5, s6, s7, s8, BLOCK: tl.constexpr, A: tl.constexpr, B: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(Y + i, tl.load(X + i, mask=i < n) * 2, mask=i < n)

dev = "cuda"
x = torch.randn(1024, device=dev); y = torch.empty_like(x)
args = (x, y, 1000, 7, 8, 9, 10, 11, 12, 13, 14)
ck = _k[(8,)](*args, BLOCK=128, A=True, B=3)
for name, fn in [("jit", lambda: _k[(8,)](*args, BLOCK=128, A=True, B=3)),
                 ("compiled", lambda: ck[(8, 1, 1)](*args, 128, True, 3))]:
    for _ in range(50): fn()
    torch.cuda.synchronize(); t = time.perf_counter()
    for _ in range(2000): fn()
    torch.cuda.synchronize(); print(f"launch {name}: {(time.perf_counter() - t) / 2000 * 1e6:.1f} us")
for acp in (None, -10.0):
    for T, docs in ((256, False), (256, True), (4096, True)):
        q = torch.randn(1, T, 4, 128, device=dev, dtype=torch.bfloat16, requires_grad=True)
        k = torch.randn(1, T, 4, 128, device=dev, dtype=torch.bfloat16, requires_grad=True)
        v = torch.randn(1, T, 4, 128, device=dev, dtype=torch.bfloat16, requires_grad=True)
        g = torch.nn.functional.logsigmoid(torch.randn(1, T, 4, device=dev) + 3).requires_grad_()
        cu = torch.tensor([0, T // 3, T], device=dev, dtype=torch.int32) if docs else None
        def step():
            o = forgetting_attention(q, k, v, g, log_eps=acp, cu_seqlens=cu)
            o.sum().backward()
        for _ in range(10): step()
        torch.cuda.synchronize(); t = time.perf_counter()
        for _ in range(100): step()
        torch.cuda.synchronize(); wall = (time.perf_counter() - t) / 100
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            step(); torch.cuda.synchronize()
        n = sum(1 for ev in prof.events() if ev.device_type == torch.autograd.DeviceType.CUDA)
        print(f"op fwd+bwd T={T} docs={docs} log_eps={acp}: {wall * 1e3:.2f} ms wall a call, {n} GPU kernels/copies")
