"""Input checks, forget-gate prefix sums, document maps and the ACP threshold.

Shared by the Triton op and the plain-PyTorch reference so both see the same
definitions. Shapes follow the op: q [B, T, H, D], k/v [B, T, Hkv, D],
log_fgate [B, T, H] (float32, <= 0).
"""

from __future__ import annotations

import contextlib
import math
import os
from typing import Optional, Union

import torch

from .._memo import memo_on_first_tensor

LOG2E = 1.4426950408889634

_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

# Data-dependent checks (log_fgate <= 0, cu_seqlens monotone) need one device->host
# sync. Training code may switch them off once the inputs are known to be sane.
_DATA_CHECKS = os.environ.get("MEGATRON_FOX_SKIP_DATA_CHECKS", "0") != "1"


def set_data_checks(enabled: bool) -> None:
    """Enable or disable the checks that read tensor values (one host sync per call)."""
    global _DATA_CHECKS
    _DATA_CHECKS = bool(enabled)


@contextlib.contextmanager
def no_data_checks():
    """Skip the value checks inside the block (for callers that build valid inputs)."""
    global _DATA_CHECKS
    saved, _DATA_CHECKS = _DATA_CHECKS, False
    try:
        yield
    finally:
        _DATA_CHECKS = saved


class AttentionStats:
    """What ACP skipped in one call.

    skipped_fraction: fraction of causal (within-document) attention pairs, hence of
        attention FLOPs, that the forward pass did not compute (0-dim tensor).
    skipped_fraction_per_head: the same per query head, [H].
    query_block_start: [B, H, num_query_blocks] index of the first key computed for
        each query block (a multiple of the key block size).
    block_m, block_n: forward tile sizes the boundary refers to.
    backward_skipped_fraction: the fraction the backward kernels skip; with
        backward_pruning="lse" (and for exact FoX's blocks whose weights are zero in
        float32) found from the rows' lse, usually above skipped_fraction; else the same.

    The tensors are computed on first access (`compute()` returns the first three), so a
    training step that reads them only at its logging interval launches no extra kernels.
    """

    def __init__(self, compute, block_m: int, block_n: int, backward_compute=None):
        self._compute, self._values = compute, None
        self._backward_compute, self._backward = backward_compute, None
        self.block_m, self.block_n = block_m, block_n

    @classmethod
    def of(cls, skipped_fraction, skipped_fraction_per_head, query_block_start, block_m, block_n):
        """Stats from values already computed."""
        values = (skipped_fraction, skipped_fraction_per_head, query_block_start)
        return cls(lambda: values, block_m, block_n)

    def _get(self):
        if self._values is None:
            self._values, self._compute = self._compute(), None
        return self._values

    @property
    def skipped_fraction(self) -> torch.Tensor:
        return self._get()[0]

    @property
    def skipped_fraction_per_head(self) -> torch.Tensor:
        return self._get()[1]

    @property
    def query_block_start(self) -> torch.Tensor:
        return self._get()[2]

    @property
    def backward_skipped_fraction(self) -> torch.Tensor:
        if self._backward_compute is None:
            return self.skipped_fraction
        if self._backward is None:
            self._backward = self._backward_compute()
        return self._backward


SUPPORTED_HEAD_DIMS = (16, 32, 64, 128)


