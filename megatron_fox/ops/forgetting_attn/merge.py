"""Merging partial attention results by log-sum-exp, in place (context-parallel ring).

Two partial results of the same query rows over disjoint key sets, (o_a, lse_a) and
(o_b, lse_b), combine exactly as
    lse = log(exp(lse_a) + exp(lse_b)),  o = o_a exp(lse_a - lse) + o_b exp(lse_b - lse),
with rows that saw no key (lse = -inf on both sides) left at o = 0, lse = -inf. With
base2=True both lse are base-2 logarithms (log2 of the sums), as the kernels keep them: the
same formula with exp2/log2, so a ring can keep base 2 throughout and skip two rescalings
per block.
The Triton kernel does it in one pass over o (read o_a and o_b, write o_a); the plain
PyTorch form below is the reference and the CPU path.

Tensors: o_acc [B, T, H, D] float32 (a strided view is fine), lse_acc [B, H, T] float32
(last dim contiguous); o_b [B, T, H, D] any float dtype; lse_b [B, H, T] float32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .tiles import _interpreting


@triton.jit
def merge_kernel(OA, LA, OB, LB, T, H,
                 s_oab, s_oat, s_oah, s_obb, s_obt, s_obh, s_lab, s_lah, s_lbb, s_lbh,
                 HEAD_DIM: tl.constexpr, BLOCK_T: tl.constexpr, BASE2: tl.constexpr):
    pid_t = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_d = tl.arange(0, HEAD_DIM)
    rows = offs_t < T
    la_ptr = LA + b * s_lab + h * s_lah + offs_t
    la = tl.load(la_ptr, mask=rows, other=float("-inf"))
    lb = tl.load(LB + b * s_lbb + h * s_lbh + offs_t, mask=rows, other=float("-inf"))
    m = tl.maximum(la, lb)
    m = tl.where(m == float("-inf"), 0.0, m)  # both empty: weights 0, lse stays -inf
    if BASE2:
        ea = tl.exp2(la - m)
        eb = tl.exp2(lb - m)
    else:
        ea = tl.exp(la - m)
        eb = tl.exp(lb - m)
    total = ea + eb
    empty = total == 0.0
    total = tl.where(empty, 1.0, total)
    oa_ptr = OA + b * s_oab + h * s_oah + offs_t[:, None] * s_oat + offs_d[None, :]
    ob_ptr = OB + b * s_obb + h * s_obh + offs_t[:, None] * s_obt + offs_d[None, :]
    oa = tl.load(oa_ptr, mask=rows[:, None], other=0.0)
    ob = tl.load(ob_ptr, mask=rows[:, None], other=0.0).to(tl.float32)
    out = oa * (ea / total)[:, None] + ob * (eb / total)[:, None]
    tl.store(oa_ptr, out, mask=rows[:, None])
    if BASE2:
        lse = m + tl.log2(total)
    else:
        lse = m + tl.log(total)
    tl.store(la_ptr, tl.where(empty, float("-inf"), lse), mask=rows)


def merge_reference_(o_acc, lse_acc, o_b, lse_b, base2: bool = False) -> None:
    """Plain-PyTorch in-place merge (same contract as `merge_partial_`)."""
    lse_new = (torch.logaddexp2 if base2 else torch.logaddexp)(lse_acc, lse_b)
    exp = torch.exp2 if base2 else torch.exp
    w_old = exp(lse_acc - lse_new).nan_to_num(0.0).transpose(1, 2)[..., None]
    w_new = exp(lse_b - lse_new).nan_to_num(0.0).transpose(1, 2)[..., None]
    o_acc.copy_(o_acc * w_old + o_b.float() * w_new)
    lse_acc.copy_(lse_new)


def merge_partial_(o_acc: torch.Tensor, lse_acc: torch.Tensor, o_b: torch.Tensor, lse_b: torch.Tensor,
                   base2: bool = False) -> None:
    """Fold the partial result (o_b [B, T, H, D], lse_b [B, H, T]) into (o_acc float32,
    lse_acc float32) in place; base2: both lse in base 2. Triton on CUDA or under
    TRITON_INTERPRET=1, else PyTorch."""
    if not (o_acc.device.type == "cuda" or _interpreting()):
        merge_reference_(o_acc, lse_acc, o_b, lse_b, base2)
        return
    B, T, H, D = o_acc.shape
    if o_acc.dtype != torch.float32 or lse_acc.dtype != torch.float32 or o_acc.stride(3) != 1 \
            or o_b.stride(3) != 1 or lse_acc.stride(2) != 1:
        raise ValueError("merge_partial_: o_acc and lse_acc must be float32, last dims contiguous")
    lse_b = lse_b.contiguous()
    block_t = 32 if D >= 128 else 64
    merge_kernel[(triton.cdiv(T, block_t), B * H)](
        o_acc, lse_acc, o_b, lse_b, T, H,
        o_acc.stride(0), o_acc.stride(1), o_acc.stride(2), o_b.stride(0), o_b.stride(1), o_b.stride(2),
        lse_acc.stride(0), lse_acc.stride(1), lse_b.stride(0), lse_b.stride(1),
        HEAD_DIM=D, BLOCK_T=block_t, BASE2=base2, num_warps=4)
