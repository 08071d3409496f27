"""TransformerConfig with the FoX and ACP options."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from megatron.core.transformer.transformer_config import TransformerConfig


FORGET_GATE_TYPES = ("data_dependent", "data_independent", "alibi")


@dataclass
class FoxTransformerConfig(TransformerConfig):
    """Megatron's TransformerConfig plus the FoX-Pro and ACP settings.

    fox_forget_gate: the forget gate (FoX). False gives softmax attention without it: the
        Transformer baseline (with position_embedding_type "rope" in the model), no ACP.
    fox_output_gate: o = norm(attn) * sigmoid(W_o x) before the output projection.
    fox_output_norm: per-head RMS norm of the attention output (FoX-Pro).
    fox_qk_norm: per-head RMS norm of q and k (weights per head and channel); gives ACP's bound.
    fox_qk_norm_eps: epsilon of that norm (1e-5 as in the public FoX code; the other norms
        use layernorm_epsilon).
    fox_kv_shift: k_t, v_t mixed with k_{t-1}, v_{t-1} by a data-dependent sigmoid gate.
    fox_fgate_bias_init: initial bias of the forget-gate logit (0 -> f = 0.5).
    fox_forget_gate_type: "data_dependent" (FoX: f_t = sigmoid(w.x_t + b) per head),
        "data_independent" (a learned constant per head, f = sigmoid(b), b initialised so
        that log f equals ALiBi's slope of the head: a learnable ALiBi) or "alibi" (fixed
        log f = -m_h, ALiBi's slopes of Press et al. 2022: the decay bias c_i - c_j is then
        ALiBi's -m_h (i - j)). The FoX paper's ablations; ACP prunes all three alike.
    acp_log_eps: ACP tolerance log(eps); None turns pruning off (exact FoX).
    acp_logit_bound: "qk_norm" (bound from the norm weights, needs fox_qk_norm) or "data".
    acp_backward_pruning: "lse" (the backward also skips pairs its rows' log-sum-exp shows
        below eps / L, `forgetting_attention(backward_pruning=...)`) or "bound" (as the forward).
    fox_collect_stats: record the fraction of attention FLOPs skipped per layer.
    fox_fuse_extras: torch.compile the FoX-Pro elementwise work (shift, norms, gates) on CUDA.
    fox_cp_skip_chunks: context-parallel ring (cp_comm_type p2p): skip the transfers and blocks
        ACP prunes wholly. Waiting for the skip table on the host happens only in calls whose
        layer had a dead chunk pair in its previous call (ChunkSkipMemory).
    fox_context_pruning: learned dynamic context pruning (Anagnostidis et al. 2023): per layer
        interaction projections of width fox_context_pruning_dim decide which earlier tokens
        every later one drops (`layers.context_pruning`); the attention then runs
        `ops.context_pruning.pruned_forgetting_attention` with the [b, s, s] mask (O(s^2)
        memory: a fine-tuning method for short contexts; ACP's block skipping applies as
        for the unmasked op). No context parallelism.
    fox_context_pruning_beta_init: initial bias of the keep score (2: most tokens kept at first).
    fox_moe_grouped_gemm: the MoE layers' experts as two grouped GEMMs (torch._grouped_mm;
        `layers.grouped_experts`) instead of one MLP after another. Megatron's own
        moe_grouped_gemm (Transformer Engine's or the grouped_gemm package's kernels) stays off.
    """

    fox_forget_gate: bool = True
    fox_output_gate: bool = True
    fox_output_norm: bool = True
    fox_qk_norm: bool = True
    fox_kv_shift: bool = True
    fox_qk_norm_eps: float = 1e-5
    fox_fgate_bias_init: float = 0.0
    fox_forget_gate_type: str = "data_dependent"
    acp_log_eps: Optional[float] = -10.0
    acp_logit_bound: str = "qk_norm"
    acp_backward_pruning: str = "lse"
    fox_collect_stats: bool = True
    fox_fuse_extras: bool = True
    fox_cp_skip_chunks: bool = True
    fox_context_pruning: bool = False
    fox_context_pruning_dim: int = 64
    fox_context_pruning_beta_init: float = 2.0
    fox_moe_grouped_gemm: bool = False

    def __post_init__(self):
        super().__post_init__()
        if self.fox_forget_gate_type not in FORGET_GATE_TYPES:
            raise ValueError(f"fox_forget_gate_type must be one of {FORGET_GATE_TYPES}, got {self.fox_forget_gate_type!r}")
        if self.acp_logit_bound not in ("qk_norm", "data"):
            raise ValueError(f"acp_logit_bound must be 'qk_norm' or 'data', got {self.acp_logit_bound!r}")
        if self.acp_logit_bound == "qk_norm" and self.acp_log_eps is not None and not self.fox_qk_norm:
            raise ValueError("acp_logit_bound='qk_norm' needs fox_qk_norm=True (else use 'data')")
        if self.acp_backward_pruning not in ("lse", "bound"):
            raise ValueError(f"acp_backward_pruning must be 'lse' or 'bound', got {self.acp_backward_pruning!r}")
        if self.fox_context_pruning and self.context_parallel_size > 1:
            raise ValueError("fox_context_pruning does not run with context_parallel_size > 1")
        if self.fox_context_pruning and self.fox_context_pruning_dim < 1:
            raise ValueError(f"fox_context_pruning_dim must be >= 1, got {self.fox_context_pruning_dim}")
        if self.acp_log_eps is not None and self.acp_log_eps > 0:
            raise ValueError(f"acp_log_eps must be <= 0 or None, got {self.acp_log_eps}")
