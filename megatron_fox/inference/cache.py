"""Decoding state of the FoX model: per layer the keys and values attention still needs,
their forget-gate prefix sums, and what the KV-shift needs of the previous token.

Keys leave the cache when ACP has pruned them for every head and every sequence of the
batch (`megatron_fox.ops.evictable_prefix`): with a long context and fast-forgetting heads
the cache stops growing.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..ops import evictable_prefix


class LayerCache:
    """One layer's cache. k, v [B, N, groups, d]; c [B, heads, N] float32 prefix sums of the
    cached keys; c_last [B, heads] at the newest token; prev_kv the newest raw k, v
    [1, B, groups, d] (before shift and norm); delta [heads] the eviction threshold (None:
    keep every key)."""

    def __init__(self, delta: Optional[torch.Tensor] = None):
        self.k = self.v = self.c = self.c_last = None
        self.prev_kv = None
        self.delta = delta
        self.evicted = 0

    @property
    def length(self) -> int:
        """Keys held now."""
        return 0 if self.k is None else self.k.shape[1]

    def append(self, k: torch.Tensor, v: torch.Tensor, c: torch.Tensor) -> None:
        """k, v [B, n, groups, d]; c [B, heads, n]."""
        if self.k is None:
            self.k, self.v, self.c = k.contiguous(), v.contiguous(), c.contiguous()
        else:
            self.k = torch.cat([self.k, k], dim=1)
            self.v = torch.cat([self.v, v], dim=1)
            self.c = torch.cat([self.c, c], dim=-1)

    def evict_pruned(self) -> int:
        """Drop the leading keys that every head has pruned for good; returns how many."""
        if self.delta is None or self.length == 0:
            return 0
        n = evictable_prefix(self.c_last, self.c, self.delta)
        n = min(n, self.length - 1)  # the newest key always stays (c_last - c_last = 0 >= delta)
        if n:
            self.k, self.v, self.c = self.k[:, n:], self.v[:, n:], self.c[..., n:]
            self.evicted += n
        return n


class InferenceCache:
    """Caches of all layers of one model for one batch of sequences.

    eviction_thresholds: per layer [heads] tensors (None: no eviction).
    """

    def __init__(self, num_layers: int, eviction_thresholds: Optional[list] = None):
        thresholds = eviction_thresholds or [None] * num_layers
        if len(thresholds) != num_layers:
            raise ValueError(f"eviction_thresholds must have one entry per layer ({num_layers}), "
                             f"got {len(thresholds)}")
        self.layers = [LayerCache(d) for d in thresholds]
        self.tokens = 0

    def cached_keys(self) -> list[int]:
        """Keys held per layer."""
        return [c.length for c in self.layers]

    def evicted_keys(self) -> list[int]:
        """Keys evicted so far per layer."""
        return [c.evicted for c in self.layers]
