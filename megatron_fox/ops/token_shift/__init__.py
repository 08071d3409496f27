"""Data-dependent token shift of FoX-Pro (the "KV-shift")."""

from .shift import head_rms_norm, token_shift

__all__ = ["head_rms_norm", "token_shift"]