def check_inputs(q, k, v, log_fgate, sm_scale, log_eps, logit_bound, cu_seqlens, cu_seqlens_total=None,
                 per_sample=False):
    """Validate the op's arguments; raise ValueError naming the bad one. cu_seqlens must end
    at cu_seqlens_total (default: the sequence length of q; the global length under context
    parallelism). per_sample: cu_seqlens may also cover a batch > 1, as offsets over its
    batch * seq tokens in batch-major order, holding every sample's start.

    Returns (sm_scale as float, logit_bound as None | float | tensor[H]).
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D [batch, seq, heads, head_dim], got shape {tuple(t.shape)}")
        if t.dtype not in _SUPPORTED_DTYPES:
            raise ValueError(f"{name} dtype must be one of float16, bfloat16, float32, got {t.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share a dtype, got q={q.dtype} k={k.dtype} v={v.dtype}")
    if not (q.device == k.device == v.device == log_fgate.device):
        raise ValueError("q, k, v, log_fgate must be on one device")
    B, T, H, D = q.shape
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got k={tuple(k.shape)} v={tuple(v.shape)}")
    if k.shape[0] != B or k.shape[1] != T or k.shape[3] != D:
        raise ValueError(
            f"k must be [batch, seq, kv_heads, head_dim] matching q {tuple(q.shape)} in batch, seq and head_dim, "
            f"got {tuple(k.shape)}"
        )
    if D not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"head_dim of q, k, v must be one of {SUPPORTED_HEAD_DIMS} (Triton tiles), got {D}")
    Hkv = k.shape[2]
    if Hkv == 0 or H % Hkv != 0:
        raise ValueError(f"q heads ({H}) must be a multiple of k/v heads ({Hkv})")
    if T == 0 or B == 0:
        raise ValueError(f"q must have non-empty batch and seq, got shape {tuple(q.shape)}")
    if not isinstance(log_fgate, torch.Tensor) or log_fgate.dim() != 3 or tuple(log_fgate.shape) != (B, T, H):
        shape = tuple(log_fgate.shape) if isinstance(log_fgate, torch.Tensor) else type(log_fgate).__name__
        raise ValueError(f"log_fgate must be [batch, seq, heads] = {(B, T, H)}, got {shape}")
    if log_fgate.dtype != torch.float32:
        raise ValueError(f"log_fgate must be float32, got {log_fgate.dtype}")
    if sm_scale is None:
        sm_scale = 1.0 / math.sqrt(D)
    sm_scale = float(sm_scale)
    if not math.isfinite(sm_scale) or sm_scale <= 0:
        raise ValueError(f"sm_scale must be a positive finite number, got {sm_scale}")
    if log_eps is not None:
        if not isinstance(log_eps, (int, float)) or not math.isfinite(log_eps) or log_eps > 0:
            raise ValueError(f"log_eps must be None or a finite number <= 0, got {log_eps!r}")
    if logit_bound is not None:
        if isinstance(logit_bound, torch.Tensor):
            if logit_bound.shape != (H,):
                raise ValueError(f"logit_bound tensor must have shape [heads] = ({H},), got {tuple(logit_bound.shape)}")
            logit_bound = logit_bound.detach().to(device=q.device, dtype=torch.float32)
        elif isinstance(logit_bound, (int, float)):
            if not math.isfinite(logit_bound) or logit_bound < 0:
                raise ValueError(f"logit_bound must be a finite number >= 0, got {logit_bound}")
            logit_bound = float(logit_bound)
        else:
            raise ValueError(f"logit_bound must be None, a float or a [heads] tensor, got {type(logit_bound).__name__}")
    if cu_seqlens is not None:
        if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
            raise ValueError("cu_seqlens must be a 1-D tensor of document offsets [0, ..., seq]")
        if cu_seqlens.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"cu_seqlens must be int32 (or int64), got {cu_seqlens.dtype}")
        if B != 1 and not per_sample:
            raise ValueError(f"cu_seqlens needs packed input with batch 1, got batch {B}")
    if _DATA_CHECKS:
        total = (B * T if per_sample else T) if cu_seqlens_total is None else cu_seqlens_total
        _check_values(log_fgate, logit_bound, cu_seqlens, total, total // B if per_sample and B > 1 else None)
    return sm_scale, logit_bound


def _check_values(log_fgate, logit_bound, cu_seqlens, T, sample_len=None):
    bad = [(log_fgate > 0).any() | ~torch.isfinite(log_fgate).all()]
    if isinstance(logit_bound, torch.Tensor):
        bad.append((logit_bound < 0).any() | ~torch.isfinite(logit_bound).all())
    if cu_seqlens is not None:
        bad += _offset_flags(cu_seqlens.to(log_fgate.device), T, sample_len)
    flags = torch.stack(bad).tolist()  # one sync for all checks
    if flags[0]:
        raise ValueError("log_fgate must be finite and <= 0 (it is log of a forget gate in (0, 1])")
    if isinstance(logit_bound, torch.Tensor) and flags[1]:
        raise ValueError("logit_bound must be finite and >= 0")
    if cu_seqlens is not None:
        _raise_offset_errors(flags[-2:] if sample_len is not None else flags[-1:], T, sample_len)


def _offset_flags(cs: torch.Tensor, T: int, sample_len: Optional[int]) -> list:
    """0-dim bool tensors, True where bad: the offsets' ends and order; with sample_len, whether
    a sample's start (a multiple of it) is missing."""
    bad = [(cs[0] != 0) | (cs[-1] != T) | (cs[1:] <= cs[:-1]).any()]
    if sample_len is not None:
        starts = torch.arange(0, T, sample_len, device=cs.device, dtype=cs.dtype)
        bad.append(~torch.isin(starts, cs).all())
    return bad


