"""Split a full (TP=1, PP=1) FoX GPTModel state dict into TP/PP shards and merge them back.

The layout rules of the local spec's parameters:
- column-parallel (split dim 0): linear_qkv (group-major, so a plain chunk), head_params.*,
  word embeddings, output_layer;
- row-parallel (split dim 1): linear_proj, linear_fc2;
- SwiGLU fc1 [gate; up]: each rank holds [its gate chunk; its up chunk];
- norms: replicated.
Pipeline stages hold consecutive layers renumbered from 0 (`stage_layers`: L/PP each, or
Megatron's uneven splits: a given count on the first and/or last stage, or the embedding and
loss counted as layers); the first holds
the embedding, the last the final norm and output layer. With expert parallelism (EP) rank e
holds experts [e*E/EP, (e+1)*E/EP) of each Mixture-of-Experts layer, renumbered from 0
(`mlp.experts.local_experts.i`); the experts' tensors split over TP like the dense MLP's.
"""

from __future__ import annotations

import re
from typing import Optional

import torch

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.*)$")
_EXPERT = re.compile(r"^(.*\.mlp\.experts\.local_experts\.)(\d+)(\..*)$")


def _tp_rule(name: str) -> str:
    if name.endswith("_extra_state"):
        return "skip"
    if "linear_fc1.weight" in name:
        return "glu"
    if "linear_proj.weight" in name or "linear_fc2.weight" in name:
        return "row"
    if ("linear_qkv.weight" in name or ".head_params." in name or "word_embeddings.weight" in name
            or name.startswith("output_layer.weight")):
        return "col"
    return "replicated"


def _split(t: torch.Tensor, rule: str, rank: int, size: int) -> torch.Tensor:
    if rule == "col":
        return t.chunk(size, dim=0)[rank].clone()
    if rule == "row":
        return t.chunk(size, dim=1)[rank].clone()
    if rule == "glu":
        gate, up = t.chunk(2, dim=0)
        return torch.cat([gate.chunk(size, dim=0)[rank], up.chunk(size, dim=0)[rank]], dim=0)
    return t.clone()


def _merge(parts: list[torch.Tensor], rule: str) -> torch.Tensor:
    if rule == "col":
        return torch.cat(parts, dim=0)
    if rule == "row":
        return torch.cat(parts, dim=1)
    if rule == "glu":
        halves = [p.chunk(2, dim=0) for p in parts]
        return torch.cat([torch.cat([h[0] for h in halves]), torch.cat([h[1] for h in halves])], dim=0)
    return parts[0]


