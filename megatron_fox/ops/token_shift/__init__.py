"""Data-dependent token shift of FoX-Pro (the "KV-shift")."""

from .shift import document_start_mask, head_rms_norm, token_shift

__all__ = ["document_start_mask", "head_rms_norm", "token_shift"]
