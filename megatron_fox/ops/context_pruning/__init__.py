"""Learned dynamic context pruning (Anagnostidis et al. 2023) for forgetting attention."""

from .function import pruned_forgetting_attention
from .keep_mask import keep_mask
from .reference import keep_mask_reference, keep_probabilities, kept_fraction, pruned_forgetting_attention_reference
from .sparse_sigmoid import sparse_sigmoid

__all__ = ["keep_mask", "keep_mask_reference", "keep_probabilities", "kept_fraction", "pruned_forgetting_attention",
           "pruned_forgetting_attention_reference", "sparse_sigmoid"]
