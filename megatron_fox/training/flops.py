"""Whole-model figures for the logs, from this rank's shard: the model FLOPs of a training
step (TFLOP/s/GPU, as Megatron-LM's --log-throughput) and the parameters' L2 norm
(--log-params-norm).

Model FLOPs: 3 times the forward's (forward and backward, recompute not
counted), attention counted dense over the causal pairs, so ACP's skipped blocks and packed
documents' masked ones count as done (the figure compares runs, not kernels).

Forward FLOPs of one sequence of s tokens:
    linear:    2 * s * W, W = elements of the weight matrices applied to each token (the
               linear layers' 2-d `.weight`s: q/k/v with the FoX gates fused in (and the
               zero rows that align its groups, computed like the rest), the output
               projection, the MLP, the output layer; with tied embeddings the output layer's
               V x h is the embedding's; per-head norm weights are no matmul; a
               Mixture-of-Experts layer's experts times topk / num_experts, the share of
               them each token runs through, its router whole) -- summed over
               tensor-parallel shards, pipeline stages and expert-parallel ranks;
    attention: 4 * heads * head_dim * s(s+1)/2 per attention layer (q.k and p.v over the
               causal pairs).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .step import is_split_expert


def matmul_weight_elements(model, expert_share: float = 1.0) -> int:
    """W above for the whole model, from this rank's parameters: tensor-parallel shards summed,
    replicated weights once, every pipeline stage's layers; one all-reduce over Megatron's
    model-parallel group (TP x PP) where one is initialised. expert_share: the part of the
    MoE experts' weights a token runs through (moe_router_topk / num_experts)."""
    from megatron.core import parallel_state as ps

    share = _tp_share()
    local, tied_output = 0.0, 0
    for name, p in model.named_parameters():
        if p.dim() != 2 or not name.endswith(".weight"):
            continue
        # every expert-parallel rank holds as many experts as this one
        shard = p.numel() * share(p) * (_expert_parallel_size() if is_split_expert(p) else 1)
        if "word_embeddings" in name:
            # the input lookup costs nothing; tied to the output layer it is also the logits' matmul
            # (counted on the last stage, where the output layer runs)
            last = not ps.model_parallel_is_initialized() or ps.is_pipeline_last_stage(ignore_virtual=True)
            tied_output += shard if (last and not _has_output_weight(model)) else 0
            continue
        local += shard * (expert_share if ".mlp.experts." in name else 1.0)
    return int(round(_model_parallel_sum(local + tied_output)))


def params_l2_norm(model) -> float:
    """L2 norm of all the model's parameters as if on one rank: squares of tensor-parallel
    shards summed, replicated ones once, every pipeline stage, a pipeline copy of a tied
    embedding (Megatron marks it `shared`) not again."""
    from megatron.core import parallel_state as ps

    share = _tp_share()
    local, experts = 0.0, 0.0
    for p in model.parameters():
        if getattr(p, "shared", False) and not (ps.model_parallel_is_initialized()
                                                and ps.is_pipeline_first_stage(ignore_virtual=True)):
            continue
        sq = float(p.detach().float().pow(2).sum()) * share(p)
        if is_split_expert(p):
            experts += sq
        else:
            local += sq
    if _expert_parallel_size() > 1:  # every rank joins (a stage may hold no experts)
        experts = _model_parallel_sum(experts, ps.get_expert_tensor_model_pipeline_parallel_group)
    return (_model_parallel_sum(local) + experts) ** 0.5


def _expert_parallel_size() -> int:
    from megatron.core import parallel_state as ps

    return ps.get_expert_model_parallel_world_size() if ps.model_parallel_is_initialized() else 1


def _tp_share():
    """-> share(p): the part of p's contribution this rank adds before the sum over TP x PP:
    1 for a tensor-parallel shard (the shards add up to the whole), 1/TP for a tensor every
    tensor-parallel rank holds a copy of."""
    from megatron.core import parallel_state as ps

    tp = ps.get_tensor_model_parallel_world_size() if ps.model_parallel_is_initialized() else 1
    return lambda p: 1.0 if getattr(p, "tensor_model_parallel", False) else 1.0 / tp


def _model_parallel_sum(value: float, group_of=None) -> float:
    """value summed over Megatron's model-parallel group (TP x PP), or the group
    group_of() returns, where one is initialised."""
    from megatron.core import parallel_state as ps

    total = torch.tensor([value], dtype=torch.float64)
    if dist.is_initialized() and ps.model_parallel_is_initialized():
        group = (group_of or ps.get_model_parallel_group)()
        if dist.get_world_size(group) > 1:
            dev = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl" else "cpu"
            total = total.to(dev)
            dist.all_reduce(total, group=group)
    return total.item()


def _has_output_weight(model) -> bool:
    return any(name.endswith("output_layer.weight") for name, _ in model.named_parameters())


def attention_flops(seq_length: int, heads: int, head_dim: int, causal: bool = True) -> int:
    """Forward FLOPs of one attention layer on one sequence: q.k and p.v over the causal pairs
    (causal=False: every pair, as a dense s x s reference computes)."""
    pairs = seq_length * (seq_length + 1) // 2 if causal else seq_length * seq_length
    return 4 * heads * head_dim * pairs


def step_flops(args, weight_elements: int) -> float:
    """Model FLOPs of one optimizer step of args.global_batch_size sequences (forward and
    backward: 3 x forward)."""
    s, b = args.seq_length, args.global_batch_size
    layers = args.hybrid_layer_pattern.count("*") if args.hybrid_layer_pattern else args.num_layers
    forward = b * (2 * s * weight_elements + layers * attention_flops(s, args.num_attention_heads, args.kv_channels))
    return 3.0 * forward
