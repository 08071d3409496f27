"""Kernels and their plain-PyTorch references. Knows nothing of Megatron."""

from .forgetting_attn import (
    AttentionStats,
    KernelConfig,
    Tile,
    evictable_prefix,
    forgetting_attention_decode,
    forgetting_attention,
    forgetting_attention_reference,
    kernel_config,
    no_data_checks,
    set_data_checks,
    set_gluon_forward,
    set_kernel_config,
    set_tma,
    set_zero_block_skipping,
)

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
