"""The alpha-sparse sigmoid: the first entry of alpha-entmax([x, 0]).

alpha-entmax (Peters et al. 2019) gives p_i = [(alpha-1) z_i - tau]_+^(1/(alpha-1)) with tau
making the p_i sum to 1. For the two scores [x, 0] with both in the support this reads
    p^a - (1 - p)^a = a x,    a = alpha - 1,
whose left side rises from -1 (p = 0) to 1 (p = 1): p = 1 for a x >= 1, p = 0 for a x <= -1,
and in between the root is found by bisection. alpha = 1 is the ordinary sigmoid (the limit
a -> 0 of the equation is log p - log(1 - p) = x), alpha = 2 gives clip((x + 1) / 2, 0, 1).

Derivative inside (0, 1), from the implicit equation: dp/dx = 1 / (p^(a-1) + (1-p)^(a-1));
0 where p is clipped. Larger alpha: a narrower ramp, exact zeros and ones sooner.
"""

from __future__ import annotations

import math

import torch

# [0, 1] halved to 1.2e-10 (far below float32's resolution of p) or, for float64 inputs
# (gradient checks by finite differences), to float64's
_BISECTION_STEPS = {torch.float64: 52}


def _halvings(dtype: torch.dtype, a: float) -> int:
    """Bisection steps before the Newton steps (a >= 1) or alone (a < 1)."""
    return 10 if a >= 1.0 else _BISECTION_STEPS.get(dtype, 33)


def _solve(x: torch.Tensor, a: float) -> torch.Tensor:
    """p in [0, 1] with p^a - (1-p)^a = a x, computed in float64, to an absolute 1e-10
    (float64 x: 1e-16).

    Bisection; for a >= 1 (alpha >= 2) ten halvings then Newton steps kept inside the bracket
    (f = p^a - (1-p)^a - a x rises with f' = a (p^(a-1) + (1-p)^(a-1)) >= a 2^(2-a) > 0, and
    f''/f' stays bounded, so each step squares the error; four reach float64's). For a < 1
    f' is unbounded at the ends and Newton stalls there: bisection all the way."""
    ax = a * x.double()
    lo = torch.zeros_like(ax)
    hi = torch.ones_like(ax)
    for _ in range(_halvings(x.dtype, a)):
        mid = 0.5 * (lo + hi)
        below = mid.pow(a) - (1.0 - mid).pow(a) < ax
        lo = torch.where(below, mid, lo)
        hi = torch.where(below, hi, mid)
    p = 0.5 * (lo + hi)
    if a >= 1.0:
        at_zero = 1.0 if a == 1.0 else 0.0  # x^(a-1) at x = 0
        for _ in range(4):
            pa, qa = p.pow(a), (1.0 - p).pow(a)
            # f' / a = p^(a-1) + (1-p)^(a-1) from the powers just taken (two a step, not four)
            d = torch.where(p > 0, pa / torch.where(p > 0, p, 1.0), at_zero)
            d = d + torch.where(p < 1, qa / torch.where(p < 1, 1.0 - p, 1.0), at_zero)
            p = torch.minimum(torch.maximum(p - (pa - qa - ax) / (a * d), lo), hi)
    return torch.where(ax >= 1.0, 1.0, torch.where(ax <= -1.0, 0.0, p))


def _slope(p: torch.Tensor, a: float) -> torch.Tensor:
    """dp/dx inside (0, 1) (0 where p is clipped), from p (float64)."""
    inside = (p > 0) & (p < 1)
    pc = p.clamp(1e-300, 1.0)
    qc = (1.0 - p).clamp(1e-300, 1.0)
    return torch.where(inside, 1.0 / (pc.pow(a - 1.0) + qc.pow(a - 1.0)), 0.0)


def solve_with_slope(x: torch.Tensor, a: float, use_triton: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(p in x.dtype, dp/dx in float32, float64 for float64 x) of the sparse sigmoid with
    a = alpha - 1 > 0. use_triton: one fused kernel (`sparse_sigmoid_triton`; the root search
    in registers, one read of x), else the torch ops above."""
    slope_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    if use_triton:
        from .sparse_sigmoid_triton import sparse_sigmoid_triton

        return sparse_sigmoid_triton(x, a, _halvings(x.dtype, a), newton=a >= 1.0, slope_dtype=slope_dtype)
    p = _solve(x, a)
    return p.to(x.dtype), _slope(p, a).to(slope_dtype)


class _SparseSigmoid(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, alpha):
        p, slope = solve_with_slope(x, alpha - 1.0, use_triton=x.is_cuda)
        ctx.save_for_backward(slope)
        return p

    @staticmethod
    def backward(ctx, grad):
        (slope,) = ctx.saved_tensors
        return (grad.to(slope.dtype) * slope).to(grad.dtype), None


def check_alpha(alpha) -> float:
    """alpha as a float, or ValueError naming it unless alpha >= 1."""
    alpha = float(alpha)
    if not alpha >= 1.0:
        raise ValueError(f"alpha must be >= 1, got {alpha}")
    return alpha


def sparse_sigmoid(x: torch.Tensor, alpha: float) -> torch.Tensor:
    """Elementwise alpha-sparse sigmoid of x (any shape), differentiable in x.

    alpha >= 1 (a float, not a tensor): 1 is torch.sigmoid; above 1 the output reaches exactly
    0 for x <= -1 / (alpha - 1) and exactly 1 for x >= 1 / (alpha - 1). Computed in float64,
    returned in x.dtype. alpha = inf is the limit, the step (x > 0) (no gradient): the hard
    decisions of decoding.
    """
    alpha = check_alpha(alpha)
    if alpha == 1.0:
        return torch.sigmoid(x)
    if math.isinf(alpha):
        return (x > 0).to(x.dtype)
    return _SparseSigmoid.apply(x, alpha)
