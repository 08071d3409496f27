"""Block-level forward and backward (no autograd), the building blocks of context parallelism.

A block is one query chunk against one key chunk with explicit prefix sums at both:
    s_ij = sm_scale q_i.k_j + c_q[i] - c_k[j]
causal=True: the diagonal chunk (key j <= query i); causal=False: a past chunk, every key
visible. The forward returns the block's output and row log-sum-exp so that partial results
merge exactly; the backward takes the merged output and log-sum-exp of the whole row (as
in FlashAttention's ring backward) and returns dq, dk, dv and the row/column sums of dS,
the gradients of c_q and -c_k.

Tensors: q [B, T, H, D]; k, v [B, T, Hkv, D]; c_q, c_k [B, H, T] float32; lse [B, H, T]
float32 (natural log); delta [B, H] ACP threshold or None.
"""

from __future__ import annotations

from typing import Optional

import torch

from .common import LOG2E
from .function import _backward, _forward
from .plan import _Plan
from .tiles import _interpreting, _last_dim_contiguous, kernel_config


def _use_triton(q) -> bool:
    return q.device.type == "cuda" or _interpreting()


def _plan(q, sm_scale, delta, doc_start=None, doc_end=None, bound=None, thresholds=None, diagonal=None):
    pruning = "lse" if bound is not None else "bound"
    return _Plan(sm_scale, delta, doc_start, doc_end, kernel_config(q.shape[-1], q.device, q.dtype), bound, pruning,
                 diagonal=diagonal, backward_thresholds=thresholds)


def _centered(c_q, c_k):
    """Shift both prefix sums by c_k's first value: logits see only c_q - c_k, and small
    magnitudes keep float32 exact enough far into long sequences."""
    ref = c_k[..., :1].detach()
    return (c_q - ref).contiguous(), (c_k - ref).contiguous()


def block_forward(q, k, v, c_q, c_k, *, sm_scale: float, causal: bool, delta: Optional[torch.Tensor] = None,
                  doc_start: Optional[torch.Tensor] = None, doc_end: Optional[torch.Tensor] = None,
                  bound: Optional[torch.Tensor] = None, diagonal: Optional[torch.Tensor] = None,
                  lse_base2: bool = False):
    """-> (o [B, T, H, D] in q.dtype, lse [B, H, T] float32 (natural log; base 2 with
    lse_base2, as the kernels keep it), first computed key block per query block [B, H, nbm]
    int32 (None for the reference path)).

    Exact FoX (delta None) with bound (U [B, H]) and diagonal (sm_scale q_i.k_i [B, H, T] of
    these query rows and their own keys, `plan.forward_diagonal`): skips the key blocks whose
    weights are zero in float32 in the whole row, as the op's exact forward does.

    Packed documents: doc_start [T] int32, for each query the first key index (in this key
    chunk's positions, clamped to [0, T]) of its document; doc_end [T] int32, for each key one
    past the last query index (in the query chunk's positions, clamped) of its document; or
    both [B, T] contiguous, a map per batch row. Both None: no documents.
    """
    c_q, c_k = _centered(c_q.float(), c_k.float())
    if not _use_triton(q):
        o, lse = _reference_forward(q, k, v, c_q, c_k, sm_scale, causal, delta, doc_start)
        return o, lse * LOG2E if lse_base2 else lse, None
    q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
    exact_zero = delta is None and bound is not None  # the diagonal serves only exact FoX's zero blocks
    plan = _plan(q, sm_scale, delta, doc_start, doc_end, bound, diagonal=diagonal if exact_zero else None)
    o, lse2, start = _forward(q, k, v, c_q, c_k, c_q, c_k, plan, causal)
    return o, lse2 if lse_base2 else lse2 * (1.0 / LOG2E), start


