"""Per-head parameters of the FoX attention, sharded over tensor-parallel ranks by head."""

from __future__ import annotations

import torch
from megatron.core.tensor_parallel import set_tensor_model_parallel_attributes
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint


class HeadParams(MegatronModule):
    """Forget-gate bias [np] (with the forget gate) and norm weights [np or ng, head_dim] of this rank's heads.

    All are split over TP ranks along dim 0, like the heads of linear_qkv.
    """

    def __init__(self, config, heads: int, groups: int, head_dim: int):
        super().__init__(config=config)
        dev = None if config.use_cpu_initialization else torch.cuda.current_device()
        kw = dict(device=dev, dtype=config.params_dtype)
        if config.fox_forget_gate:
            self.fgate_bias = torch.nn.Parameter(torch.full((heads,), config.fox_fgate_bias_init, **kw))
        if config.fox_qk_norm:
            self.q_norm = torch.nn.Parameter(torch.ones(heads, head_dim, **kw))
            self.k_norm = torch.nn.Parameter(torch.ones(groups, head_dim, **kw))
        if config.fox_output_norm:
            self.output_norm = torch.nn.Parameter(torch.ones(heads, head_dim, **kw))
        for p in self.parameters():
            set_tensor_model_parallel_attributes(p, True, 0, 1)

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        state = {}
        self._save_to_state_dict(state, "", keep_vars=True)
        return make_sharded_tensors_for_checkpoint(state, prefix, {name: 0 for name in state}, sharded_offsets)
