"""The sparse sigmoid as one Triton kernel: the root of p^a - (1-p)^a = a x found in
float64 registers (bisection, then Newton steps inside the bracket for a >= 1, as
`sparse_sigmoid._solve`), written once with its slope dp/dx = 1 / (p^(a-1) + (1-p)^(a-1))."""

import torch
import triton
import triton.language as tl

_BLOCK = 1024


@triton.jit
def _pow(x, e):
    """x^e for x >= 0 as torch.pow: 0^e = 0 for e > 0, 1 for e = 0, inf for e < 0."""
    at_zero = tl.where(e > 0.0, 0.0, tl.where(e == 0.0, 1.0, float("inf")))
    return tl.where(x > 0.0, tl.exp(e * tl.log(tl.maximum(x, 1e-300))), at_zero)


@triton.jit
def _sparse_sigmoid_kernel(X, A, P, SLOPE, n, STEPS: tl.constexpr, NEWTON: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    a = tl.load(A)
    ax = a * tl.load(X + offs, mask=m, other=0.0).to(tl.float64)
    lo = tl.zeros([BLOCK], tl.float64)
    hi = lo + 1.0
    for _ in tl.static_range(STEPS):
        mid = 0.5 * (lo + hi)
        below = _pow(mid, a) - _pow(1.0 - mid, a) < ax
        lo = tl.where(below, mid, lo)
        hi = tl.where(below, hi, mid)
    p = 0.5 * (lo + hi)
    if NEWTON:
        for _ in tl.static_range(4):
            f = _pow(p, a) - _pow(1.0 - p, a) - ax
            p = tl.minimum(tl.maximum(p - f / (a * (_pow(p, a - 1.0) + _pow(1.0 - p, a - 1.0))), lo), hi)
    p = tl.where(ax >= 1.0, 1.0, tl.where(ax <= -1.0, 0.0, p))
    inside = (p > 0.0) & (p < 1.0)
    pc = tl.where(inside, p, 0.5)
    slope = tl.where(inside, 1.0 / (_pow(pc, a - 1.0) + _pow(1.0 - pc, a - 1.0)), 0.0)
    tl.store(P + offs, p.to(P.dtype.element_ty), mask=m)
    tl.store(SLOPE + offs, slope.to(SLOPE.dtype.element_ty), mask=m)


def sparse_sigmoid_triton(x: torch.Tensor, a: float, steps: int, newton: bool,
                          slope_dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """(p in x.dtype, slope in slope_dtype), both shaped like x, for a = alpha - 1 > 0:
    `steps` halvings of [0, 1], then (newton) four Newton steps kept in the bracket."""
    xc = x.contiguous()
    p = torch.empty_like(xc)
    slope = torch.empty(xc.shape, device=xc.device, dtype=slope_dtype)
    n = xc.numel()
    if n:
        a_t = torch.tensor([float(a)], device=xc.device, dtype=torch.float64)
        _sparse_sigmoid_kernel[(triton.cdiv(n, _BLOCK),)](xc, a_t, p, slope, n, STEPS=int(steps), NEWTON=bool(newton),
                                                           BLOCK=_BLOCK)
    return p, slope
