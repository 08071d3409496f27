"""FoX self-attention as a Megatron-Core module: one column-parallel GEMM, the FoX op, output gate.

Activations are [seq, batch, hidden] between layers (Megatron's layout); with sequence
parallel the column-parallel input GEMM all-gathers the sequence and the row-parallel
output GEMM reduce-scatters it, as in Megatron's own SelfAttention.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Union

import torch
import torch.nn.functional as F
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec, build_module

from ..ops.token_shift import document_start_mask
from . import extras
from .context_pruning import ContextPruning
from .core_attention import FoxCoreAttention
from .head_params import HeadParams
from .qkv_layout import QkvLayout, split_fused


@dataclass
class FoxSelfAttentionSubmodules:
    """linear_qkv: column-parallel input GEMM; core_attention: the FoX op; linear_proj: row-parallel."""

    linear_qkv: Union[ModuleSpec, type] = None
    core_attention: Union[ModuleSpec, type] = FoxCoreAttention
    linear_proj: Union[ModuleSpec, type] = None


def _tp_size(kwargs) -> int:
    pg = kwargs.get("pg_collection")
    if pg is not None and getattr(pg, "tp", None) is not None:
        return pg.tp.size()
    from megatron.core import parallel_state

    return parallel_state.get_tensor_model_parallel_world_size()


def _tp_rank(kwargs) -> int:
    pg = kwargs.get("pg_collection")
    if pg is not None and getattr(pg, "tp", None) is not None:
        return pg.tp.rank()
    from megatron.core import parallel_state

    return parallel_state.get_tensor_model_parallel_rank()


class FoxSelfAttention(MegatronModule):
    """FoX(-Pro) self-attention.

    linear_qkv produces, per key/value group g (TP splits whole groups, so the layout does
    not depend on TP): [q of its heads (hpg*d) | k (d) | v (d) | forget-gate logits (hpg) |
    output-gate logits (hpg*d, if fox_output_gate) | k and v shift logits (2, if fox_kv_shift) |
    zero padding to a multiple of 8] (`qkv_layout`).
    Without the forget gate (fox_forget_gate False: the Transformer baseline) its logits are
    not there, and the rotary embedding GPTModel passes (position_embedding_type "rope") turns
    q and k after the QK-norm.
    """

    def __init__(self, config, submodules: FoxSelfAttentionSubmodules, layer_number: int,
                 attn_mask_type=AttnMaskType.causal, **kwargs):
        super().__init__(config=config)
        self.layer_number = layer_number
        tp = _tp_size(kwargs)
        self.head_dim = config.kv_channels
        heads, groups = config.num_attention_heads, config.num_query_groups
        if heads % tp or groups % tp:
            raise ValueError(f"num_attention_heads ({heads}) and num_query_groups ({groups}) must be divisible "
                             f"by tensor_model_parallel_size ({tp})")
        self.heads, self.groups = heads // tp, groups // tp
        self.hpg = heads // groups
        d, hpg = self.head_dim, self.hpg
        self.data_dependent_gate = config.fox_forget_gate and config.fox_forget_gate_type == "data_dependent"
        self.layout = QkvLayout(self.groups, hpg, d, self.data_dependent_gate, config.fox_output_gate,
                                config.fox_kv_shift)
        sizes = self.layout.sizes
        width = sum(sizes)
        self.linear_qkv = build_module(
            submodules.linear_qkv, config.hidden_size, groups * width, config=config,
            init_method=config.init_method, gather_output=False, bias=False, skip_bias_add=False,
            is_expert=False, tp_comm_buffer_name="qkv")
        self.zero_qkv_padding()
        self.head_params = HeadParams(config, self.heads, self.groups, d, _tp_rank(kwargs), tp)
        self.core_attention = build_module(submodules.core_attention, config=config, layer_number=layer_number)
        self.context_pruning = ContextPruning(config, layer_number) if config.fox_context_pruning else None
        self.linear_proj = build_module(
            submodules.linear_proj, heads * d, config.hidden_size, config=config,
            init_method=config.output_layer_init_method, bias=config.add_bias_linear, input_is_parallel=True,
            skip_bias_add=True, is_expert=False, tp_comm_buffer_name="proj")

    @torch.no_grad()
    def zero_qkv_padding(self) -> None:
        """Zero linear_qkv's alignment rows (`qkv_layout`); call again after re-initialising
        its weight."""
        sizes = self.layout.sizes
        if sizes[-1]:
            self.linear_qkv.weight.view(self.groups, sum(sizes), -1)[:, -sizes[-1]:].zero_()

    def logit_bound(self) -> Optional[torch.Tensor]:
        """U per local head from the QK-norm weights, [heads] float32 (None: the op takes it from
        the data): ACP's bound, and with ACP off the one exact FoX's backward finds its zero
        blocks by."""
        cfg = self.config
        if cfg.acp_logit_bound != "qk_norm" or not cfg.fox_qk_norm:
            return None
        return self.qk_norm_logit_bound()

    def qk_norm_logit_bound(self) -> torch.Tensor:
        """|sm_scale q.k| <= U per local head, [heads] float32, from the QK-norm weights:
        |q_i| <= max|w_q| sqrt(d) and |k_j| <= max|w_k| sqrt(d) after the RMS norm, so
        |q.k| / sqrt(d) <= max|w_q| max|w_k| sqrt(d).

        Recomputed at every call on purpose: Megatron's distributed optimizer writes updated
        weights through `.data` and all-gathers into the parameter buffer, neither of which
        bumps the tensors' version counters, so a cache keyed on them would go stale and a
        stale (too small) bound would break ACP's guarantee."""
        if not self.config.fox_qk_norm:
            raise ValueError("a logit bound from the QK-norm weights needs fox_qk_norm=True")
        hp = self.head_params
        wq = hp.q_norm.detach().float().abs().amax(-1)  # [heads]
        wk = hp.k_norm.detach().float().abs().amax(-1).repeat_interleave(self.hpg)
        return wq * wk * math.sqrt(self.head_dim)

    def _finish(self, out, ogate):
        cfg = self.config
        finish = extras.fused(extras.finish, cfg.fox_fuse_extras, out.device)
        return finish(out, ogate, self.head_params.output_norm if cfg.fox_output_norm else None,
                      cfg.layernorm_epsilon)

    def forward(self, hidden_states, attention_mask=None, packed_seq_params=None, **kwargs):
        """hidden_states [s(/tp with SP), b, h] -> (output [s(/tp), b, h], bias or None)."""
        cfg = self.config
        mixed, _ = self.linear_qkv(hidden_states)
        s, b = mixed.shape[:2]
        cu_seqlens = getattr(packed_seq_params, "cu_seqlens_q", None) if packed_seq_params is not None else None
        doc_start = prev_kv = None
        if cfg.fox_kv_shift and cfg.context_parallel_size > 1:  # the shift crosses chunk borders
            from megatron.core import parallel_state

            from ..parallel import chunk_boundary_rows, local_document_starts

            group = parallel_state.get_context_parallel_group()
            if cu_seqlens is not None:
                doc_start = local_document_starts(cu_seqlens, s * cfg.context_parallel_size, b, group)
            d = self.head_dim
            mixed, prev = chunk_boundary_rows(mixed, group, self.groups, self.layout.sizes[0], 2 * d)
            prev_kv = (prev[..., :d], prev[..., d:])  # raw k, v rows (adjacent in the layout)
        elif cfg.fox_kv_shift and cu_seqlens is not None:
            doc_start = document_start_mask(cu_seqlens, s, b)
        q, k, v, log_fgate, ogate = self._prepare(mixed, doc_start, prev_kv)
        rotary = kwargs.get("rotary_pos_emb")
        if rotary is not None:
            q, k = self._rotate(q, k, rotary)
        keep = penalty_keep = None
        if self.context_pruning is not None and self.context_pruning.enabled:
            keep, penalty_keep = self.context_pruning.keep(hidden_states)
        out = self.core_attention(q, k, v, log_fgate, logit_bound=self.logit_bound(), cu_seqlens=cu_seqlens,
                                  keep=keep)
        if keep is not None:
            out = self.context_pruning.add_penalty(out, penalty_keep, cu_seqlens)
        return self.linear_proj(self._finish(out, ogate))

    def _rotate(self, q, k, rotary):
        """Megatron-Core's rotary embedding (its freqs [s, 1, 1, d], this CP rank's positions)
        on q [s, b, h, d] and k [s, b, g, d]. A rotation keeps |q| and |k|, so ACP's logit
        bound (from the QK-norm weights or the data) holds after it."""
        from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb

        if isinstance(rotary, tuple):  # GPTModel passes one tensor for q and k alike
            rotary = rotary[0]
        return apply_rotary_pos_emb(q, rotary, self.config), apply_rotary_pos_emb(k, rotary, self.config)

    def _prepare(self, mixed, doc_start, prev_kv=None):
        """`extras.prepare` on linear_qkv's output -> q, k, v, log f, output-gate logits; log f of the
        data-independent gates from their per-head parameters."""
        cfg, hp = self.config, self.head_params
        norms = (hp.q_norm, hp.k_norm) if cfg.fox_qk_norm else (None, None)
        prepare = extras.fused(extras.prepare, cfg.fox_fuse_extras, mixed.device)
        bias = hp.fgate_bias if self.data_dependent_gate else None
        q, k, v, log_fgate, ogate = prepare(mixed, self.layout, bias, doc_start, *norms, cfg.fox_qk_norm_eps,
                                           prev_kv)
        if cfg.fox_forget_gate and not self.data_dependent_gate:  # the same log f at every token
            per_head = (F.logsigmoid(hp.fgate_bias.float()) if cfg.fox_forget_gate_type == "data_independent"
                        else -hp.alibi_slopes_on(q.device))
            log_fgate = per_head.expand(*q.shape[:3]).contiguous()
        return q, k, v, log_fgate, ogate

    def infer(self, hidden_states, cache):
        """Incremental inference (no autograd, TP = 1): hidden_states [s, b, h] of the new
        tokens, cache an `megatron_fox.inference.LayerCache` holding everything before them.
        Appends the new keys, values and prefix sums, evicts what ACP has pruned for good, and
        returns (output [s, b, h], bias or None). An empty cache runs the prompt through the
        training op; later tokens attend to the cache one at a time."""
        from ..ops import forgetting_attention_decode
        from ..ops.context_pruning import keep_mask, keep_probabilities

        if not self.config.fox_forget_gate:
            raise ValueError("fox_forget_gate: incremental decoding runs FoX models (the forget gate's prefix "
                             "sums are its cache), not the Transformer baseline")

        mixed, _ = self.linear_qkv(hidden_states)
        _, k_raw, v_raw, _, _, shift = split_fused(mixed, self.layout)
        q, k, v, log_fgate, ogate = self._prepare(mixed, None, cache.prev_kv)
        if shift is not None:
            cache.prev_kv = (k_raw[-1:].clone(), v_raw[-1:].clone())  # not a view of the whole prompt
        c = cache.c_last[None] + torch.cumsum(log_fgate, dim=0) if cache.length else torch.cumsum(log_fgate, dim=0)
        prompt = cache.length == 0 and q.shape[0] > 1
        dcp = self.context_pruning if self.context_pruning is not None and self.context_pruning.enabled else None
        keep = q_int = k_int = None
        if dcp is not None:
            q_int, k_int = dcp.projections(hidden_states)  # [b, s, r]
            if prompt:
                keep = keep_mask(q_int, k_int, dcp.beta.float(), dcp.alpha)  # [b, s, s]
        new_keep = None if dcp is None else (keep[:, -1] if prompt else torch.ones(q.shape[1], q.shape[0], device=q.device))
        cache.append(k.transpose(0, 1), v.transpose(0, 1), c.permute(1, 2, 0), k_int, new_keep)
        if prompt:
            out = self.core_attention(q, k, v, log_fgate, logit_bound=self.logit_bound(), keep=keep)
        else:
            outs = []
            for t in range(q.shape[0]):  # each new token sees the cache up to itself
                n = cache.length - q.shape[0] + t + 1
                if dcp is not None:  # token t's keep decisions on every earlier cached key (Eq. of I_kj)
                    cache.keep[:, :n - 1] *= keep_probabilities(q_int[:, t:t + 1], cache.k_int[:, :n - 1],
                                                                dcp.beta.float(), dcp.alpha)[:, 0]
                outs.append(forgetting_attention_decode(q[t], cache.k[:, :n], cache.v[:, :n], c[t],
                                                        cache.c[..., :n],
                                                        keep=None if dcp is None else cache.keep[:, :n]))
            out = torch.stack(outs)
        cache.c_last = c[-1]
        cache.evict_pruned()
        cache.drop_unkept()
        return self.linear_proj(self._finish(out, ogate))
