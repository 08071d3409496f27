"""RMSNorm usable with sequence parallel (Megatron's WrappedTorchNorm refuses it)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


class FoxRMSNorm(torch.nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * weight over the last dim (hidden).

    Built like Megatron's norms: (config, hidden_size, eps). With sequence parallel each
    TP rank sees a slice of the sequence, so the weight is marked `sequence_parallel` and
    its gradient is summed over TP ranks (finalize_model_grads on CUDA, the CPU engine).
    """

    def __init__(self, config, hidden_size: int, eps: float = 1e-6, **kwargs):
        super().__init__()
        dev = "cpu" if config.use_cpu_initialization else torch.cuda.current_device()
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype, device=dev))
        self.eps = eps
        setattr(self.weight, "sequence_parallel", bool(config.sequence_parallel))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., hidden] -> same shape and dtype."""
        return F.rms_norm(x, (x.shape[-1],), self.weight.to(x.dtype), self.eps)
