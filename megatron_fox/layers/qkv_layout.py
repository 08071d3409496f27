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

QKV_ALIGN = 8


def fused_qkv_sizes(heads_per_group: int, head_dim: int, forget_gate: bool = True, output_gate: bool = True,
                    kv_shift: bool = True) -> list:
    """Widths of one group's parts in order, the padding last (possibly 0); their sum is the
    group's width, a multiple of QKV_ALIGN."""
    hpg, d = heads_per_group, head_dim
    sizes = [hpg * d, d, d] + ([hpg] if forget_gate else []) + ([hpg * d] if output_gate else []) + \
        ([2] if kv_shift else [])
    return sizes + [-sum(sizes) % QKV_ALIGN]
