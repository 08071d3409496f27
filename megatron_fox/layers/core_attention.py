"""Core attention module: Megatron layout in, the FoX/ACP op in between."""

from __future__ import annotations

import functools
from types import SimpleNamespace
from typing import Optional

import torch
from megatron.core.transformer.module import MegatronModule

from ..ops import AttentionStats, forgetting_attention, no_data_checks


class FoxCoreAttention(MegatronModule):
    """Calls `megatron_fox.ops.forgetting_attention` on [s, b, heads, d] tensors.

    With cu_seqlens (offsets of documents in the batch-major flattening of [b, s], every
    sample's start among them) attention and the forget-gate sum restart at every document;
    the op reads the [s, b] tensors through [b, s] views, nothing is copied. With
    config.fox_collect_stats, `self.skipped_fraction` gives the fraction of attention FLOPs
    ACP skipped in the last forward (a device tensor, computed only when read: no kernels or
    host sync in steps that do not log it);
    `self.backward_skipped_fraction` the same for the backward (config.acp_backward_pruning),
    and `self.mean_log_fgate` the mean log forget gate of each of its heads over the last
    forward's tokens (one small reduction a call; the gates' memory: half-life ln 0.5 / it).
    """

    def __init__(self, config, layer_number: int = 1, **kwargs):
        super().__init__(config=config)
        self.layer_number = layer_number
        self._stats = None
        self._head_costs = None  # context parallel a2a: head costs carried to the next call
        self._skip_memory = None  # context parallel p2p: whether the last call had dead chunk pairs
        self._mean_log_fgate = None

    @property
    def skipped_fraction(self) -> Optional[torch.Tensor]:
        return None if self._stats is None else self._stats.skipped_fraction.detach()

    @property
    def backward_skipped_fraction(self) -> Optional[torch.Tensor]:
        if self._stats is None:
            return None
        return getattr(self._stats, "backward_skipped_fraction", self._stats.skipped_fraction).detach()

    @property
    def mean_log_fgate(self) -> Optional[torch.Tensor]:
        """[heads of this rank] float32: mean log f over the last forward's tokens (None
        without the forget gate or stats)."""
        return self._mean_log_fgate

    def forward(self, q, k, v, log_fgate, logit_bound=None, cu_seqlens=None, keep=None):
        """q [s, b, h, d], k/v [s, b, g, d], log_fgate [s, b, h] float32 -> [s, b, h, d].
        keep [b, s, s]: learned context pruning's mask (`layers.context_pruning`), run by
        `ops.context_pruning.pruned_forgetting_attention`.

        log_fgate None (no forget gate: the Transformer baseline): softmax attention, by torch
        SDPA on CUDA where it applies (no documents, mask or context parallelism), else by the
        same paths with log f = 0 (exact softmax attention; ACP then prunes nothing).

        The layer builds valid inputs by construction (log f = logsigmoid <= 0, offsets from
        our own packing), so the op's value checks and their host sync are skipped."""
        if log_fgate is not None and self.config.fox_collect_stats:
            self._mean_log_fgate = log_fgate.detach().mean(dim=(0, 1))
        with no_data_checks():
            if log_fgate is None:
                if q.is_cuda and keep is None and cu_seqlens is None and self.config.context_parallel_size == 1:
                    return self._sdpa(q, k, v)
                log_fgate = q.new_zeros(q.shape[:3], dtype=torch.float32)
            if keep is not None:
                return self._pruned(q, k, v, log_fgate, keep, logit_bound, cu_seqlens)
            return self._forward(q, k, v, log_fgate, logit_bound, cu_seqlens)

    def _sdpa(self, q, k, v):
        """Causal softmax attention by torch SDPA, cuDNN first, on [s, b, h, d] tensors."""
        from torch.nn.attention import SDPBackend, sdpa_kernel

        hpg = q.shape[2] // k.shape[2]
        if hpg > 1:  # grouped-query attention: each key/value head serves hpg query heads
            k, v = k.repeat_interleave(hpg, dim=2), v.repeat_interleave(hpg, dim=2)
        q, k, v = (t.permute(1, 2, 0, 3) for t in (q, k, v))
        order = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                 SDPBackend.MATH]
        with sdpa_kernel(order, set_priority=True):
            out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        self._stats = None  # nothing skipped, nothing to report
        return out.permute(2, 0, 1, 3)

    def _pruned(self, q, k, v, log_fgate, keep, logit_bound, cu_seqlens):
        """The keep mask's attention: the Triton op where the head dim allows (skipping what
        ACP prunes, as the unmasked op does), else the materialised reference (exact); the
        whole micro-batch in one call, packed documents included (cu_seqlens over its b * s
        tokens, every sample starting a document)."""
        from ..ops.context_pruning import pruned_forgetting_attention, pruned_forgetting_attention_reference
        from ..ops.context_pruning.function import kernel_supports

        cfg = self.config
        args = [t.transpose(0, 1) for t in (q, k, v, log_fgate)] + [keep]
        args[3] = args[3].contiguous()
        if kernel_supports(q.shape[-1]):
            out, st = pruned_forgetting_attention(*args, log_eps=cfg.acp_log_eps, logit_bound=logit_bound,
                                                  cu_seqlens=cu_seqlens, return_stats=True,
                                                  backward_pruning=cfg.acp_backward_pruning)
            # read at the logging interval only (no launches in other steps)
            self._stats = AttentionStats(lambda: (st.skipped_fraction, None, None), 0, 0)
        else:
            out = pruned_forgetting_attention_reference(*args, cu_seqlens=cu_seqlens)
            self._stats = AttentionStats(lambda: (torch.zeros((), device=q.device), None, None), 0, 0)
        return out.transpose(0, 1)

    def _forward(self, q, k, v, log_fgate, logit_bound, cu_seqlens):
        cfg = self.config
        if cfg.context_parallel_size > 1:
            return self._context_parallel(q, k, v, log_fgate, logit_bound, cu_seqlens)
        # [b, s] views of the [s, b] tensors, documents as offsets over the batch-major b * s
        # tokens: nothing is copied, the output and the gradients keep the [s, b] order
        out = forgetting_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
                                   log_fgate.transpose(0, 1).contiguous(), log_eps=cfg.acp_log_eps,
                                   logit_bound=logit_bound, cu_seqlens=cu_seqlens,
                                   return_stats=cfg.fox_collect_stats, backward_pruning=cfg.acp_backward_pruning)
        if cfg.fox_collect_stats:
            out, self._stats = out
        return out.transpose(0, 1)

    def _context_parallel(self, q, k, v, log_fgate, logit_bound, cu_seqlens):
        """The context-parallel op of config.cp_comm_type (p2p: the ring; a2a: head-parallel)
        over the context-parallel group, on the whole micro-batch (with documents: cu_seqlens over
        its samples' whole rows, batch-major, as Megatron packs them)."""
        from megatron.core import parallel_state

        from ..parallel import (ChunkSkipMemory, HeadCostMemory, context_parallel_forgetting_attention,
                                head_parallel_forgetting_attention)

        cfg = self.config
        comm = cfg.cp_comm_type or "p2p"
        if self._head_costs is None:  # the per-layer state both ops carry to the next call
            self._head_costs, self._skip_memory = HeadCostMemory(), ChunkSkipMemory()
        if isinstance(comm, (list, tuple)):  # Megatron allows one type per layer
            comm = comm[self.layer_number - 1]
        ops = {"p2p": functools.partial(context_parallel_forgetting_attention, skip_chunks=cfg.fox_cp_skip_chunks,
                                        skip_memory=self._skip_memory, backward_pruning=cfg.acp_backward_pruning),
               "a2a": functools.partial(head_parallel_forgetting_attention, cost_memory=self._head_costs,
                                        backward_pruning=cfg.acp_backward_pruning)}
        if comm not in ops:
            raise ValueError(f"cp_comm_type: {comm!r} is not supported by FoX attention (use p2p or a2a)")
        out, stats = ops[comm](
            q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), log_fgate.transpose(0, 1).contiguous(),
            cp_group=parallel_state.get_context_parallel_group(), log_eps=cfg.acp_log_eps, logit_bound=logit_bound,
            cu_seqlens=cu_seqlens, return_stats=True)
        # a float (p2p) or a device tensor (a2a)
        self._stats = SimpleNamespace(skipped_fraction=torch.as_tensor(stats.skipped_fraction))
        return out.transpose(0, 1)
