"""Chunk skipping of the context-parallel ring: which chunk pairs ACP prunes wholly (the
skip table), its trip to the host without stalling the stream, and the per-layer memory
that decides whether a call waits for it."""

from __future__ import annotations

import functools

import torch

from .layout import chunk_ids


def dead_heads(offsets: torch.Tensor, chunk_sums: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """[H, 2P, 2P] bool on the device: pair (i, j) is dead for head h when
    offset_i - (offset_j + sum_j) < delta for every batch row (every pair of positions of
    the two chunks is then below the threshold). offsets, chunk_sums [B, H, 2P], delta [B, H]."""
    ends = offsets + chunk_sums
    gap = offsets[..., :, None] - ends[..., None, :] - delta[..., None, None]  # [B, H, 2P, 2P]
    return (gap < 0).all(dim=0)


def pruned_share(dead: torch.Tensor, r: int, P: int) -> torch.Tensor:
    """0-dim device tensor: the share of rank r's causal attention FLOPs in chunk pairs that
    are dead for every head (dead [H, 2P, 2P] from dead_heads). No host wait."""
    weight = _pair_weights(r, P, dead.device)
    return (dead.all(0).float() * weight).sum() / weight.sum()


@functools.lru_cache(maxsize=16)
def _pair_weights(r: int, P: int, device: torch.device) -> torch.Tensor:
    """[2P, 2P] FLOP weights of rank r's causal chunk pairs (a diagonal one is half a full
    one), made once per device: a pageable host-to-device copy would wait for the stream."""
    weight = torch.zeros(2 * P, 2 * P, dtype=torch.float32)
    for qc in chunk_ids(r, P):
        weight[qc, :qc] = 1.0
        weight[qc, qc] = 0.5
    return weight.to(device)


def live_from_dead(dead) -> tuple[list, dict]:
    """Host side of the table: dead [H][2P][2P] nested lists -> (live, heads), see skip_table."""
    H, n = len(dead), len(dead[0])
    live = [[j <= i and (j == i or not all(dead[h][i][j] for h in range(H))) for j in range(n)] for i in range(n)]
    heads = {(i, j): {h for h in range(H) if not dead[h][i][j]} for i in range(n) for j in range(i) if live[i][j]}
    return live, heads


def skip_table(offsets: torch.Tensor, chunk_sums: torch.Tensor, delta: torch.Tensor):
    """Which (query chunk i, key chunk j <= i) pairs and which of their heads are live.

    offsets, chunk_sums [B, H, 2P] (c before each chunk, sum of log f in it), delta [B, H];
    the test per head is `dead_heads`. Returns (live [2P][2P] bools: some head live, diagonal
    always; heads {(i, j): set of live heads} for live j < i).
    """
    return live_from_dead(dead_heads(offsets, chunk_sums, delta).tolist())


class AsyncToHost:
    """Device tensors copied to the host without stalling the stream: on CUDA the copies go
    to pinned buffers behind an event, and get() waits for that event only, so work queued
    after construction (our own blocks) keeps the GPU busy while the host plans."""

    def __init__(self, tensors):
        self._event = None
        if tensors and tensors[0].device.type == "cuda":
            self._out = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t, non_blocking=True)
                         for t in tensors]
            self._event = torch.cuda.Event()
            self._event.record()
        else:
            self._out = list(tensors)

    def get(self) -> list:
        if self._event is not None:
            self._event.synchronize()
        return [t.tolist() for t in self._out]


class ChunkSkipMemory:
    """Whether to skip chunks, carried from one call of a layer to its next.

    Skipping needs the skip table on the host: one wait per call, and per-head selection of
    K/V, which on one NVLink host costs more than the bytes it saves unless whole chunk pairs
    die. So a call skips (waits for its table) only when the previous call's table had a
    dead chunk pair; otherwise it sends and computes every causal pair (the kernels still
    prune blocks inside them) and leaves its own table on its way to the host for the next
    call. Both ways are exact; the tables are the same on every rank of the group, so all
    ranks choose alike. The first call skips."""

    def __init__(self):
        self._skip = True
        self._pending = None  # (table copy, its live-table function) of a call that did not wait

    def skip_this_call(self) -> bool:
        if self._pending is not None:
            table, live_of = self._pending
            self._pending = None
            self._skip = _any_dead_pair(live_of(table.get()))
        return self._skip

    def remember(self, live: list) -> None:
        self._skip = _any_dead_pair(live)

    def defer(self, table, live_of) -> None:
        self._pending = (table, live_of)


def _any_dead_pair(live: list) -> bool:
    return any(not live[i][j] for i in range(len(live)) for j in range(i))
