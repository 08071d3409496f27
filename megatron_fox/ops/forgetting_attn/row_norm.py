"""The largest row norm of each (batch, head) in one read of the tensor: the data bound
U = sm_scale * max||q|| * max||k|| of ACP (and of exact FoX's zero blocks)."""

import torch
import triton
import triton.language as tl

from .tiles import _last_dim_contiguous


@triton.jit
def max_sq_norm_kernel(X, OUT, T, H, s_b, s_t, s_h, HEAD_DIM: tl.constexpr, BLOCK_T: tl.constexpr):
    """OUT[b*H + h] = max over this program's rows t of sum_d X[b, t, h, d]^2 (atomic max:
    OUT starts at zero, squares are >= 0, and max is order-free, so the result is exact)."""
    pid_t = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    rows = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.arange(0, HEAD_DIM)
    ptrs = X + b.to(tl.int64) * s_b + h * s_h + rows[:, None].to(tl.int64) * s_t + cols[None, :]
    x = tl.load(ptrs, mask=rows[:, None] < T, other=0.0).to(tl.float32)
    tl.atomic_max(OUT + bh, tl.max(tl.sum(x * x, 1), 0))


def max_row_norm(x: torch.Tensor) -> torch.Tensor:
    """x [B, T, H, D] (last dim contiguous, D a power of two) -> max_t ||x[b, t, h]||, float32 [B, H]."""
    B, T, H, D = x.shape
    x = _last_dim_contiguous(x)
    out = torch.zeros(B * H, dtype=torch.float32, device=x.device)
    block_t = 64
    max_sq_norm_kernel[(triton.cdiv(T, block_t), B * H)](x, out, T, H, x.stride(0), x.stride(1), x.stride(2),
                                                         HEAD_DIM=D, BLOCK_T=block_t)
    return out.view(B, H).sqrt()
