"""The layout of FoX attention's fused input projection (`linear_qkv`), shared by the layer and
the checkpoint converters.

Per key/value group g (tensor parallelism splits whole groups, so the layout does not depend
on TP): [q of its heads (hpg*d) | k (d) | v (d) | forget-gate logits (hpg) | output-gate logits
(hpg*d) | k and v shift logits (2) | padding], each part present only with its option.

The padding makes a group's width a multiple of 8 values, so the GEMM's output rows (and its
gradient's) are 16-byte aligned in bf16 for any number of groups per rank. Unaligned, cuBLAS
falls back to 2-element-aligned SM80 kernels in the forward and both backward GEMMs: the
125M config (12 groups of 259) spent 92 ms of a 418 ms step at 16k in them on an H100, where
the aligned width of the ALiBi-gated model took about 31 ms (docs/benchmarks.md). The padding
rows are zero at initialisation and their outputs are dropped, so their gradient is zero and
they stay zero.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

QKV_ALIGN = 8


def fused_qkv_sizes(heads_per_group: int, head_dim: int, forget_gate: bool = True, output_gate: bool = True,
                    kv_shift: bool = True) -> list:
    """Widths of one group's parts in order, the padding last (possibly 0); their sum is the
    group's width, a multiple of QKV_ALIGN."""
    hpg, d = heads_per_group, head_dim
    sizes = [hpg * d, d, d] + ([hpg] if forget_gate else []) + ([hpg * d] if output_gate else []) + \
        ([2] if kv_shift else [])
    return sizes + [-sum(sizes) % QKV_ALIGN]


class QkvLayout(NamedTuple):
    """One rank's fused projection: `groups` key/value groups of `heads_per_group` query heads
    of `head_dim`, with the parts the options add. A tuple, so that torch.compile guards on
    its values and every layer of one shape shares one compiled graph."""

    groups: int
    heads_per_group: int
    head_dim: int
    forget_gate: bool = True
    output_gate: bool = True
    kv_shift: bool = True

    @property
    def sizes(self) -> list:
        return fused_qkv_sizes(self.heads_per_group, self.head_dim, self.forget_gate, self.output_gate, self.kv_shift)


def split_fused(mixed: torch.Tensor, layout: QkvLayout):
    """mixed [s, b, groups * width] (linear_qkv's output) -> q [s, b, heads, d], k, v [s, b, groups, d],
    forget-gate logits [s, b, heads], output-gate logits [s, b, heads, d], shift logits
    [s, b, groups, 2] (each None without its option); views of mixed where the shapes allow."""
    s, b = mixed.shape[:2]
    heads, d = layout.groups * layout.heads_per_group, layout.head_dim
    parts = list(torch.split(mixed.view(s, b, layout.groups, -1), layout.sizes, dim=-1))
    q = parts.pop(0).reshape(s, b, heads, d)
    k, v = parts.pop(0), parts.pop(0)
    fgate = parts.pop(0).reshape(s, b, heads) if layout.forget_gate else None
    ogate = parts.pop(0).reshape(s, b, heads, d) if layout.output_gate else None
    shift = parts.pop(0) if layout.kv_shift else None
    return q, k, v, fgate, ogate, shift
