"""Checkpoint layout helpers (TP/PP partitioning of the FoX model's state dict)."""

from .partition import merge_state_dicts, shard_state_dict

__all__ = ["merge_state_dicts", "shard_state_dict"]