def block_backward(q, k, v, o, do, lse, c_q, c_k, *, sm_scale: float, causal: bool,
                   delta: Optional[torch.Tensor] = None, doc_start: Optional[torch.Tensor] = None,
                   doc_end: Optional[torch.Tensor] = None, bound: Optional[torch.Tensor] = None,
                   thresholds: Optional[dict] = None, lse_base2: bool = False):
    """-> (dq, dk, dv, dc_q [B, H, T], dc_k [B, H, T]) given the merged o and lse of the rows
    (lse natural log; base 2 with lse_base2).
    bound (U [B, H], with delta): the kernels also prune by the rows' lse
    (`forgetting_attention(backward_pruning="lse")`); the plain-PyTorch path ignores it.
    thresholds: a dict kept by the caller for one query chunk (same q rows, lse, delta and
    bound) across its key chunks: the lse thresholds are computed once and reused from it."""
    c_q, c_k = _centered(c_q.float(), c_k.float())
    if not _use_triton(q):
        lse = lse * (1.0 / LOG2E) if lse_base2 else lse
        return _reference_backward(q, k, v, o, do, lse, c_q, c_k, sm_scale, causal, delta, doc_start)
    q, k, v, o = (_last_dim_contiguous(t) for t in (q, k, v, o))
    lse2 = lse.contiguous() if lse_base2 else (lse * LOG2E).contiguous()
    dq, dk, dv, drow, dcol = _backward(q, k, v, o, do, None, lse2, c_q, c_k, c_q, c_k,
                                       _plan(q, sm_scale, delta, doc_start, doc_end, bound, thresholds), causal)
    return dq, dk, dv, drow, -dcol


# --- plain-PyTorch versions (CPU without the interpreter) --------------------------------

def _logits(q, k, c_q, c_k, sm_scale, causal, delta, doc_start=None):
    B, T, H, D = q.shape
    group = H // k.shape[2]
    qf = q.float().transpose(1, 2)
    kf = k.float().transpose(1, 2).repeat_interleave(group, dim=1)
    s = sm_scale * qf @ kf.transpose(-1, -2) + c_q[..., :, None] - c_k[..., None, :]
    if causal:
        i = torch.arange(T, device=q.device)
        s = s.masked_fill(i[None, :] > i[:, None], float("-inf"))
    if doc_start is not None:  # [T], or [B, T] with a map per batch row
        j = torch.arange(T, device=q.device)
        first = doc_start.long()[..., None] if doc_start.dim() == 1 else doc_start.long()[:, None, :, None]
        s = s.masked_fill(j < first, float("-inf"))
    if delta is not None:
        s = s.masked_fill((c_q[..., :, None] - c_k[..., None, :]) < delta[..., None, None], float("-inf"))
    return s


def _reference_forward(q, k, v, c_q, c_k, sm_scale, causal, delta, doc_start=None):
    group = q.shape[2] // k.shape[2]
    s = _logits(q, k, c_q, c_k, sm_scale, causal, delta, doc_start)
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - lse[..., None]).nan_to_num(0.0)
    vf = v.float().transpose(1, 2).repeat_interleave(group, dim=1)
    return (p @ vf).transpose(1, 2).to(q.dtype), lse


def _reference_backward(q, k, v, o, do, lse, c_q, c_k, sm_scale, causal, delta, doc_start=None):
    B, T, H, D = q.shape
    group = H // k.shape[2]
    s = _logits(q, k, c_q, c_k, sm_scale, causal, delta, doc_start)
    p = torch.exp(s - lse[..., None]).nan_to_num(0.0)  # [B, H, T, T], zero where masked
    dof, of = do.float().transpose(1, 2), o.float().transpose(1, 2)
    vf = v.float().transpose(1, 2).repeat_interleave(group, dim=1)
    kf = k.float().transpose(1, 2).repeat_interleave(group, dim=1)
    qf = q.float().transpose(1, 2)
    dp = dof @ vf.transpose(-1, -2)
    ds = p * (dp - (dof * of).sum(-1, keepdim=True))
    dq = sm_scale * ds @ kf
    dk = sm_scale * ds.transpose(-1, -2) @ qf
    dv = p.transpose(-1, -2) @ dof

    def fold(t):  # sum the query heads of each key/value group
        return t.view(B, H // group, group, T, D).sum(2).transpose(1, 2).to(k.dtype)

    return dq.transpose(1, 2).to(q.dtype), fold(dk), fold(dv), ds.sum(-1), -ds.sum(-2)
