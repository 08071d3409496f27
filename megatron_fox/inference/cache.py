"""Decoding state of the FoX model: per layer the keys and values attention still needs,
their forget-gate prefix sums, and what the KV-shift needs of the previous token.

Keys leave the cache when ACP has pruned them for every head and every sequence of the
batch (`megatron_fox.ops.evictable_prefix`): with a long context and fast-forgetting heads
the cache stops growing. With learned context pruning (`layers.context_pruning`) the cache
also holds each key's interaction key and keep weight (the product of the later tokens'
keep decisions); keys whose weight is 0 in every sequence leave it too.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..ops import evictable_prefix


_SEQ_DIM = {"_k": 1, "_v": 1, "_c": 2, "_kint": 1, "_keep": 1}  # the key axis of each stored tensor


class LayerCache:
    """One layer's cache. k, v [B, N, groups, d]; c [B, heads, N] float32 prefix sums of the
    cached keys; c_last [B, heads] at the newest token; prev_kv the newest raw k, v
    [1, B, groups, d] (before shift and norm); delta [heads] the eviction threshold (None:
    keep every key).

    Storage grows by doubling and eviction only moves a start offset, so appending a token
    costs O(1) amortised copies instead of a copy of the whole cache. With learned context
    pruning also k_int [B, N, r] and keep [B, N] float32; dropped keys are packed out once
    they are a quarter of the cache (until then their keep weight 0 hides them), looked for
    each time the cache has grown by an eighth (each look waits for the device).
    """

    def __init__(self, delta: Optional[torch.Tensor] = None):
        self._k = self._v = self._c = self._kint = self._keep = None
        self._start = self._end = 0
        self.c_last = None
        self.prev_kv = None
        self.delta = delta
        self.evicted = 0
        self.dropped = 0
        self._drop_check = 0  # length at which drop_unkept looks next

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

    @property
    def k_int(self) -> Optional[torch.Tensor]:
        return None if self._kint is None else self._kint[:, self._start:self._end]

    @property
    def keep(self) -> Optional[torch.Tensor]:
        return None if self._keep is None else self._keep[:, self._start:self._end]

    def _live(self) -> dict:
        """The live part of every stored tensor, by its storage attribute."""
        out = {"_k": self.k, "_v": self.v, "_c": self.c}
        if self._kint is not None:
            out.update(_kint=self.k_int, _keep=self.keep)
        return out

    def _restore(self, live: dict, cap: int) -> None:
        """New storage of `cap` keys holding `live` (as from _live) at its start."""
        n = live["_k"].shape[1]
        for name, t in live.items():
            d = _SEQ_DIM[name]
            shape = list(t.shape)
            shape[d] = cap
            store = t.new_empty(shape)
            store.narrow(d, 0, n).copy_(t)
            setattr(self, name, store)
        self._start, self._end = 0, n

    def append(self, k: torch.Tensor, v: torch.Tensor, c: torch.Tensor, k_int: Optional[torch.Tensor] = None,
               keep: Optional[torch.Tensor] = None) -> None:
        """k, v [B, n, groups, d]; c [B, heads, n]; with learned context pruning k_int [B, n, r]
        and keep [B, n]."""
        n = k.shape[1]
        new = {"_k": k, "_v": v, "_c": c}
        if k_int is not None:
            new.update(_kint=k_int, _keep=keep.float())
        if self._k is None:
            self._restore({name: t.narrow(_SEQ_DIM[name], 0, 0) for name, t in new.items()}, max(16, 2 * n))
        elif self._end + n > self._k.shape[1]:  # full: move the live keys into a buffer twice their size
            self._restore(self._live(), 2 * (self.length + n))
        for name, t in new.items():
            getattr(self, name).narrow(_SEQ_DIM[name], self._end, n).copy_(t)
        self._end += n

    def drop_unkept(self) -> int:
        """Learned context pruning: pack out the keys whose keep weight is 0 in every
        sequence, once they are at least a quarter of the cache; returns how many left."""
        if self._keep is None or self.length == 0 or self.length < self._drop_check:
            return 0
        self._drop_check = self.length + max(1, self.length // 8)
        alive = (self.keep > 0).any(0)  # [N]
        dead = self.length - int(alive.sum())
        if dead == 0 or 4 * dead < self.length:
            return 0
        live = {name: t.index_select(_SEQ_DIM[name], alive.nonzero()[:, 0]) for name, t in self._live().items()}
        self._restore(live, self._k.shape[1])
        self.dropped += dead
        return dead

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
        """Keys evicted so far per layer (ACP)."""
        return [c.evicted for c in self.layers]

    def dropped_keys(self) -> list[int]:
        """Keys packed out so far per layer (learned context pruning)."""
        return [c.dropped for c in self.layers]