def _raise_offset_errors(flags: list, T: int, sample_len: Optional[int]) -> None:
    if flags[0]:
        total = "batch * seq" if sample_len is not None else "seq"
        raise ValueError(f"cu_seqlens must start at 0, end at {total} ({T}) and be strictly increasing")
    if sample_len is not None and flags[1]:
        raise ValueError(f"cu_seqlens must hold every sample's start (the multiples of seq = {sample_len})")


def check_batch_offsets(cu_seqlens: torch.Tensor, B: int, T: int) -> None:
    """ValueError naming cu_seqlens unless it holds batch-major offsets over B * T tokens
    (starting at 0, strictly increasing, every sample's start among them); one host sync,
    none while data checks are off (`set_data_checks`)."""
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"cu_seqlens must be 1-D with at least 2 entries, got shape {tuple(cu_seqlens.shape)}")
    if _DATA_CHECKS:
        sample_len = T if B > 1 else None
        _raise_offset_errors(torch.stack(_offset_flags(cu_seqlens, B * T, sample_len)).tolist(), B * T, sample_len)


def doc_batch_stride(doc_map: Optional[torch.Tensor], B: int) -> int:
    """The kernels' batch stride of a document map (doc_start or doc_end): 0 for one map [T]
    or [1, T] shared by the B batch rows (a packed row), T for a map per row [B, T]
    (contiguous). ValueError for any other row count: the kernels would read past the map."""
    if doc_map is None or doc_map.dim() == 1 or doc_map.shape[0] == 1:
        return 0
    if doc_map.shape[0] != B:
        raise ValueError(f"document maps [B, T] need one row per batch row ({B}) or one for all, got shape "
                         f"{tuple(doc_map.shape)}")
    if doc_map.stride(-1) != 1 or doc_map.stride(0) != doc_map.shape[-1]:
        raise ValueError(f"document maps [B, T] must be contiguous, got strides {doc_map.stride()}")
    return doc_map.shape[-1]


