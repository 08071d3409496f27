"""Conversion between the public FoX code's Hugging Face state dict
(`zhixuan-lin/forgetting-transformer`, e.g. fox-pro-760m-longcrawl64-48b) and the full
(TP = PP = 1) state dict of megatron_fox's GPTModel.

Public names, per layer `model.layers.{i}.`: attn_norm, attn.q_proj, attn.{k,v}_proj.linear
and .shift_proj (with the KV-shift; plain attn.{k,v}_proj without), attn.fgate_proj (weight
and bias), attn.ogate_proj, attn.output_norm, attn.q_norm / attn.k_norm ([hidden], or
[head_dim] when shared across heads, as in the released checkpoints), attn.o_proj,
mlp_norm, mlp.gate_proj ([gate; up]), mlp.down_proj; then model.embeddings, model.norm,
lm_head. Ours: linear_qkv packs, per key/value group, [q | k | v | forget-gate logits |
output-gate logits | k and v shift logits | zero padding] (`layers.qkv_layout`); the
forget-gate bias and the per-head norm weights live in head_params.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..layers.qkv_layout import fused_qkv_sizes


@dataclass(frozen=True)
class FoxLayout:
    """The model shape and FoX-Pro options the conversion needs."""

    num_layers: int
    heads: int
    groups: int
    head_dim: int
    output_gate: bool = True
    output_norm: bool = True
    qk_norm: bool = True
    kv_shift: bool = True
    tied: bool = False

    def qkv_sizes(self) -> list:
        """Our linear_qkv's parts per group, the padding last (`layers.qkv_layout`)."""
        return fused_qkv_sizes(self.heads // self.groups, self.head_dim, True, self.output_gate, self.kv_shift)

    @classmethod
    def from_args(cls, args) -> "FoxLayout":
        """From megatron_fox training arguments."""
        return cls(args.num_layers, args.num_attention_heads, args.num_query_groups or args.num_attention_heads,
                   args.kv_channels or args.hidden_size // args.num_attention_heads, args.fox_output_gate,
                   args.fox_output_norm, args.fox_qk_norm, args.fox_kv_shift,
                   not args.untie_embeddings_and_output_weights)


# Per-layer tensors that only change name (public, ours); SwiGLU fc1 is [gate; up] in both.
_SAME_TENSOR = (("attn.o_proj.weight", "self_attention.linear_proj.weight"),
                ("attn_norm.weight", "input_layernorm.weight"),
                ("mlp_norm.weight", "pre_mlp_layernorm.weight"),
                ("mlp.gate_proj.weight", "mlp.linear_fc1.weight"),
                ("mlp.down_proj.weight", "mlp.linear_fc2.weight"))


def _take(state: dict, name: str) -> torch.Tensor:
    if name not in state:
        raise KeyError(f"public FoX checkpoint has no '{name}' (does the model config match its options?)")
    return state.pop(name)


def _per_head(w: torch.Tensor, heads: int, head_dim: int, name: str) -> torch.Tensor:
    """A norm weight [heads * head_dim] or shared [head_dim] -> [heads, head_dim]."""
    if w.numel() == head_dim:
        return w.reshape(1, head_dim).expand(heads, head_dim).clone()
    if w.numel() != heads * head_dim:
        raise ValueError(f"{name}: expected {heads * head_dim} or {head_dim} values, got {tuple(w.shape)}")
    return w.reshape(heads, head_dim).clone()


def from_public_fox(public: dict, layout: FoxLayout) -> dict:
    """Public FoX state dict -> megatron_fox full state dict. Raises KeyError for a missing
    tensor and ValueError for tensors left over (options that do not match)."""
    src = dict(public)
    L, H, G, d = layout.num_layers, layout.heads, layout.groups, layout.head_dim
    hpg = H // G
    out = {"embedding.word_embeddings.weight": _take(src, "model.embeddings.weight"),
           "decoder.final_layernorm.weight": _take(src, "model.norm.weight")}
    head = src.pop("lm_head.weight", None)
    if not layout.tied:
        if head is None:
            raise KeyError("public FoX checkpoint has no 'lm_head.weight' (untied embeddings expected)")
        out["output_layer.weight"] = head
    for i in range(L):
        p, q_ = f"model.layers.{i}.", f"decoder.layers.{i}."
        shifted = ".linear" if layout.kv_shift else ""
        hidden = out["embedding.word_embeddings.weight"].shape[1]
        wq = _take(src, p + "attn.q_proj.weight").reshape(G, hpg * d, hidden)
        wk = _take(src, p + f"attn.k_proj{shifted}.weight").reshape(G, d, hidden)
        wv = _take(src, p + f"attn.v_proj{shifted}.weight").reshape(G, d, hidden)
        wf = _take(src, p + "attn.fgate_proj.weight").reshape(G, hpg, hidden)
        parts = [wq, wk, wv, wf]
        if layout.output_gate:
            parts.append(_take(src, p + "attn.ogate_proj.weight").reshape(G, hpg * d, hidden))
        if layout.kv_shift:
            sk = _take(src, p + "attn.k_proj.shift_proj.weight").reshape(G, 1, hidden)
            sv = _take(src, p + "attn.v_proj.shift_proj.weight").reshape(G, 1, hidden)
            parts += [sk, sv]
        parts.append(wq.new_zeros(G, layout.qkv_sizes()[-1], hidden))
        out[q_ + "self_attention.linear_qkv.weight"] = torch.cat(parts, dim=1).reshape(-1, hidden)
        out[q_ + "self_attention.head_params.fgate_bias"] = _take(src, p + "attn.fgate_proj.bias")
        if layout.qk_norm:
            out[q_ + "self_attention.head_params.q_norm"] = _per_head(
                _take(src, p + "attn.q_norm.weight"), H, d, p + "attn.q_norm.weight")
            out[q_ + "self_attention.head_params.k_norm"] = _per_head(
                _take(src, p + "attn.k_norm.weight"), G, d, p + "attn.k_norm.weight")
        if layout.output_norm:
            out[q_ + "self_attention.head_params.output_norm"] = _per_head(
                _take(src, p + "attn.output_norm.weight"), H, d, p + "attn.output_norm.weight")
        for theirs, ours in _SAME_TENSOR:
            out[q_ + ours] = _take(src, p + theirs)
    if src:
        raise ValueError(f"public FoX checkpoint has tensors this layout does not use: {sorted(src)[:8]}")
    return out


def to_public_fox(state: dict, layout: FoxLayout, share_qk_norm: bool = False) -> dict:
    """megatron_fox full state dict -> public FoX state dict. share_qk_norm writes q_norm /
    k_norm as one [head_dim] vector (the released checkpoints' form; every head must hold
    the same weights)."""
    src = {k: v for k, v in state.items() if not k.endswith("_extra_state")}
    L, H, G, d = layout.num_layers, layout.heads, layout.groups, layout.head_dim
    emb = _take(src, "embedding.word_embeddings.weight")
    hidden = emb.shape[1]
    out = {"model.embeddings.weight": emb, "model.norm.weight": _take(src, "decoder.final_layernorm.weight")}
    out["lm_head.weight"] = emb.clone() if layout.tied else _take(src, "output_layer.weight")
    sizes = layout.qkv_sizes()
    if layout.kv_shift:  # the k and v shift rows apart
        sizes[-2:-1] = [1, 1]
    for i in range(L):
        p, q_ = f"model.layers.{i}.", f"decoder.layers.{i}."
        w = _take(src, q_ + "self_attention.linear_qkv.weight").reshape(G, sum(sizes), hidden)
        parts = list(torch.split(w, sizes, dim=1))[:-1]  # without the padding
        shifted = ".linear" if layout.kv_shift else ""
        out[p + "attn.q_proj.weight"] = parts.pop(0).reshape(H * d, hidden)
        out[p + f"attn.k_proj{shifted}.weight"] = parts.pop(0).reshape(G * d, hidden)
        out[p + f"attn.v_proj{shifted}.weight"] = parts.pop(0).reshape(G * d, hidden)
        out[p + "attn.fgate_proj.weight"] = parts.pop(0).reshape(H, hidden)
        if layout.output_gate:
            out[p + "attn.ogate_proj.weight"] = parts.pop(0).reshape(H * d, hidden)
        if layout.kv_shift:
            out[p + "attn.k_proj.shift_proj.weight"] = parts.pop(0).reshape(G, hidden)
            out[p + "attn.v_proj.shift_proj.weight"] = parts.pop(0).reshape(G, hidden)
        out[p + "attn.fgate_proj.bias"] = _take(src, q_ + "self_attention.head_params.fgate_bias")
        for ours, theirs in (("q_norm", "q_norm"), ("k_norm", "k_norm")):
            if not layout.qk_norm:
                break
            w = _take(src, q_ + f"self_attention.head_params.{ours}")
            if share_qk_norm:
                if not torch.equal(w, w[:1].expand_as(w)):
                    raise ValueError(f"{q_}self_attention.head_params.{ours}: heads differ, cannot share")
                w = w[0]
            out[p + f"attn.{theirs}.weight"] = w.reshape(-1).clone()
        if layout.output_norm:
            out[p + "attn.output_norm.weight"] = _take(src, q_ + "self_attention.head_params.output_norm").reshape(-1)
        for theirs, ours in _SAME_TENSOR:
            out[p + theirs] = _take(src, q_ + ours)
    if src:
        raise ValueError(f"state dict has tensors this layout does not use: {sorted(src)[:8]}")
    return out


def load_state_file(path: str) -> dict:
    """A state dict from a .safetensors / .bin / .pt file or a Hugging Face model folder
    (model.safetensors, pytorch_model.bin, or their sharded *.index.json forms)."""
    import json
    import os

    if os.path.isdir(path):
        for name in ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                     "pytorch_model.bin.index.json"):
            if os.path.exists(os.path.join(path, name)):
                return load_state_file(os.path.join(path, name))
        raise FileNotFoundError(f"{path}: no model.safetensors or pytorch_model.bin (or their index) inside")
    if path.endswith(".index.json"):
        with open(path) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
        state = {}
        for name in files:
            state.update(load_state_file(os.path.join(os.path.dirname(path), name)))
        return state
    if path.endswith(".safetensors"):
        try:
            from safetensors.torch import load_file
        except ImportError as e:
            raise ImportError(f"{path}: reading .safetensors needs the safetensors package "
                              "(pip install safetensors)") from e
        return load_file(path)
    state = torch.load(path, map_location="cpu", weights_only=True)
    return state.get("model", state) if isinstance(state, dict) else state
