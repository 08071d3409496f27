"""Per-head parameters of the FoX attention, sharded over tensor-parallel ranks by head."""

from __future__ import annotations

import math

import torch
from megatron.core.tensor_parallel import set_tensor_model_parallel_attributes
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint


def alibi_slopes(heads: int) -> torch.Tensor:
    """ALiBi's head slopes m_h [heads] float64 (Press et al. 2022): for a power of two n,
    2^(-8h/n), h = 1..n; otherwise those of the largest power of two p below, then every
    other slope of 2p heads (2^(-4(2i+1)/p)) for the remaining heads."""
    p = 2 ** int(math.floor(math.log2(heads)))
    slopes = [2.0 ** (-8.0 * h / p) for h in range(1, p + 1)]
    slopes += [2.0 ** (-4.0 * (2 * i + 1) / p) for i in range(heads - p)]
    return torch.tensor(slopes, dtype=torch.float64)


class HeadParams(MegatronModule):
    """Forget-gate bias [np] (a data-dependent or data-independent forget gate), ALiBi's
    slopes [np] (the fixed gate: `alibi_slopes_on`, not a parameter) and norm weights [np or
    ng, head_dim] of this rank's heads (`tp_rank`'s of `heads * tp` in all).

    All are split over TP ranks along dim 0, like the heads of linear_qkv.
    """

    def __init__(self, config, heads: int, groups: int, head_dim: int, tp_rank: int = 0, tp: int = 1):
        super().__init__(config=config)
        dev = None if config.use_cpu_initialization else torch.cuda.current_device()
        kw = dict(device=dev, dtype=config.params_dtype)
        kind = config.fox_forget_gate_type if config.fox_forget_gate else None
        mine = slice(tp_rank * heads, (tp_rank + 1) * heads)
        if kind == "data_dependent":
            self.fgate_bias = torch.nn.Parameter(torch.full((heads,), config.fox_fgate_bias_init, **kw))
        elif kind == "data_independent":  # sigmoid(b) = exp(-m): b = -log(exp(m) - 1)
            m = alibi_slopes(heads * tp)[mine]
            self.fgate_bias = torch.nn.Parameter((-torch.log(torch.expm1(m))).to(**kw))
        elif kind == "alibi":  # kept off the module's buffers: a bf16 cast would round them
            self._alibi_slopes = alibi_slopes(heads * tp)[mine].float()
            self._alibi_on: dict = {}
        if config.fox_qk_norm:
            self.q_norm = torch.nn.Parameter(torch.ones(heads, head_dim, **kw))
            self.k_norm = torch.nn.Parameter(torch.ones(groups, head_dim, **kw))
        if config.fox_output_norm:
            self.output_norm = torch.nn.Parameter(torch.ones(heads, head_dim, **kw))
        for p in self.parameters():
            set_tensor_model_parallel_attributes(p, True, 0, 1)

    def alibi_slopes_on(self, device: torch.device) -> torch.Tensor:
        """This rank's ALiBi slopes [np] float32 on `device` (copied there once)."""
        if device not in self._alibi_on:
            self._alibi_on[device] = self._alibi_slopes.to(device)
        return self._alibi_on[device]

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        state = {}
        self._save_to_state_dict(state, "", keep_vars=True)
        return make_sharded_tensors_for_checkpoint(state, prefix, {name: 0 for name in state}, sharded_offsets)