def stage_layers(num_layers: int, pp_size: int, first: Optional[int] = None, last: Optional[int] = None,
                 embedding: bool = False, loss: bool = False) -> list[tuple[int, int]]:
    """[lo, hi) of the decoder layers each pipeline stage holds, as Megatron-Core builds them
    (get_num_layers_to_build / get_transformer_layer_offset): `first` layers on stage 0 and
    `last` on the last stage where given, the rest split evenly over the other stages; or,
    with `embedding` / `loss` (account_for_embedding/loss_in_pipeline_split), the embedding
    and the loss counted as one layer each of an even split, so stage 0 / the last stage
    build one layer less. Raises ValueError naming the Megatron-LM key where the layers do
    not split so, or a stage would be empty."""
    if (embedding or loss) and (first is not None or last is not None):
        raise ValueError("account_for_embedding_in_pipeline_split: not with decoder_first/last_pipeline_num_layers "
                         "(as Megatron-Core)")
    if embedding or loss:
        per = (num_layers + embedding + loss) // pp_size
        if per * pp_size != num_layers + embedding + loss:
            raise ValueError(f"num_layers: {num_layers} layers plus the embedding and/or loss do not split into "
                             f"{pp_size} equal pipeline stages")
        first, last = (per - 1 if embedding else None), (per - 1 if loss else None)
    keys = {0: "account_for_embedding_in_pipeline_split" if embedding else "decoder_first_pipeline_num_layers",
            pp_size - 1: "account_for_loss_in_pipeline_split" if loss else "decoder_last_pipeline_num_layers"}
    fixed = {0: first, pp_size - 1: last} if pp_size > 1 else {}
    given = {stage: n for stage, n in fixed.items() if n is not None}
    for stage, n in given.items():
        if n < 1:
            raise ValueError(f"{keys[stage]}: the {'first' if stage == 0 else 'last'} pipeline stage would hold {n} "
                             f"layers (at least 1)")
    rest, middle = num_layers - sum(given.values()), pp_size - len(given)
    if (middle == 0 and rest != 0) or (middle and (rest < middle or rest % middle)):
        what = " and ".join(keys[stage] for stage in given) or "pipeline_model_parallel_size"
        raise ValueError(f"num_layers: {num_layers} layers less the {sum(given.values())} of {what} do not split "
                         f"into {middle} equal non-empty pipeline stage(s)")
    counts = [given.get(stage, rest // middle if middle else 0) for stage in range(pp_size)]
    bounds = [sum(counts[:stage]) for stage in range(pp_size + 1)]
    return list(zip(bounds[:-1], bounds[1:]))


def global_name(name: str, layer_offset: int = 0, ep_rank: int = 0, local_experts: int = 0) -> str:
    """Name of a stage-local parameter in the full model (layer index shifted by the stage's
    first layer, `stage_layers`; an expert's index by ep_rank * local_experts, the experts
    each expert-parallel rank holds)."""
    e = _EXPERT.match(name)
    if e and ep_rank:
        name = f"{e.group(1)}{int(e.group(2)) + ep_rank * local_experts}{e.group(3)}"
    m = _LAYER.match(name)
    if not m:
        return name
    return f"decoder.layers.{int(m.group(1)) + layer_offset}.{m.group(2)}"


def num_experts_in(state: dict) -> int:
    """Experts per MoE layer in a full state dict (0: a dense model)."""
    indices = [int(m.group(2)) for m in map(_EXPERT.match, state) if m]
    return 1 + max(indices) if indices else 0


def expert_shard(full: dict, ep_rank: int, ep_size: int) -> dict:
    """Expert-parallel rank ep_rank's part of a full state dict: its experts renumbered
    from 0, every other tensor as it is."""
    if ep_size == 1:
        return dict(full)
    experts = num_experts_in(full)
    if experts % ep_size:
        raise ValueError(f"expert_model_parallel_size: {ep_size} does not divide the checkpoint's {experts} experts")
    local = experts // ep_size
    out = {}
    for name, t in full.items():
        e = _EXPERT.match(name)
        if e:
            i = int(e.group(2)) - ep_rank * local
            if not 0 <= i < local:
                continue
            name = f"{e.group(1)}{i}{e.group(3)}"
        out[name] = t
    return out


def merge_expert_shards(parts: list[dict]) -> dict:
    """Inverse of `expert_shard`: parts[e] the state dict of expert-parallel rank e (same TP
    and PP rank); the experts renamed to their global indices, the rest taken from rank 0."""
    local = num_experts_in(parts[0])
    out = {}
    for e, part in enumerate(parts):
        for name, t in part.items():
            if _EXPERT.match(name):
                out[global_name(name, 0, e, local)] = t
            elif e == 0:
                out[name] = t
    return out


def full_shape(name: str, local_shape, tp_size: int) -> tuple:
    """Shape of the full (TP=1) tensor of a TP shard."""
    shape = list(local_shape)
    rule = _tp_rule(name)
    if rule in ("col", "glu"):
        shape[0] *= tp_size
    elif rule == "row":
        shape[1] *= tp_size
    return tuple(shape)


def split_tensor(name: str, full: torch.Tensor, tp_rank: int, tp_size: int) -> torch.Tensor:
    """This TP rank's shard of the full tensor of parameter `name`."""
    return _split(full, _tp_rule(name), tp_rank, tp_size)


def shard_state_dict(full: dict, num_layers: int, tp_rank: int = 0, tp_size: int = 1,
                     pp_rank: int = 0, pp_size: int = 1, ep_rank: int = 0, ep_size: int = 1,
                     stages: Optional[list] = None) -> dict:
    """This (tp_rank, pp_rank, ep_rank)'s part of a full state dict (tensors; _extra_state
    dropped). stages: each stage's [lo, hi) layers (`stage_layers`; default an even split)."""
    lo, hi = (stages or stage_layers(num_layers, pp_size))[pp_rank]
    out = {}
    for name, t in expert_shard(full, ep_rank, ep_size).items():
        rule = _tp_rule(name)
        if rule == "skip":
            continue
        m = _LAYER.match(name)
        if m:
            layer = int(m.group(1))
            if not lo <= layer < hi:
                continue
            name = f"decoder.layers.{layer - lo}.{m.group(2)}"
        elif name.startswith("embedding.") and pp_rank != 0:
            continue
        elif (name.startswith("output_layer.") or name.startswith("decoder.final_layernorm")) and pp_rank != pp_size - 1:
            continue
        out[name] = _split(t, rule, tp_rank, tp_size)
    return out


def merge_state_dicts(shards: dict, num_layers: int, tp_size: int, pp_size: int,
                      stages: Optional[list] = None) -> dict:
    """Inverse of shard_state_dict. shards[(tp_rank, pp_rank)] = that rank's dict; stages as
    there."""
    stages = stages or stage_layers(num_layers, pp_size)
    full = {}
    for pp in range(pp_size):
        names = shards[(0, pp)].keys()
        for name in names:
            rule = _tp_rule(name)
            if rule == "skip":
                continue
            merged = _merge([shards[(tp, pp)][name] for tp in range(tp_size)], rule)
            full[global_name(name, stages[pp][0])] = merged
    return full


_MLP_HALF = ("pre_mlp_layernorm.", "mlp.")


def gpt_to_hybrid_names(state: dict) -> dict:
    """A FoX GPTModel state dict in HybridModel's names for the pattern "*-" * N: layer i's
    norm and attention go to layer 2i ("*"), its pre-MLP norm and MLP to 2i + 1 ("-"), the
    final norm from decoder.final_layernorm to decoder.final_norm; the rest is unchanged."""
    out = {}
    for name, value in state.items():
        m = _LAYER.match(name)
        if m:
            i, rest = int(m.group(1)), m.group(2)
            name = f"decoder.layers.{2 * i + rest.startswith(_MLP_HALF)}.{rest}"
        elif name.startswith("decoder.final_layernorm."):
            name = "decoder.final_norm." + name[len("decoder.final_layernorm."):]
        out[name] = value
    return out


def hybrid_to_gpt_names(state: dict) -> dict:
    """Inverse of `gpt_to_hybrid_names`: a HybridModel "*-" * N state dict in the FoX
    GPTModel's names (the full-state-dict format of --pretrained-checkpoint and to-public).
    Raises ValueError where a layer is not where that pattern puts it."""
    out = {}
    for name, value in state.items():
        m = _LAYER.match(name)
        if m:
            j, rest = int(m.group(1)), m.group(2)
            if j % 2 != rest.startswith(_MLP_HALF):
                raise ValueError(f"hybrid_layer_pattern: {name} is not where the pattern '*-' * N puts it "
                                 f"(attention at even layers, MLP at odd ones)")
            name = f"decoder.layers.{j // 2}.{rest}"
        elif name.startswith("decoder.final_norm."):
            name = "decoder.final_layernorm." + name[len("decoder.final_norm."):]
        out[name] = value
    return out
