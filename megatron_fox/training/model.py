"""Build the FoX GPTModel (one pipeline stage) from the parsed arguments."""

from __future__ import annotations

import argparse
import math
import zlib
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel

from ..layers import FoxSelfAttention, FoxTransformerConfig, get_fox_block_spec
from .arguments import pipeline_stages


def embedding_ids(args: argparse.Namespace, tokenizer_vocab: int = 0) -> int:
    """Token ids the embedding must hold: --vocab-size (plus NullTokenizer's end-of-document
    id, which is vocab_size itself), at least the tokenizer's own vocabulary where known."""
    return max(args.vocab_size + (args.tokenizer_type == "NullTokenizer"), tokenizer_vocab)


def padded_vocab_size(vocab_size: int, args: argparse.Namespace) -> int:
    """Round the vocabulary up to make_vocab_size_divisible_by * TP, as Megatron-LM does."""
    multiple = args.make_vocab_size_divisible_by * args.tensor_model_parallel_size
    return -(-vocab_size // multiple) * multiple


def transformer_config(args: argparse.Namespace, device: torch.device) -> FoxTransformerConfig:
    """FoxTransformerConfig from the arguments (SwiGLU, RMSNorm, no biases, no dropout)."""
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    return FoxTransformerConfig(
        num_layers=args.num_layers,
        hidden_size=args.hidden_size,
        ffn_hidden_size=args.ffn_hidden_size,
        num_attention_heads=args.num_attention_heads,
        num_query_groups=args.num_query_groups,
        kv_channels=args.kv_channels,
        normalization="RMSNorm",
        layernorm_epsilon=args.norm_epsilon,
        gated_linear_unit=True,
        activation_func=F.silu,
        bias_activation_fusion=args.fox_fuse_extras and device.type == "cuda",  # Megatron's fused SwiGLU
        add_bias_linear=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=args.init_method_std,
        tensor_model_parallel_size=args.tensor_model_parallel_size,
        pipeline_model_parallel_size=args.pipeline_model_parallel_size,
        num_layers_in_first_pipeline_stage=args.decoder_first_pipeline_num_layers,
        num_layers_in_last_pipeline_stage=args.decoder_last_pipeline_num_layers,
        account_for_embedding_in_pipeline_split=args.account_for_embedding_in_pipeline_split,
        account_for_loss_in_pipeline_split=args.account_for_loss_in_pipeline_split,
        context_parallel_size=args.context_parallel_size,
        cp_comm_type=args.cp_comm_type,
        sequence_parallel=args.sequence_parallel,
        bf16=args.bf16,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        use_cpu_initialization=device.type != "cuda",
        perform_initialization=True,
        variable_seq_lengths=False,
        calculate_per_token_loss=True,  # gradients / tokens of the global batch (CUDA path)
        cross_entropy_loss_fusion=args.cross_entropy_loss_fusion,
        deterministic_mode=args.deterministic_mode,
        cross_entropy_fusion_impl=args.cross_entropy_fusion_impl,
        fox_forget_gate=args.fox_forget_gate,
        fox_output_gate=args.fox_output_gate,
        fox_output_norm=args.fox_output_norm,
        fox_qk_norm=args.fox_qk_norm,
        fox_qk_norm_eps=args.fox_qk_norm_eps,
        fox_kv_shift=args.fox_kv_shift,
        fox_fgate_bias_init=args.fox_fgate_bias_init,
        fox_forget_gate_type=args.fox_forget_gate_type,
        fox_fuse_extras=args.fox_fuse_extras,
        fox_cp_skip_chunks=args.fox_cp_skip_chunks,
        acp_log_eps=args.acp_log_eps if args.acp else None,
        acp_logit_bound=args.acp_logit_bound,
        acp_backward_pruning=args.acp_backward_pruning,
        fox_context_pruning=args.fox_context_pruning,
        fox_context_pruning_dim=args.fox_context_pruning_dim,
        fox_context_pruning_beta_init=args.fox_context_pruning_beta_init,
        **moe_config(args),
        recompute_granularity=args.recompute_granularity,
        recompute_method=args.recompute_method if args.recompute_granularity else None,
        recompute_num_layers=args.recompute_num_layers if args.recompute_granularity else None,
    )


def moe_config(args: argparse.Namespace) -> dict:
    """TransformerConfig keys of the Mixture-of-Experts MLP ({} for the dense one)."""
    if args.num_experts is None:
        return {}
    return dict(num_moe_experts=args.num_experts, expert_model_parallel_size=args.expert_model_parallel_size,
                moe_ffn_hidden_size=args.moe_ffn_hidden_size,
                moe_router_topk=args.moe_router_topk, moe_router_pre_softmax=args.moe_router_pre_softmax,
                moe_router_score_function=args.moe_router_score_function,
                moe_router_enable_expert_bias=args.moe_router_enable_expert_bias,
                moe_router_bias_update_rate=args.moe_router_bias_update_rate,
                moe_router_topk_scaling_factor=args.moe_router_topk_scaling_factor,
                moe_router_num_groups=args.moe_router_num_groups, moe_router_group_topk=args.moe_router_group_topk,
                moe_router_load_balancing_type=args.moe_router_load_balancing_type,
                moe_aux_loss_coeff=args.moe_aux_loss_coeff, moe_z_loss_coeff=args.moe_z_loss_coeff,
                moe_token_dispatcher_type=args.moe_token_dispatcher_type,
                moe_layer_freq=args.moe_layer_freq_value,
                moe_shared_expert_intermediate_size=args.moe_shared_expert_intermediate_size,
                fox_moe_grouped_gemm=args.moe_grouped_gemm,
                moe_expert_capacity_factor=args.moe_expert_capacity_factor,
                moe_token_drop_policy=args.moe_token_drop_policy,
                moe_pad_expert_input_to_capacity=args.moe_pad_expert_input_to_capacity,
                moe_router_dtype="fp32")  # routing decisions kept out of bf16 rounding


def build_model(args: argparse.Namespace, config: FoxTransformerConfig, vocab_size: int) -> torch.nn.Module:
    """This rank's pipeline stage of the FoX GPTModel (no position embedding: FoX needs none;
    rope for the Transformer baseline),
    or with --hybrid-layer-pattern Megatron-Core's HybridModel on the FoX hybrid stack."""
    common = dict(config=config, vocab_size=vocab_size, max_sequence_length=args.seq_length,
                  pre_process=parallel_state.is_pipeline_first_stage(),
                  post_process=parallel_state.is_pipeline_last_stage(),
                  share_embeddings_and_output_weights=not args.untie_embeddings_and_output_weights,
                  position_embedding_type=args.position_embedding_type)
    if args.position_embedding_type == "rope":
        common.update(rotary_base=args.rotary_base, rotary_percent=args.rotary_percent)
    if args.hybrid_layer_pattern is not None:
        from megatron.core.models.hybrid.hybrid_model import HybridModel

        from ..layers.hybrid import get_fox_hybrid_stack_spec

        model = HybridModel(hybrid_stack_spec=get_fox_hybrid_stack_spec(args.transformer_impl),
                            hybrid_layer_pattern=args.hybrid_layer_pattern, **common)
    else:
        model = GPTModel(transformer_layer_spec=get_fox_block_spec(config, args.transformer_impl), **common)
    init_layout_invariant(model, args)
    return model


def expert_layout(args: argparse.Namespace) -> tuple[int, int]:
    """(this rank's expert-parallel rank, experts per MoE layer on each rank)."""
    from megatron.core import parallel_state as ps

    if args.num_experts is None:
        return 0, 0
    ep = args.expert_model_parallel_size
    return (ps.get_expert_model_parallel_rank() if ep > 1 else 0), args.num_experts // ep


@torch.no_grad()
def init_layout_invariant(model, args) -> None:
    """Re-draw every matrix from a generator seeded by (seed, its full-model name), then
    keep this rank's shard: the initial model is the same for any TP/PP/EP layout.

    Normal(0, init_method_std); attention and MLP output projections use
    init_method_std / sqrt(2 * num_layers) as Megatron's scaled init. Norm weights and the
    FoX per-head parameters keep their constant init.
    """
    from megatron.core import parallel_state as ps

    from ..checkpoint import full_shape, global_name, split_tensor

    tp, tp_rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    offset = pipeline_stages(args)[ps.get_pipeline_model_parallel_rank()][0]
    ep_rank, local_experts = expert_layout(args)
    for name, p in model.named_parameters():
        if "layernorm" in name or ".head_params." in name or p.dim() < 2:
            continue
        full = global_name(name, offset, ep_rank, local_experts)
        gen = torch.Generator().manual_seed(zlib.crc32(f"{args.seed}:{full}".encode()))
        std = args.init_method_std
        if "linear_proj.weight" in name or "linear_fc2.weight" in name:
            std /= math.sqrt(2.0 * args.num_layers)
        w = torch.randn(full_shape(name, p.shape, tp), generator=gen) * std
        p.copy_(split_tensor(name, w, tp_rank, tp).to(p.device, p.dtype))
    for m in model.modules():  # the fused projections' alignment rows were drawn too
        if isinstance(m, FoxSelfAttention):
            m.zero_qkv_padding()


def attention_layers(model) -> list:
    """The FoxCoreAttention modules of a (possibly wrapped) model, in layer order."""
    from ..layers import FoxCoreAttention

    return [m for m in model.modules() if isinstance(m, FoxCoreAttention)]


@torch.no_grad()
def load_full_state_dict(model, path: str, args, full: Optional[dict] = None) -> None:
    """Copy a full (TP = PP = 1) state dict file (GPTModel names) into this rank's stage, TP
    shard and experts (a HybridModel "*-" * N: renamed to its layers). full: that state dict
    already read (path then only names it in messages). Raises ValueError naming the
    tensors that are missing, extra or of the wrong shape."""
    from megatron.core import parallel_state as ps

    from ..checkpoint import gpt_to_hybrid_names, shard_state_dict
    from ..checkpoint.public_fox import load_state_file

    full = load_state_file(path) if full is None else full
    if args.hybrid_layer_pattern is not None:  # the file holds GPTModel names; "*-" * N takes them
        full = gpt_to_hybrid_names(full)
    shard = shard_state_dict(full, args.num_layers, ps.get_tensor_model_parallel_rank(),
                             ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_rank(),
                             ps.get_pipeline_model_parallel_world_size(), expert_layout(args)[0],
                             args.expert_model_parallel_size, pipeline_stages(args))
    own = {k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
    if args.fox_context_pruning:  # fine-tuning a model without it: the new projections keep their init
        fresh = [k for k in own if ".context_pruning." in k and k not in shard]
        own = {k: v for k, v in own.items() if k not in fresh}
        if fresh and dist.get_rank() == 0:
            print(f"pretrained_checkpoint: {len(fresh)} context-pruning tensors not in {path}: newly initialised")
    missing, extra = sorted(set(own) - set(shard)), sorted(set(shard) - set(own))
    wrong = [k for k in own if k in shard and tuple(shard[k].shape) != tuple(own[k].shape)]
    if missing or extra or wrong:
        raise ValueError(f"{path} does not fit the model: missing {missing[:4]}, "
                         f"unexpected {extra[:4]}, wrong shape {[(k, tuple(shard[k].shape)) for k in wrong[:4]]}")
    for name, t in own.items():
        t.copy_(shard[name])
