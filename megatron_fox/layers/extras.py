"""The FoX-Pro elementwise work around the attention op, as two functions that
torch.compile fuses on CUDA (eager they are ~20 kernels a layer, most of a step's time).

prepare: the fused projection's split, KV-shift, QK-norm, the forget and output gates
         ->  the op's q, k, v, log f and the output-gate logits.
finish:  per-head output norm and output gate  ->  the input of the output projection.
Layout [seq, batch, heads, head_dim] throughout.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ..ops.token_shift import head_rms_norm, token_shift
from .qkv_layout import QkvLayout, split_fused


def prepare(mixed, layout: QkvLayout, fgate_bias, doc_start: Optional[torch.Tensor], q_norm: Optional[torch.Tensor],
            k_norm: Optional[torch.Tensor], eps: float, prev_kv=None):
    """mixed [s, b, groups * width]: linear_qkv's output in `layout`; fgate_bias [h]; doc_start
    [s, b] bool (None: no document starts); q_norm, k_norm [h, d] / [g, d] (None: no QK-norm);
    prev_kv: the raw k, v [n, b, g, d] of the token before each of n equal chunks of these
    rows (decoding: n = 1, the token before the new ones; context parallel: n = 2, each
    chunk's predecessor from `parallel.chunk_boundary_rows`), None at a sequence start.
    -> q [s, b, h, d], k, v [s, b, g, d], log f [s, b, h] float32 (None without the forget
    gate), each the transpose of a contiguous [b, s, ...] tensor (the op's batch-major layout:
    packing the batch is then a view); the output gate's logits [s, b, h, d] (None without it).

    One function from mixed on, so that compiled its backward writes d mixed in one pass
    (split apart, autograd would concatenate the parts' gradients in a kernel of its own)."""
    q, k, v, fgate, ogate, shift = split_fused(mixed, layout)
    if shift is not None:
        prev_k, prev_v = (None, None) if prev_kv is None else prev_kv
        k = token_shift(k, shift[..., 0], doc_start, prev_k)
        v = token_shift(v, shift[..., 1], doc_start, prev_v)
    if q_norm is not None:
        q = head_rms_norm(q, q_norm, eps)
        k = head_rms_norm(k, k_norm, eps)
    log_f = None if fgate is None else _batch_major(F.logsigmoid(fgate.float() + fgate_bias.float()))
    # the output gate's logits as a tensor of their own, not a view of mixed: their gradient
    # then enters this function's backward (a view's would be added to d mixed apart); the
    # sigmoid stays in `finish`
    ogate = None if ogate is None else ogate.clone(memory_format=torch.contiguous_format)
    return _batch_major(q), _batch_major(k), _batch_major(v), log_f, ogate


def _batch_major(t):
    return t.transpose(0, 1).contiguous().transpose(0, 1)


def finish(out, ogate: Optional[torch.Tensor], output_norm: Optional[torch.Tensor], eps: float):
    """out [s, b, h, d]; ogate [s, b, h, d] logits (None: no gate); output_norm [h, d]
    (None: no norm). -> [s, b, h * d] contiguous, in out.dtype."""
    if output_norm is not None:
        out = head_rms_norm(out, output_norm, eps)
    if ogate is not None:
        out = out * torch.sigmoid(ogate.float()).to(out.dtype)
    return out.contiguous().reshape(*out.shape[:2], -1)


_compiled: dict = {}


def fused(fn, enabled: bool, device: torch.device):
    """fn compiled by torch.compile (one compilation per function) when enabled and on
    CUDA; fn itself otherwise (CPU runs stay plain PyTorch).

    `prepare` compiles with its backward recomputing it from its inputs (activation
    checkpointing, which the compiled backward fuses): left to choose, the compiler saved the
    KV-shift's float32 differences (4 [s, b, h] bf16-sizes a layer) where mixed, whose
    storage the saved views keep alive anyway, is all the backward needs."""
    if not enabled or device.type != "cuda":
        return fn
    if fn not in _compiled:
        body = functools.partial(checkpoint, fn, use_reentrant=False) if fn is prepare else fn
        _compiled[fn] = _aligned_args(torch.compile(body, dynamic=False))
    return _compiled[fn]


def _aligned_args(compiled):
    """compiled, called with every tensor argument 16-byte aligned and none a Parameter.

    Inductor's kernels assume Parameters are aligned (it checks and copies only other
    inputs), but DeepSpeed's ZeRO packs parameters into flat buffers, where a
    [heads]-sized one shifts the next off alignment ("CUDA error: misaligned address" on an
    H200): those go as aligned clones. The others go as views, so that each argument has
    one type in every layer (a Parameter in one call and a Tensor in the next would compile
    the function again, up to torch.compile's limit, then run it eagerly). Gradients reach
    the parameters through both."""

    def call(*args, **kwargs):
        return compiled(*[_aligned_tensor(a) for a in args], **kwargs)

    return call


def _aligned_tensor(a):
    if not isinstance(a, torch.Tensor):
        return a
    if a.data_ptr() % 16:
        return a.clone()
    return a.view_as(a) if isinstance(a, torch.nn.Parameter) else a
