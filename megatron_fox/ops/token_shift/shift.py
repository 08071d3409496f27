"""KV-shift and per-head RMS norm of FoX-Pro, plain PyTorch (torch.compile fuses them).

Layout is Megatron's: [seq, batch, heads, head_dim].
"""

from __future__ import annotations

from typing import Optional

import torch

from .._memo import memo_on_first_tensor


def token_shift(x: torch.Tensor, alpha_logit: torch.Tensor, doc_start: Optional[torch.Tensor] = None,
                prev0: Optional[torch.Tensor] = None) -> torch.Tensor:
    """out_t = a_t * x_{t-1} + (1 - a_t) * x_t with a_t = sigmoid(alpha_logit_t), per head.

    x [s, b, h, d]; alpha_logit [s, b, h]; doc_start [s, b] bool, True where a document
    starts (x_{t-1} counts as zero there); prev0 [n, b, h, d]: the token before each of n
    equal chunks of x (s/n rows each; under context parallelism a chunk's predecessor lives
    elsewhere), zero if None. Returns [s, b, h, d] in x.dtype.
    """
    if x.dim() != 4 or alpha_logit.shape != x.shape[:3]:
        raise ValueError(f"token_shift: x must be [s, b, h, d] and alpha_logit [s, b, h], "
                         f"got {tuple(x.shape)} and {tuple(alpha_logit.shape)}")
    n = 1 if prev0 is None else prev0.shape[0]
    if prev0 is not None and (prev0.shape[1:] != x.shape[1:] or x.shape[0] % n):
        raise ValueError(f"prev0: expected [n, b, h, d] with n dividing {x.shape[0]} and [b, h, d] = "
                         f"{tuple(x.shape[1:])}, got {tuple(prev0.shape)}")
    chunks = x.view(n, x.shape[0] // n, *x.shape[1:])
    first = torch.zeros_like(chunks[:, :1]) if prev0 is None else prev0[:, None].to(x.dtype)
    prev = torch.cat([first, chunks[:, :-1]], dim=1).view_as(x)
    if doc_start is not None:
        prev = prev.masked_fill(doc_start[:, :, None, None], 0.0)
    a = torch.sigmoid(alpha_logit.float())[..., None]
    return (x.float() + a * (prev.float() - x.float())).to(x.dtype)


@memo_on_first_tensor
def document_start_mask(cu_seqlens: torch.Tensor, seq: int, batch: int) -> torch.Tensor:
    """[seq, batch] bool, True where a document starts; cu_seqlens index the batch-major
    flattening of a [batch, seq] micro-batch (the token_shift doc_start argument)."""
    mask = torch.zeros(batch * seq, dtype=torch.bool, device=cu_seqlens.device)
    mask.index_fill_(0, cu_seqlens[:-1].long(), True)  # a Python scalar: no host-to-device copy (sync)
    return mask.view(batch, seq).t()


def head_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMS norm over head_dim with a weight per head and channel.

    x [..., h, d]; weight [h, d]. Returns x / sqrt(mean(x^2) + eps) * weight in x.dtype.
    """
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (y * weight.float()).to(x.dtype)
