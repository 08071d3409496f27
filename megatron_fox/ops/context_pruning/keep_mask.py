"""`keep_mask`: context pruning's keep mask I [B, T, T] from the interaction projections, as
one Triton kernel a pass (`keep_mask_triton`) on CUDA and under TRITON_INTERPRET=1, else the
plain-PyTorch reference (`keep_mask_reference`: materialised probabilities and torch.cumprod,
the ground truth of its tests)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import triton

from ..forgetting_attn.tiles import _interpreting
from .reference import check_interaction, keep_mask_reference
from .sparse_sigmoid import check_alpha

_BLOCK = 64
# warps of the two tile kernels that evaluate the sparse sigmoid (tools/kernel_report.py,
# sm_90): at 4 warps their [64, 64] float32 tiles spill (255 registers, 624 / 920 B of stack
# a thread); 16 warps (98 / 128 registers) ran fastest on an H100, 2.6x 4 warps' time and
# 1.3x 8 warps' (docs/benchmarks.md, learned context pruning, thirteenth session)
_WARPS = {"probs": 16, "bwd": 16}
_MAX_R = 128  # two [64, r] float32 tiles and the score tile in registers; wider r: the reference
# float32 registers: five halvings then four Newton steps (alpha >= 2; against an 80-halving
# root, at float32's resolution, 6.6e-8, for alpha - 1 in [1, 20], as ten halvings were), or
# halvings to float32's resolution (Newton stalls where f' is unbounded, alpha < 2)
_STEPS_NEWTON, _STEPS_BISECTION = 5, 24


def _mode(alpha: float):
    """(MODE, a, STEPS, NEWTON) of the kernels for this alpha."""
    from .keep_mask_triton import SIGMOID, SPARSE, STEP

    if alpha == 1.0:
        return SIGMOID, 0.0, 0, False
    if math.isinf(alpha):
        return STEP, 0.0, 0, False
    a = alpha - 1.0
    return SPARSE, a, _STEPS_NEWTON if a >= 1.0 else _STEPS_BISECTION, a >= 1.0


def _padded(x: torch.Tensor) -> torch.Tensor:
    """x [B, T, r] contiguous with r zero-padded to a power of two >= 16 (tl.dot's smallest K)."""
    r = x.shape[-1]
    rp = max(16, 1 << (r - 1).bit_length())
    return F.pad(x, (0, rp - r)).contiguous() if rp != r else x.contiguous()


class _KeepMask(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q_int, k_int, beta, alpha):
        B, T, r = q_int.shape
        qi, ki = _padded(q_int), _padded(k_int)
        beta_t = beta.reshape(1).float().contiguous()
        mode, a, steps, newton = _mode(alpha)
        keep = torch.empty(B, T, T, device=q_int.device, dtype=torch.float32)
        blk = torch.empty(B, triton.cdiv(T, _BLOCK), T, device=q_int.device, dtype=torch.float32)
        from .keep_mask_triton import keep_probs_kernel, keep_scan_kernel

        grid = (triton.cdiv(T, _BLOCK) ** 2, B)
        keep_probs_kernel[grid](qi, ki, beta_t, keep, blk, T, 1.0 / math.sqrt(r), a, R=qi.shape[-1], BM=_BLOCK,
                                BN=_BLOCK, MODE=mode, STEPS=steps, NEWTON=newton, num_warps=_WARPS["probs"])
        keep_scan_kernel[grid](keep, blk, T, BM=_BLOCK, BN=_BLOCK)
        ctx.save_for_backward(qi, ki, beta_t, keep)
        ctx.beta_shape = beta.shape
        ctx.meta = (r, a, mode, steps, newton, q_int.dtype, k_int.dtype)
        return keep

    @staticmethod
    def backward(ctx, grad):
        from .keep_mask_triton import keep_bwd_kernel, keep_bwd_sums_kernel

        qi, ki, beta_t, keep = ctx.saved_tensors
        r, a, mode, steps, newton, q_dtype, k_dtype = ctx.meta
        B, T, R = qi.shape
        grid = (triton.cdiv(T, _BLOCK) ** 2, B)
        g = grad.float().contiguous()
        blk = torch.empty(B, triton.cdiv(T, _BLOCK), T, device=qi.device, dtype=torch.float32)
        keep_bwd_sums_kernel[grid](keep, g, blk, T, BM=_BLOCK, BN=_BLOCK)
        dqi = torch.zeros(B, T, R, device=qi.device, dtype=torch.float32)
        dki = torch.zeros_like(dqi)
        dbeta = torch.empty(B, grid[0], device=qi.device, dtype=torch.float32)
        keep_bwd_kernel[grid](qi, ki, beta_t, keep, g, blk, dqi, dki, dbeta, T, 1.0 / math.sqrt(r), a, R=R, BM=_BLOCK,
                              BN=_BLOCK, MODE=mode, STEPS=steps, NEWTON=newton, num_warps=_WARPS["bwd"])
        return dqi[..., :r].to(q_dtype), dki[..., :r].to(k_dtype), dbeta.sum().reshape(ctx.beta_shape), None


def keep_mask(q_int: torch.Tensor, k_int: torch.Tensor, beta, alpha: float) -> torch.Tensor:
    """I [B, T, T] float32 (query, key): the product over the queries n in (j, k] of the keep
    probabilities sigmoid_alpha(q_int_n . k_int_j / sqrt(r) + beta), 1 on and above the
    diagonal. q_int, k_int [B, T, r]; beta a float or a 1-element tensor; alpha >= 1 (inf:
    hard decisions). Differentiable in q_int, k_int and beta (not for alpha inf). Triton on
    CUDA and under TRITON_INTERPRET=1 for r <= 128 and float32/bf16/fp16 projections; else
    `keep_mask_reference`."""
    check_interaction(q_int, k_int)
    alpha = check_alpha(alpha)
    on_kernels = q_int.device.type == "cuda" or _interpreting()
    if not on_kernels or q_int.dtype == torch.float64 or q_int.shape[-1] > _MAX_R:  # float64: gradient checks
        return keep_mask_reference(q_int, k_int, beta, alpha)
    beta_t = beta if torch.is_tensor(beta) else torch.tensor(float(beta), device=q_int.device)
    if beta_t.numel() != 1:
        raise ValueError(f"beta must be a float or a 1-element tensor, got shape {tuple(beta_t.shape)}")
    if math.isinf(alpha):
        with torch.no_grad():
            return _KeepMask.apply(q_int, k_int, beta_t, alpha)
    return _KeepMask.apply(q_int, k_int, beta_t, alpha)
