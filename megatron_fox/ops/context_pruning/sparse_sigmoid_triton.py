"""The sparse sigmoid in Triton: the root of p^a - (1-p)^a = a x (bisection, then Newton steps
inside the bracket for a >= 1, as `sparse_sigmoid._solve`) and its slope
dp/dx = 1 / (p^(a-1) + (1-p)^(a-1)), as jit helpers in the precision of their argument
(float64 for the elementwise op, float32 inside the keep-mask kernels), and the elementwise
op as one kernel."""

import torch
import triton
import triton.language as tl

_BLOCK = 1024


@triton.jit
def _pow(x, e):
    """x^e for x >= 0 as torch.pow: 0^e = 0 for e > 0, 1 for e = 0, inf for e < 0 (base 2:
    in float32 two special-function instructions)."""
    at_zero = tl.where(e > 0.0, 0.0, tl.where(e == 0.0, 1.0, float("inf")))
    return tl.where(x > 0.0, tl.exp2(e * tl.log2(tl.where(x > 0.0, x, 1.0))), at_zero)


@triton.jit
def sparse_sigmoid_root(ax, a, STEPS: tl.constexpr, NEWTON: tl.constexpr):
    """p in [0, 1] with p^a - (1-p)^a = ax (elementwise, in ax's precision): STEPS halvings
    of [0, 1], then (NEWTON) four Newton steps kept inside the bracket; 1 for ax >= 1, 0 for
    ax <= -1."""
    lo = tl.zeros_like(ax)
    hi = lo + 1.0
    for _ in tl.static_range(STEPS):
        mid = 0.5 * (lo + hi)
        below = _pow(mid, a) - _pow(1.0 - mid, a) < ax
        lo = tl.where(below, mid, lo)
        hi = tl.where(below, hi, mid)
    p = 0.5 * (lo + hi)
    if NEWTON:
        at_zero = tl.where(a == 1.0, 1.0, 0.0)  # x^(a-1) at x = 0 for a >= 1
        for _ in tl.static_range(4):
            pa, qa = _pow(p, a), _pow(1.0 - p, a)
            # f' / a = p^(a-1) + (1-p)^(a-1), from the powers just taken: two powers a step, not four
            d = tl.where(p > 0.0, pa / tl.where(p > 0.0, p, 1.0), at_zero)
            d += tl.where(p < 1.0, qa / tl.where(p < 1.0, 1.0 - p, 1.0), at_zero)
            p = tl.minimum(tl.maximum(p - (pa - qa - ax) / (a * d), lo), hi)
    return tl.where(ax >= 1.0, 1.0, tl.where(ax <= -1.0, 0.0, p))


@triton.jit
def sparse_sigmoid_slope(p, a):
    """dp/dx at p (0 where p is clipped to 0 or 1)."""
    inside = (p > 0.0) & (p < 1.0)
    pc = tl.where(inside, p, 0.5)
    return tl.where(inside, 1.0 / (_pow(pc, a - 1.0) + _pow(1.0 - pc, a - 1.0)), 0.0)


@triton.jit
def _sparse_sigmoid_kernel(X, A, P, SLOPE, n, STEPS: tl.constexpr, NEWTON: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    a = tl.load(A)
    p = sparse_sigmoid_root(a * tl.load(X + offs, mask=m, other=0.0).to(tl.float64), a, STEPS, NEWTON)
    tl.store(P + offs, p.to(P.dtype.element_ty), mask=m)
    tl.store(SLOPE + offs, sparse_sigmoid_slope(p, a).to(SLOPE.dtype.element_ty), mask=m)


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
