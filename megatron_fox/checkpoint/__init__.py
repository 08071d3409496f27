"""Checkpoint layout helpers (TP/PP partitioning of the FoX model's state dict)."""

from .tracker import (checkpoint_iteration, has_checkpoint, iteration_dir, newer_non_persistent, non_persistent_root,
                      read_latest, read_run_args, remove_other_iterations, write_latest, write_run_args)
from .partition import (expert_shard, full_shape, global_name, gpt_to_hybrid_names, hybrid_to_gpt_names,
                        merge_expert_shards, merge_state_dicts, num_experts_in, shard_state_dict, split_tensor,
                        stage_layers)

__all__ = ["checkpoint_iteration", "expert_shard", "full_shape", "global_name", "has_checkpoint",
           "gpt_to_hybrid_names", "hybrid_to_gpt_names", "iteration_dir", "merge_expert_shards", "merge_state_dicts",
           "newer_non_persistent", "non_persistent_root", "num_experts_in", "read_latest", "read_run_args",
           "remove_other_iterations", "shard_state_dict", "split_tensor", "stage_layers",
           "write_latest", "write_run_args"]
