"""The token before each of this rank's chunks, for FoX-Pro's KV-shift under context parallelism.

The shift mixes each token's k (and v) with the previous token's (out_t = a_t x_{t-1} +
(1 - a_t) x_t). A chunk's first token has its predecessor on another rank (or, for chunk P,
on this one), so each rank needs one raw k, v row a chunk from elsewhere: the last row of the
chunk before. `chunk_boundary_rows` gathers these rows in one all-gather and hands them to the
layer's fused `prepare`, which shifts each chunk with its own predecessor (`token_shift` with
one prev row a chunk).

Their gradient goes back by the same route: the predecessor rows' gradients (a small
[2, b, g, 2d]) are all-gathered in the backward and added into d mixed at the rows they came
from, in place, so no full-size gradient of mixed is made for them (a view of mixed taken
apart from `prepare` gets a zero-filled full-size gradient and an extra addition each).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .exchange import all_gather_tensor
from .layout import chunk_ids, chunk_owner


class _ChunkBoundaryRows(torch.autograd.Function):
    """mixed [s, b, groups * width] -> (mixed, prev [2, b, groups, cols]): forward passes mixed
    on as it is (a view, whose gradient the backward completes in place) and gathers
    prev[i] = columns [start, start + cols) of the last row of the chunk before this rank's
    i-th chunk (zero before chunk 0)."""

    @staticmethod
    def forward(ctx, mixed, group, groups, start, cols):
        P, r = dist.get_world_size(group), dist.get_rank(group)
        s, b = mixed.shape[:2]
        half = s // 2
        rows = mixed.view(s, b, groups, -1)[:, :, :, start:start + cols]
        every = all_gather_tensor(torch.stack([rows[half - 1], rows[s - 1]]), group)  # [P, 2, b, g, cols]
        prev = rows.new_zeros(2, b, groups, cols)
        for i, chunk in enumerate(chunk_ids(r, P)):
            if chunk > 0:
                prev[i] = every[chunk_owner(chunk - 1, P)]
        ctx.group, ctx.groups, ctx.start, ctx.cols = group, groups, start, cols
        return mixed.view_as(mixed), prev

    @staticmethod
    def backward(ctx, d_mixed, d_prev):
        group, start, cols = ctx.group, ctx.start, ctx.cols
        P, r = dist.get_world_size(group), dist.get_rank(group)
        s, b = d_mixed.shape[:2]
        if d_prev is None:
            d_prev = d_mixed.new_zeros(2, b, ctx.groups, cols)
        # [P, 2, b, g, cols]: what each rank's chunk starts owe their predecessors
        every = all_gather_tensor(d_prev, group)
        d_mixed = d_mixed.contiguous()
        rows = d_mixed.view(s, b, ctx.groups, -1)[:, :, :, start:start + cols]
        for i, chunk in enumerate(chunk_ids(r, P)):
            if chunk + 1 < 2 * P:  # our chunk's last row is the predecessor of chunk + 1
                rows[(s // 2 - 1, s - 1)[i]] += every[chunk_owner(chunk + 1, P)]
        return d_mixed, None, None, None, None


def chunk_boundary_rows(mixed: torch.Tensor, group, groups: int, start: int, cols: int):
    """The rows before this rank's two chunks, for a shift across chunk borders.

    mixed [s, b, groups * width]: this rank's two chunks (Megatron's load-balanced layout,
    chunks r and 2P-1-r, s/2 rows each), each group's row `width` wide. Returns (mixed, prev):
    mixed again (use it in place of the argument, so that the predecessor rows' gradients
    reach d mixed), and prev [2, b, groups, cols], prev[i] the columns [start, start + cols)
    of the last row of the chunk before this rank's i-th chunk, zero before chunk 0.
    Differentiable; one all-gather of [2, b, groups, cols] forward and one backward."""
    if mixed.dim() != 3 or mixed.shape[0] % 2 or mixed.shape[2] % groups:
        raise ValueError(f"mixed: expected [s, b, groups * width] with s even and {groups} groups, "
                         f"got {tuple(mixed.shape)}")
    if not 0 <= start or start + cols > mixed.shape[2] // groups:
        raise ValueError(f"start, cols: columns [{start}, {start + cols}) outside a group's "
                         f"{mixed.shape[2] // groups}")
    return _ChunkBoundaryRows.apply(mixed, group, groups, start, cols)
