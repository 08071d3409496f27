"""Incremental decoding of FoX models with ACP-based KV-cache eviction."""

from .cache import InferenceCache, LayerCache
from .generate import FoxGenerator

__all__ = ["FoxGenerator", "InferenceCache", "LayerCache"]
