"""One decoding step of forgetting attention over a key/value cache, and the exact
ACP eviction rule for that cache (plain PyTorch: a decode step is memory-bound).

For the new query at position t with prefix sum c_t, cached key j has logit
    s_tj = sm_scale q_t.k_j + c_t - c_j.
Eviction: c only falls, so c_t' - c_j <= c_t - c_j for every later t'. A key with
c_t - c_j < delta (delta = -(2U + log L) + log_eps, L the longest length the cache will
reach) is pruned for this query and for every later one: it can leave the cache for good,
and each row loses at most exp(log_eps) softmax weight in total, as in training.
"""

from __future__ import annotations

from typing import Optional

import torch


def forgetting_attention_decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, c_q: torch.Tensor,
                                c_k: torch.Tensor, *, sm_scale: Optional[float] = None,
                                keep: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Attention of one new query per sequence over its cached keys.

    q [B, H, D]; k, v [B, N, Hkv, D] (the cache, the new token's key included); c_q [B, H]
    float32 prefix sum at the query; c_k [B, H, N] float32 at the keys; keep [B, N] in [0, 1]
    multiplies the weights (learned context pruning, `ops.context_pruning`; 0 removes a key).
    Returns o [B, H, D] in q.dtype (float32 softmax).
    """
    B, H, D = q.shape
    if k.dim() != 4 or k.shape[0] != B or k.shape[3] != D or k.shape != v.shape or H % k.shape[2]:
        raise ValueError(f"k, v must be [batch, cached, kv_heads, head_dim] matching q {tuple(q.shape)}, "
                         f"got {tuple(k.shape)} and {tuple(v.shape)}")
    if c_q.shape != (B, H) or c_k.shape != (B, H, k.shape[1]):
        raise ValueError(f"c_q must be [batch, heads] and c_k [batch, heads, cached], got {tuple(c_q.shape)} "
                         f"and {tuple(c_k.shape)}")
    group = H // k.shape[2]
    scale = D ** -0.5 if sm_scale is None else sm_scale
    kf = k.float().repeat_interleave(group, dim=2)  # [B, N, H, D]
    vf = v.float().repeat_interleave(group, dim=2)
    s = scale * torch.einsum("bhd,bnhd->bhn", q.float(), kf) + (c_q[..., None] - c_k)
    if keep is not None:
        if keep.shape != (B, k.shape[1]):
            raise ValueError(f"keep must be [batch, cached] = ({B}, {k.shape[1]}), got {tuple(keep.shape)}")
        s = s + torch.log(keep.float())[:, None, :]  # log 0 = -inf: weight 0
    p = torch.softmax(s, dim=-1)
    return torch.einsum("bhn,bnhd->bhd", p, vf).to(q.dtype)


def evictable_prefix(c_q: torch.Tensor, c_k: torch.Tensor, delta: torch.Tensor) -> int:
    """How many leading cached keys every head of every sequence has pruned for good.

    c_q [B, H] at the newest query; c_k [B, H, N] at the cached keys (non-increasing
    along N); delta [H] or [B, H] thresholds. One host sync.
    """
    if c_k.shape[-1] == 0:
        return 0
    pruned = (c_q[..., None] - c_k) < delta.expand_as(c_q)[..., None]  # a prefix along N
    return int(pruned.sum(-1).amin().item())
