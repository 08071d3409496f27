"""The FoX-Pro elementwise work around the attention op, as two functions that
torch.compile fuses on CUDA (eager they are ~20 kernels a layer, most of a step's time).

prepare: KV-shift, QK-norm and the forget gate  ->  the op's q, k, v, log f.
finish:  per-head output norm and output gate  ->  the input of the output projection.
Layout [seq, batch, heads, head_dim] throughout.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ..ops.token_shift import head_rms_norm, token_shift


def prepare(q, k, v, fgate, fgate_bias, shift: Optional[torch.Tensor], doc_start: Optional[torch.Tensor],
            q_norm: Optional[torch.Tensor], k_norm: Optional[torch.Tensor], eps: float, prev_kv=None):
    """q [s, b, h, d]; k, v [s, b, g, d]; fgate [s, b, h] logits; fgate_bias [h]; shift
    [s, b, g, 2] logits of the k and v shift gates (None: no shift); doc_start [s, b] bool;
    q_norm, k_norm [h, d] / [g, d] (None: no QK-norm); prev_kv: the raw k, v [1, b, g, d] of
    the token before these (decoding), None at a sequence start.
    -> q, k, v, log f [s, b, h] float32 (None without the forget gate: fgate None)."""
    if shift is not None:
        prev_k, prev_v = (None, None) if prev_kv is None else prev_kv
        k = token_shift(k, shift[..., 0], doc_start, prev_k)
        v = token_shift(v, shift[..., 1], doc_start, prev_v)
    if q_norm is not None:
        q = head_rms_norm(q, q_norm, eps)
        k = head_rms_norm(k, k_norm, eps)
    if fgate is None:
        return q, k, v, None
    return q, k, v, F.logsigmoid(fgate.float() + fgate_bias.float())


def finish(out, ogate: Optional[torch.Tensor], output_norm: Optional[torch.Tensor], eps: float):
    """out [s, b, h, d]; ogate [s, b, h, d] logits (None: no gate); output_norm [h, d]
    (None: no norm). -> [s, b, h * d] in out.dtype."""
    if output_norm is not None:
        out = head_rms_norm(out, output_norm, eps)
    if ogate is not None:
        out = out * torch.sigmoid(ogate.float()).to(out.dtype)
    return out.reshape(*out.shape[:2], -1)


_compiled: dict = {}


def fused(fn, enabled: bool, device: torch.device):
    """fn compiled by torch.compile (one compilation per function) when enabled and on
    CUDA; fn itself otherwise (CPU runs stay plain PyTorch)."""
    if not enabled or device.type != "cuda":
        return fn
    if fn not in _compiled:
        _compiled[fn] = _aligned_args(torch.compile(fn, dynamic=False))
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
