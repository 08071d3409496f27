"""Token generation with a FoX GPTModel (or a HybridModel of FoX attention and MLP
layers): prompt through the training op, then one token at a time over the per-layer
caches, with ACP-based cache eviction.

Walks the model's own modules (embedding, each TransformerLayer's norms, FoX attention and
MLP, final norm, output layer) instead of Megatron's inference engine, so it works the same
on every megatron-core release the training supports. One process, TP = PP = CP = 1.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from ..layers.context_pruning import set_context_pruning_state
from ..ops.forgetting_attn.common import pruning_threshold
from .cache import InferenceCache


def _unwrap(model):
    while hasattr(model, "module") and not hasattr(model, "decoder"):
        model = model.module
    return model


class FoxGenerator:
    """Greedy or sampled generation.

    model: a FoX `GPTModel` (possibly wrapped by DDP/Float16Module), whole on this rank.
    max_length: the longest prompt + generation; it sets ACP's log L term, so eviction is
        exact for every sequence up to this length.
    evict_log_eps: evict cached keys whose softmax weight ACP bounds by exp(this) per row
        (the bound needs QK-norm); None keeps every key (exact decoding).
    context_pruning_alpha: a model trained with learned context pruning drops the keys its
        layers decide to drop, by the sparse sigmoid of this alpha; inf (default) makes the
        decisions hard (keep iff the score is > 0), as the method's authors decode; the
        training's final alpha reproduces the training forward exactly.
    """

    def __init__(self, model, max_length: int, evict_log_eps: Optional[float] = -10.0,
                 context_pruning_alpha: float = math.inf):
        self.model = _unwrap(model)
        self.layers = list(getattr(getattr(self.model, "decoder", None), "layers", []))
        # per layer (holds FoX attention, holds an MLP): a GPTModel layer both, a HybridModel layer one
        self.kinds = [(_is_attention(layer), _is_mlp(layer)) for layer in self.layers]
        if not any(a for a, _ in self.kinds) or not all(a or m for a, m in self.kinds):
            raise ValueError(f"model: generation walks FoX attention and MLP layers (a FoX GPTModel, or a "
                             f"HybridModel of '*' and '-'), got {type(self.model).__name__}")
        self.attention_layers = [layer for layer, (a, _) in zip(self.layers, self.kinds) if a]
        decoder = self.model.decoder
        self.final_norm = decoder.final_layernorm if hasattr(decoder, "final_layernorm") else decoder.final_norm
        cfg = self.model.config
        if not getattr(cfg, "fox_forget_gate", True) or getattr(self.model, "position_embedding_type", "none") != "none":
            raise ValueError("fox_forget_gate / position_embedding_type: cached decoding runs FoX models without "
                             "position embeddings (the forget gate's prefix sums are the cache's positions), not "
                             "the Transformer baseline or rope")
        for key in ("tensor_model_parallel_size", "pipeline_model_parallel_size", "context_parallel_size"):
            if getattr(cfg, key, 1) != 1:
                raise ValueError(f"generation runs with {key} = 1, got {getattr(cfg, key)}")
        if max_length < 1:
            raise ValueError(f"max_length must be >= 1, got {max_length}")
        if evict_log_eps is not None and (evict_log_eps > 0 or not cfg.fox_qk_norm):
            raise ValueError("evict_log_eps must be <= 0 and needs a model with fox_qk_norm "
                             "(the eviction bound comes from the QK-norm weights); use None to keep every key")
        self.max_length = max_length
        self.evict_log_eps = evict_log_eps
        if not context_pruning_alpha >= 1:
            raise ValueError(f"context_pruning_alpha must be >= 1, got {context_pruning_alpha}")
        self.context_pruning_alpha = context_pruning_alpha
        set_context_pruning_state(self.model, alpha=context_pruning_alpha)

    def new_cache(self) -> InferenceCache:
        """One cache per FoX attention layer."""
        thresholds = None
        if self.evict_log_eps is not None:
            thresholds = [pruning_threshold(layer.self_attention.qk_norm_logit_bound(), self.max_length,
                                            self.evict_log_eps) for layer in self.attention_layers]
        return InferenceCache(len(self.attention_layers), thresholds)

    @torch.no_grad()
    def forward(self, tokens: torch.Tensor, cache: InferenceCache) -> torch.Tensor:
        """tokens [b, s] following what `cache` holds -> logits [b, s, vocab] float32."""
        if cache.tokens + tokens.shape[1] > self.max_length:
            raise ValueError(f"sequence would reach {cache.tokens + tokens.shape[1]} tokens, past max_length "
                             f"{self.max_length}")
        m = self.model
        x = m.embedding(input_ids=tokens, position_ids=None)  # [s, b, h]
        caches = iter(cache.layers)
        for layer, (attention, mlp) in zip(self.layers, self.kinds):
            if attention:
                out, bias = layer.self_attention.infer(layer.input_layernorm(x), next(caches))
                x = x + (out if bias is None else out + bias)
            if mlp:
                out, bias = layer.mlp(layer.pre_mlp_layernorm(x))
                x = x + (out if bias is None else out + bias)
        x = self.final_norm(x)
        weight = m.shared_embedding_or_output_weight() if m.share_embeddings_and_output_weights else None
        logits, _ = m.output_layer(x, weight=weight)
        cache.tokens += tokens.shape[1]
        return logits.transpose(0, 1).float()

    @torch.no_grad()
    def generate(self, prompt: torch.Tensor, max_new_tokens: int, *, temperature: float = 0.0,
                 top_k: Optional[int] = None, top_p: Optional[float] = None, eod: Optional[int] = None,
                 generator: Optional[torch.Generator] = None) -> tuple[torch.Tensor, InferenceCache]:
        """prompt [b, s] int64 -> ([b, s + n] tokens, the cache). temperature 0: greedy;
        else sampling at that temperature from the top_k most likely tokens and/or the
        smallest set of them whose probability reaches top_p (nucleus). Stops early once
        every sequence has produced `eod`."""
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        if temperature < 0 or not math.isfinite(temperature):
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        if top_k is not None and top_k < 1:
            raise ValueError(f"top_k must be None or >= 1, got {top_k}")
        if top_p is not None and not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p must be None or in (0, 1], got {top_p}")
        self.model.eval()
        cache = self.new_cache()
        out = prompt
        done = torch.zeros(prompt.shape[0], dtype=torch.bool, device=prompt.device)
        logits = self.forward(prompt, cache)[:, -1]
        for _ in range(max_new_tokens):
            nxt = _sample(logits, temperature, top_k, top_p, generator)
            if eod is not None:
                nxt = torch.where(done, torch.full_like(nxt, eod), nxt)
                done |= nxt == eod
            out = torch.cat([out, nxt[:, None]], dim=1)
            if eod is not None and bool(done.all()):
                break
            if out.shape[1] >= self.max_length:
                break
            logits = self.forward(nxt[:, None], cache)[:, -1]
        return out, cache


def _is_attention(layer) -> bool:
    """The layer holds FoX attention (what decoding keeps a cache for)."""
    return hasattr(getattr(layer, "self_attention", None), "infer")


def _is_mlp(layer) -> bool:
    """The layer holds an MLP: a dense one or Megatron-Core's MoELayer (its experts)."""
    mlp = getattr(layer, "mlp", None)
    return hasattr(mlp, "linear_fc1") or hasattr(mlp, "experts")


def _sample(logits, temperature, top_k, top_p, generator):
    if temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(sampling_logits(logits / temperature, top_k, top_p), dim=-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


def sampling_logits(logits: torch.Tensor, top_k: Optional[int] = None, top_p: Optional[float] = None) -> torch.Tensor:
    """logits [b, V] with -inf outside the tokens sampling may draw: the top_k largest (ties
    at the k-th kept) and, of those, the most likely ones until their probability reaches
    top_p (the most likely token always stays)."""
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        before = probs.cumsum(-1) - probs
        drop_sorted = before >= top_p  # the probability of the tokens ahead already reaches top_p
        logits = logits.masked_fill(drop_sorted.scatter(-1, order, drop_sorted), float("-inf"))
    return logits
