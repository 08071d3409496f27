"""Forgetting attention (FoX) with Adaptive Computation Pruning: Triton kernels and reference."""

from .common import AttentionStats, no_data_checks, set_data_checks
from .decode import evictable_prefix, forgetting_attention_decode
from .function import forgetting_attention, set_gluon_forward
from .plan import set_zero_block_skipping
from .tiles import KernelConfig, Tile, kernel_config, set_kernel_config, set_tma
from .reference import forgetting_attention_reference

__all__ = [
    "AttentionStats",
    "KernelConfig",
    "Tile",
    "evictable_prefix",
    "forgetting_attention_decode",
    "forgetting_attention",
    "forgetting_attention_reference",
    "kernel_config",
    "no_data_checks",
    "set_data_checks",
    "set_gluon_forward",
    "set_kernel_config",
    "set_tma",
    "set_zero_block_skipping",
]
