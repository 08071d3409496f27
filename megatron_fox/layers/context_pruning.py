"""Learned dynamic context pruning (Anagnostidis et al. 2023) as a part of the FoX attention
layer: the interaction projections, the keep mask, and the sparsity penalty.

One mask per layer, shared by its heads (so a dropped token leaves the whole layer's cache).
The projections are small ([r, hidden] each) and replicated over tensor-parallel ranks: each
rank computes the same mask from the whole sequence, and the gradient reaching the mask,
which comes from this rank's heads only, is summed over the TP group before it reaches the
projections (`copy_to_tensor_model_parallel_region`), so every rank's copy gets the whole
gradient and the copies stay equal.
"""

from __future__ import annotations

from typing import Optional

import torch
from megatron.core.transformer.module import MegatronModule

from ..ops import no_data_checks
from ..ops.context_pruning import keep_mask, kept_fraction


class ContextPruning(MegatronModule):
    """q_int, k_int [r, hidden] and beta (one per layer); `alpha` (the sparse sigmoid's,
    1 -> 8 during fine-tuning, set by `set_context_pruning_state`) and `penalty_weight`
    (lambda / layers times this micro-batch's share of the batch's tokens) are set by the
    training loop before each micro-batch forward; `enabled` False makes the layer attend
    to every token (the model without pruning, for comparisons)."""

    def __init__(self, config, layer_number: int = 1):
        super().__init__(config=config)
        self.layer_number = layer_number
        r, h = config.fox_context_pruning_dim, config.hidden_size
        dev = None if config.use_cpu_initialization else torch.cuda.current_device()
        kw = dict(device=dev, dtype=config.params_dtype)
        self.q_int = torch.nn.Parameter(torch.empty(r, h, **kw))
        self.k_int = torch.nn.Parameter(torch.empty(r, h, **kw))
        config.init_method(self.q_int)
        config.init_method(self.k_int)
        self.beta = torch.nn.Parameter(torch.full((1,), config.fox_context_pruning_beta_init, **kw))
        self.alpha = 1.0
        self.penalty_weight = 0.0
        self.enabled = True
        self.last_kept_fraction = None

    def projections(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """hidden_states [s(/tp with SP), b, h] -> q_int, k_int [b, s, r] of the whole sequence."""
        x = hidden_states
        if self.config.sequence_parallel and self.config.tensor_model_parallel_size > 1:
            from megatron.core.tensor_parallel import gather_from_sequence_parallel_region

            # backward: this rank's slice of the (TP-summed, hence whole) gradient, no reduce
            x = gather_from_sequence_parallel_region(x, tensor_parallel_output_grad=False)
        q_int = torch.matmul(x, self.q_int.t()).transpose(0, 1)
        k_int = torch.matmul(x, self.k_int.t()).transpose(0, 1)
        return q_int, k_int

    def keep(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(keep for this rank's heads, keep for the penalty), both [b, s, s] float32: the same
        values; the first sums its gradient over the TP group, the second does not (every
        rank adds the same penalty gradient)."""
        q_int, k_int = self.projections(hidden_states)
        keep = keep_mask(q_int, k_int, self.beta.float(), self.alpha)
        shared = keep
        if self.config.tensor_model_parallel_size > 1:
            from megatron.core.tensor_parallel import copy_to_tensor_model_parallel_region

            shared = copy_to_tensor_model_parallel_region(keep)
        return shared, keep

    def add_penalty(self, out: torch.Tensor, keep: torch.Tensor, cu_seqlens: Optional[torch.Tensor]) -> torch.Tensor:
        """out unchanged; its backward also sends penalty_weight * d(kept fraction)/d(params)
        (the penalty joins the loss's gradient, not its logged value). cu_seqlens: the
        micro-batch's offsets over its b * s tokens (built valid by the packing: no value check)."""
        with no_data_checks():
            fraction = kept_fraction(keep, cu_seqlens)
        self.last_kept_fraction = fraction.detach()
        if not torch.is_grad_enabled() or self.penalty_weight == 0.0:
            return out
        return _AttachPenalty.apply(out, fraction, float(self.penalty_weight))


class _AttachPenalty(torch.autograd.Function):
    """Identity on x; backward adds weight * d(penalty) as if weight * penalty were in the loss."""

    @staticmethod
    def forward(ctx, x, penalty, weight):
        ctx.weight = weight
        ctx.penalty_shape = penalty.shape
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad, torch.full(ctx.penalty_shape, ctx.weight, device=grad.device, dtype=torch.float32), None


def context_pruning_modules(model) -> list:
    """The ContextPruning modules of a (possibly wrapped) model, in layer order."""
    return [m for m in model.modules() if isinstance(m, ContextPruning)]


def set_context_pruning_state(model, *, alpha: Optional[float] = None, penalty_weight: Optional[float] = None,
                              enabled: Optional[bool] = None):
    """Set the sparse sigmoid's alpha, the penalty weight and/or whether pruning is on, in
    every layer."""
    for m in context_pruning_modules(model):
        if alpha is not None:
            m.alpha = float(alpha)
        if penalty_weight is not None:
            m.penalty_weight = float(penalty_weight)
        if enabled is not None:
            m.enabled = bool(enabled)
