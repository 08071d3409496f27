"""Plain-PyTorch references of the ops (ground truth for tests, CPU fallback)."""

from .forgetting_attn.reference import forgetting_attention_reference, softmax_weight_before

__all__ = ["forgetting_attention_reference", "softmax_weight_before"]
