"""Layer spec of the FoX transformer block (Megatron-Core ModuleSpec composition)."""

from __future__ import annotations

import functools

from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build
from megatron.core.transformer.transformer_layer import (
    TransformerLayer,
    TransformerLayerSubmodules,
    get_transformer_layer_offset,
)

from .core_attention import FoxCoreAttention
from .fox_attention import FoxSelfAttention, FoxSelfAttentionSubmodules
from .norm import FoxRMSNorm


def transformer_engine_available() -> bool:
    """True when Transformer Engine imports (its linears are then the default)."""
    try:
        import transformer_engine  # noqa: F401
        from megatron.core.extensions import transformer_engine as _te  # noqa: F401
    except Exception:  # noqa: BLE001 (any import failure means: not usable)
        return False
    return True


def _use_te(transformer_impl: str) -> bool:
    if transformer_impl not in ("auto", "local", "transformer_engine"):
        raise ValueError(f"transformer_impl must be auto, local or transformer_engine, got {transformer_impl!r}")
    return transformer_impl == "transformer_engine" or (transformer_impl == "auto" and transformer_engine_available())


def get_fox_block_spec(config, transformer_impl: str = "auto", vp_stage=None) -> TransformerBlockSubmodules:
    """This pipeline stage's block: FoX layers and the final norm (RMSNorm that allows SP);
    with config.num_moe_experts the layers `moe_layer_pattern` marks have Megatron-Core's
    MoELayer as their MLP."""
    dense, moe = get_fox_layer_spec(transformer_impl), None
    if config.num_moe_experts is not None:
        moe = get_fox_layer_spec(transformer_impl, num_experts=config.num_moe_experts,
                                 grouped_gemm=getattr(config, "fox_moe_grouped_gemm", False))
    pattern = moe_layer_pattern(config)
    final_norm = fox_modules(transformer_impl)[2]
    offset, n = get_transformer_layer_offset(config, vp_stage=vp_stage), get_num_layers_to_build(config, vp_stage)
    return TransformerBlockSubmodules(layer_specs=[moe if pattern[i] else dense for i in range(offset, offset + n)],
                                      layer_norm=final_norm)


def moe_layer_pattern(config) -> list[int]:
    """1 for each layer of the whole model with a Mixture-of-Experts MLP, 0 for a dense one,
    from config.moe_layer_freq as Megatron-Core reads it (N: layers 0, N, 2N, ...; or a list)."""
    if config.num_moe_experts is None:
        return [0] * config.num_layers
    freq = config.moe_layer_freq
    if isinstance(freq, int):
        return [int(i % freq == 0) for i in range(config.num_layers)]
    return list(freq)


def fox_modules(transformer_impl: str = "auto"):
    """(column-parallel linear, row-parallel linear, norm) classes of the FoX layers:
    Transformer Engine's where `_use_te(transformer_impl)`, else Megatron-Core's local ones
    and FoxRMSNorm."""
    if _use_te(transformer_impl):
        from megatron.core.extensions.transformer_engine import (
            TEColumnParallelLinear,
            TENorm,
            TERowParallelLinear,
        )

        return TEColumnParallelLinear, TERowParallelLinear, TENorm
    return ColumnParallelLinear, RowParallelLinear, FoxRMSNorm


def fox_attention_submodules(transformer_impl: str = "auto") -> dict:
    """The attention half of a FoX layer as TransformerLayerSubmodules keywords (input
    norm, FoX self-attention, its bias-dropout-add)."""
    col, row, norm = fox_modules(transformer_impl)
    attention = ModuleSpec(
        module=FoxSelfAttention,
        params={"attn_mask_type": AttnMaskType.causal},
        submodules=FoxSelfAttentionSubmodules(linear_qkv=col, core_attention=FoxCoreAttention, linear_proj=row),
    )
    return dict(input_layernorm=norm, self_attention=attention, self_attn_bda=get_bias_dropout_add)


def fox_mlp_submodules(transformer_impl: str = "auto", num_experts: int | None = None,
                       grouped_gemm: bool = False) -> dict:
    """The MLP half of a FoX layer as TransformerLayerSubmodules keywords (pre-MLP norm,
    MLP or, with num_experts, Megatron-Core's MoELayer of that many SequentialMLP experts --
    with grouped_gemm our GroupedGemmExperts, SequentialMLP's weights run as two grouped
    GEMMs -- its bias-dropout-add)."""
    col, row, norm = fox_modules(transformer_impl)
    if num_experts is None:
        mlp = ModuleSpec(module=MLP, submodules=MLPSubmodules(linear_fc1=col, linear_fc2=row))
    else:
        from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec

        _define_te_general_gemm()
        mlp = get_moe_module_spec(use_te=_use_te(transformer_impl), num_experts=num_experts, moe_grouped_gemm=False)
        if grouped_gemm:
            _use_grouped_experts(mlp)
    return dict(pre_mlp_layernorm=norm, mlp=mlp, mlp_bda=get_bias_dropout_add)


def _use_grouped_experts(moe_spec) -> None:
    """Swap SequentialMLP for GroupedGemmExperts in Megatron-Core's MoE spec, in place:
    a ModuleSpec whose experts are a ModuleSpec (0.16) or a functools.partial of MoELayer
    whose experts are a partial of SequentialMLP (0.19)."""
    from .grouped_experts import GroupedGemmExperts

    if isinstance(moe_spec, functools.partial):
        moe = moe_spec.keywords["submodules"]
        moe.experts = functools.partial(GroupedGemmExperts, *moe.experts.args, **moe.experts.keywords)
    else:
        moe_spec.submodules.experts.module = GroupedGemmExperts


def _define_te_general_gemm() -> None:
    """megatron-core 0.16's router gating reads moe_utils.te_general_gemm, a name it defines
    only when Transformer Engine imports (NameError without TE); None selects its torch path."""
    from megatron.core.transformer.moe import moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None


def get_fox_layer_spec(transformer_impl: str = "auto", num_experts: int | None = None,
                       grouped_gemm: bool = False) -> ModuleSpec:
    """ModuleSpec of one FoX layer on Megatron-Core's TransformerLayer.

    transformer_impl: "auto" (Transformer Engine linears when TE imports, else local),
    "transformer_engine" or "local" (Megatron-Core's own layers, no TE, no Apex).
    num_experts: a Mixture-of-Experts MLP of that many experts (None: the dense MLP);
    grouped_gemm: its experts as grouped GEMMs (`grouped_experts.GroupedGemmExperts`).
    The config (FoxTransformerConfig) decides output gate, QK-norm, KV-shift and ACP;
    normalization should be "RMSNorm" and gated_linear_unit with silu gives SwiGLU.
    """
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(**fox_attention_submodules(transformer_impl),
                                              **fox_mlp_submodules(transformer_impl, num_experts, grouped_gemm)),
    )
