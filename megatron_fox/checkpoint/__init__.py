"""Checkpoint layout helpers (TP/PP partitioning of the FoX model's state dict)."""

from .partition import full_shape, global_name, merge_state_dicts, shard_state_dict, split_tensor

__all__ = ["full_shape", "global_name", "merge_state_dicts", "shard_state_dict", "split_tensor"]
