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
    keep every key).

    Storage grows by doubling and eviction only moves a start offset, so appending a token
    costs O(1) amortised copies instead of a copy of the whole cache.
    """

    def __init__(self, delta: Optional[torch.Tensor] = None):
        self._k = self._v = self._c = None
        self._start = self._end = 0
        self.c_last = None
        self.prev_kv = None
        self.delta = delta
        self.evicted = 0

    @property
    def length(self) -> int:
        """Keys held now."""
        return self._end - self._start

    @property
    def k(self) -> torch.Tensor:
        return self._k[:, self._start:self._end]

    @property
    def v(self) -> torch.Tensor:
        return self._v[:, self._start:self._end]

    @property
    def c(self) -> torch.Tensor:
        return self._c[..., self._start:self._end]

    def append(self, k: torch.Tensor, v: torch.Tensor, c: torch.Tensor) -> None:
        """k, v [B, n, groups, d]; c [B, heads, n]."""
        n = k.shape[1]
        if self._k is None:
            cap = max(16, 2 * n)
            self._k = k.new_empty(k.shape[0], cap, *k.shape[2:])
            self._v = v.new_empty(v.shape[0], cap, *v.shape[2:])
            self._c = c.new_empty(*c.shape[:2], cap)
        elif self._end + n > self._k.shape[1]:  # full: move the live keys into a buffer twice their size
            live = self.length
            cap = 2 * (live + n)
            k_old, v_old, c_old = self.k, self.v, self.c
            self._k = k_old.new_empty(k_old.shape[0], cap, *k_old.shape[2:])
            self._v = v_old.new_empty(v_old.shape[0], cap, *v_old.shape[2:])
            self._c = c_old.new_empty(*c_old.shape[:2], cap)
            self._k[:, :live], self._v[:, :live], self._c[..., :live] = k_old, v_old, c_old
            self._start, self._end = 0, live
        self._k[:, self._end:self._end + n] = k
        self._v[:, self._end:self._end + n] = v
        self._c[..., self._end:self._end + n] = c
        self._end += n

    def evict_pruned(self) -> int:
        """Drop the leading keys that every head has pruned for good; returns how many."""
        if self.delta is None or self.length == 0:
            return 0
        n = evictable_prefix(self.c_last, self.c, self.delta)
        n = min(n, self.length - 1)  # the newest key always stays (c_last - c_last = 0 >= delta)
        self._start += n
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
