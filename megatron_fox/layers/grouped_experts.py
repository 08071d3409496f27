"""Mixture-of-Experts experts as two grouped GEMMs (--moe-grouped-gemm) without Transformer
Engine or the grouped_gemm package: torch._grouped_mm over the local experts' weights.

Megatron-Core's SequentialMLP runs each local expert's MLP in turn (4 GEMM launches and an
activation per expert). GroupedGemmExperts keeps SequentialMLP's parameters, names, init,
tensor-parallel split and checkpoint layout (`local_experts.i.linear_fc1.weight`, ...) and
only replaces its forward: the experts' weights are stacked (a copy of a few MB a layer,
differentiable, so the gradients land in each expert's own parameter) and the tokens, already
sorted by expert by the dispatcher, go through

    h = X W1_e^T (rows of expert e),   a = silu(h_gate) * h_up * prob,   y = a W2_e^T

with the expert boundaries given by the cumulative tokens per expert. The router
probability scales the activation before fc2, as Megatron's MLP does with its
per_token_scale (in float32, cast back to the activation's dtype).
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from megatron.core.transformer.moe.experts import SequentialMLP


def grouped_mm_available(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether torch._grouped_mm runs for these inputs: on CPU (torch's reference loop)
    float32, bfloat16 or float16; on CUDA bfloat16 on compute capability 9.0 or newer
    (CUTLASS kernels)."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    if device.type == "cpu":
        return dtype in (torch.float32, torch.bfloat16, torch.float16)
    return device.type == "cuda" and dtype == torch.bfloat16 and torch.cuda.get_device_capability(device)[0] >= 9


def grouped_swiglu_experts(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, probs: torch.Tensor,
                           tokens_per_expert: torch.Tensor, fused_activation: bool = False) -> torch.Tensor:
    """SwiGLU experts on tokens sorted by expert.

    x: [T, h] (the rows of expert e follow those of expert e-1); w1: [E, 2F, h] ([gate; up]
    rows, as Megatron's linear_fc1 holds them); w2: [E, h, F]; probs: [T] router weights;
    tokens_per_expert: [E] (sum T). fused_activation: Megatron's weighted SwiGLU kernel
    (float32 inside, saves only its input; what SequentialMLP runs with
    bias_activation_fusion). Returns [T, h] in x's dtype.
    """
    offs = tokens_per_expert.to(device=x.device, dtype=torch.int32).cumsum(0, dtype=torch.int32)
    h = _dense_grad(torch._grouped_mm(x, w1.transpose(1, 2), offs=offs))
    if fused_activation:
        from megatron.core.fusions.fused_bias_swiglu import weighted_bias_swiglu_impl

        a = weighted_bias_swiglu_impl(h, None, probs.unsqueeze(-1))
    else:  # as Megatron's unfused MLP: the GLU in h's dtype, then the router weight in float32
        gate, up = h.chunk(2, dim=-1)
        a = ((F.silu(gate) * up).float() * probs.float().unsqueeze(-1)).to(x.dtype)
    return _dense_grad(torch._grouped_mm(a, w2.transpose(1, 2), offs=offs))


def _dense_grad(y: torch.Tensor) -> torch.Tensor:
    """torch._grouped_mm's backward refuses a broadcast (stride 0) incoming gradient, as
    y.sum() gives: hand it a dense one (a copy: an empty tensor stays stride 0 under
    .contiguous(), and a rank can get no tokens at all)."""
    if y.requires_grad:
        y.register_hook(lambda g: g if g.is_contiguous() and 0 not in g.stride() else
                        g.clone(memory_format=torch.contiguous_format))
    return y


class GroupedGemmExperts(SequentialMLP):
    """SequentialMLP's experts and state, its forward as two grouped GEMMs
    (`grouped_swiglu_experts`). Needs SwiGLU experts without biases (megatron_fox's
    config); where torch._grouped_mm cannot run (CUDA before Hopper, or not bfloat16) the
    experts run one after another as in SequentialMLP."""

    def __init__(self, num_local_experts, config, submodules, pg_collection=None, **kwargs):
        super().__init__(num_local_experts, config, submodules, pg_collection=pg_collection, **kwargs)
        if config.add_bias_linear or not config.gated_linear_unit or config.activation_func is not F.silu:
            raise ValueError("moe_grouped_gemm: the grouped experts are SwiGLU without biases "
                             "(gated_linear_unit, silu, add_bias_linear False)")
        if config.moe_apply_probs_on_input:
            raise ValueError("moe_grouped_gemm: not with moe_apply_probs_on_input")
        self._warned = False

    def forward(self, permuted_local_hidden_states: torch.Tensor, tokens_per_expert: torch.Tensor,
                permuted_probs: torch.Tensor):
        x = permuted_local_hidden_states
        if not grouped_mm_available(x.device, x.dtype):
            if not self._warned:
                warnings.warn(f"moe_grouped_gemm: torch._grouped_mm does not run {x.dtype} on {x.device}; the "
                              f"experts run one after another")
                self._warned = True
            return super().forward(x, tokens_per_expert, permuted_probs)
        w1 = torch.stack([e.linear_fc1.weight for e in self.local_experts])
        w2 = torch.stack([e.linear_fc2.weight for e in self.local_experts])
        return grouped_swiglu_experts(x, w1, w2, permuted_probs, tokens_per_expert,
                                      fused_activation=self.config.bias_activation_fusion), None
