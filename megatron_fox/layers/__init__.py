"""Megatron-Core modules of the FoX transformer and its layer spec."""

from .config import FoxTransformerConfig
from .core_attention import FoxCoreAttention
from .fox_attention import FoxSelfAttention, FoxSelfAttentionSubmodules
from .norm import FoxRMSNorm
from .spec import get_fox_block_spec, get_fox_layer_spec, transformer_engine_available

__all__ = [
    "FoxCoreAttention",
    "FoxSelfAttention",
    "FoxSelfAttentionSubmodules",
    "FoxRMSNorm",
    "FoxTransformerConfig",
    "get_fox_block_spec",
    "get_fox_layer_spec",
    "transformer_engine_available",
]
