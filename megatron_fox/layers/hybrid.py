"""FoX layers in Megatron-Core's HybridModel (megatron-core >= 0.17; `megatron.core.models.hybrid`).

HybridModel builds its stack from a layer pattern, one symbol a layer: "*" attention,
"-" MLP ("M" Mamba, "E" MoE, ... come from its own spec). `get_fox_hybrid_stack_spec`
gives "*" the FoX attention half of a FoX layer and "-" its MLP half, so the pattern
"*-" * N is the FoX GPTModel of N layers (`megatron_fox.checkpoint.gpt_to_hybrid_names`
maps its weights).

Megatron's HybridStack builds its final norm with Transformer Engine only; `FoxHybridStack`
builds it from the spec's norm instead, so the stack also runs without TE (local linears).
"""

from __future__ import annotations

try:
    from megatron.core.models.hybrid.hybrid_block import HybridStack, HybridStackSubmodules
    from megatron.core.ssm.mlp_layer import MLPLayer
except ImportError as e:  # megatron-core <= 0.16 has no HybridModel
    import megatron.core

    raise ImportError(f"megatron_fox.layers.hybrid needs megatron-core with HybridModel (>= 0.17); "
                      f"installed: {megatron.core.__version__}") from e
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

from .spec import fox_attention_submodules, fox_mlp_submodules, fox_modules


class FoxHybridStack(HybridStack):
    """Megatron's HybridStack whose final norm is `final_norm` (the FoX layers' norm class)
    instead of a hard-wired Transformer Engine norm."""

    def __init__(self, config, submodules, *args, final_norm=None, post_layer_norm: bool = True, **kwargs):
        super().__init__(config, submodules, *args, post_layer_norm=False, **kwargs)
        self.post_layer_norm = post_layer_norm
        if self.post_process and post_layer_norm:
            self.final_norm = final_norm(config=config, hidden_size=config.hidden_size, eps=config.layernorm_epsilon)


def get_fox_hybrid_stack_spec(transformer_impl: str = "auto") -> ModuleSpec:
    """HybridModel's `hybrid_stack_spec` with FoX attention for "*" and the FoX MLP for "-"
    (transformer_impl as in `get_fox_layer_spec`)."""
    attention = ModuleSpec(module=TransformerLayer,
                           submodules=TransformerLayerSubmodules(**fox_attention_submodules(transformer_impl)))
    mlp = ModuleSpec(module=MLPLayer, submodules=TransformerLayerSubmodules(**fox_mlp_submodules(transformer_impl)))
    return ModuleSpec(module=FoxHybridStack,
                      submodules=HybridStackSubmodules(attention_layer=attention, mlp_layer=mlp),
                      params={"final_norm": fox_modules(transformer_impl)[2]})