@memo_on_first_tensor
def document_maps(cu_seqlens: Optional[torch.Tensor], T: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token document start and (exclusive) end, int32 [T] each."""
    if cu_seqlens is None:
        return (torch.zeros(T, dtype=torch.int32, device=device),
                torch.full((T,), T, dtype=torch.int32, device=device))
    cs = cu_seqlens.to(device=device, dtype=torch.int64)
    pos = torch.arange(T, device=device)
    doc = torch.searchsorted(cs, pos, right=True) - 1
    return cs[doc].to(torch.int32), cs[doc + 1].to(torch.int32)


@memo_on_first_tensor
def row_document_maps(cu_seqlens: torch.Tensor, B: int, T: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Each token's document start and (exclusive) end within its row, int32 [B, T] each, from
    offsets over the B * T tokens of a batch-major packed batch (every row starts a document)."""
    start, end = document_maps(cu_seqlens, B * T, device)
    base = (torch.arange(B, device=device, dtype=torch.int32) * T)[:, None]
    return (start.view(B, T) - base).contiguous(), (end.view(B, T) - base).contiguous()


def input_document_maps(cu_seqlens: Optional[torch.Tensor], B: int, T: int,
                        device) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """The op's document maps (start, end) for cu_seqlens over q's B rows of T tokens: None
    without documents, [T] each for one packed row (B = 1), [B, T] each (`row_document_maps`)
    for offsets over the batch-major B * T tokens."""
    if cu_seqlens is None:
        return None, None
    if B > 1:
        return row_document_maps(cu_seqlens, B, T, device)
    return document_maps(cu_seqlens, T, device)


def forget_prefix_sums(log_fgate: torch.Tensor, doc_start: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """c = cumsum(log f) along the sequence, head-major [B, H, T] float32.

    doc_start: each token's document start, [T] or [B, T] (per row), or None.
    Returns (c_global, c_doc): c_global runs over the whole packed row and is used for
    block pruning decisions (differences of c_global bound the within-document ones);
    c_doc restarts at each document so its values stay small (fp32 precision) and is
    what the kernels add to the logits. Without documents both are the same tensor.
    """
    c_global = torch.cumsum(log_fgate.transpose(1, 2).float(), dim=-1).contiguous()
    if doc_start is None:
        return c_global, c_global
    start = doc_start.long()
    # c_doc_i = c_i - c_{start-1}; at a document start it equals log f_start.
    if start.dim() == 1:
        before = c_global[..., (start - 1).clamp_min(0)]
    else:  # [B, T]: each row its own documents; one index over the rows (its backward, unlike
        # gather's scatter_add, sums in a fixed order on CUDA: gradients repeat bit for bit)
        B, H, T = c_global.shape
        rows = (start - 1).clamp_min(0) + torch.arange(B, device=start.device)[:, None] * T
        before = c_global.transpose(1, 2).reshape(B * T, H)[rows.reshape(-1)].view(B, T, H).transpose(1, 2)
        start = start[:, None, :]
    before = torch.where(start > 0, before, torch.zeros_like(c_global))
    return c_global, (c_global - before).contiguous()


def segmented_reverse_cumsum(x: torch.Tensor, doc_end: Optional[torch.Tensor]) -> torch.Tensor:
    """y_t = sum_{t <= s < doc_end(t)} x_s along the last dim of x [..., T]; doc_end [T], or
    [B, T] (a map per batch row) for x [B, H, T]."""
    rc = torch.flip(torch.cumsum(torch.flip(x, dims=[-1]), dim=-1), dims=[-1])
    if doc_end is None:
        return rc
    T = x.shape[-1]
    end = doc_end.long()
    if end.dim() == 1:
        after = rc[..., end.clamp_max(T - 1)]
    else:  # [B, T]: each batch row its own documents (x [B, H, T])
        end = end[:, None, :]
        after = torch.gather(rc, -1, end.clamp_max(T - 1).expand(rc.shape))
    return rc - torch.where(end < T, after, torch.zeros_like(rc))


def check_backward_pruning(backward_pruning: str) -> None:
    """The op's backward_pruning argument: "bound" or "lse" (ValueError naming it otherwise)."""
    if backward_pruning not in ("bound", "lse"):
        raise ValueError(f"backward_pruning must be 'bound' or 'lse', got {backward_pruning!r}")


def logit_bound_per_head(q, k, sm_scale: float, logit_bound: Union[None, float, torch.Tensor],
                         reduce_max=None, max_norm=None) -> torch.Tensor:
    """U[b, h] >= max |sm_scale * q_i . k_j| over the (batch, head), float32 [B, H].

    Given: broadcast the caller's bound. Else from the data, by Cauchy-Schwarz:
    sm_scale * max_i ||q_i|| * max_j ||k_j|| (k of the head's key/value group).
    reduce_max: applied in place to the norm maxima ([B, H] and [B, Hkv]) before they are
    combined, e.g. a max all-reduce when q and k are parts of a longer sequence.
    max_norm: x [B, T, H, D] -> max_t ||x[b, t, h]|| [B, H] float32 (a kernel; default torch).
    """
    B, T, H, _ = q.shape
    if logit_bound is not None:
        if isinstance(logit_bound, torch.Tensor):
            return logit_bound.float().to(q.device).view(1, H).expand(B, H)
        return torch.full((B, H), logit_bound, dtype=torch.float32, device=q.device)
    group = H // k.shape[2]
    if max_norm is None:
        def max_norm(x):
            return torch.linalg.vector_norm(x, dim=-1, dtype=torch.float32).amax(dim=1)
    qn = max_norm(q)  # [B, H]
    kn = max_norm(k)  # [B, Hkv]
    if reduce_max is not None:
        reduce_max(qn)
        reduce_max(kn)
    return sm_scale * qn * kn.repeat_interleave(group, dim=1)


def pruning_threshold(U: torch.Tensor, seq_len: int, log_eps: float) -> torch.Tensor:
    """ACP threshold delta = -(2U + log L) + log_eps, [B, H].

    A pair with c_i - c_j < delta has softmax weight <= exp(2U + delta) = eps / L times
    the diagonal's; at most L such pairs per row, so they weigh <= eps together.
    """
    return -(2.0 * U + math.log(seq_len)) + log_eps
