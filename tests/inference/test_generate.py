"""Incremental decoding against the model's full forward pass, and ACP cache eviction."""

import pytest
import torch

from megatron_fox.inference import FoxGenerator

TINY = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4", "--num-query-groups", "2",
        "--ffn-hidden-size", "128", "--seq-length", "64", "--micro-batch-size", "1", "--global-batch-size", "1",
        "--vocab-size", "96", "--device", "cpu"]


def _model(*flags):
    from megatron_fox.training.arguments import parse_args
    from megatron_fox.training.model import build_model, padded_vocab_size, transformer_config

    args = parse_args(TINY + list(flags))
    model = build_model(args, transformer_config(args, torch.device("cpu")), padded_vocab_size(96, args))
    return model.eval()


def _full_logits(model, tokens):
    with torch.no_grad():
        return model(tokens, None, None).float()  # [b, s, vocab]


def _fast_forgetting(model, bias):
    with torch.no_grad():
        for layer in model.decoder.layers:
            layer.self_attention.head_params.fgate_bias.fill_(bias)


def _teacher_forced(gen, tokens, prompt_len, chunk_at=None):
    """Logits of every position: the prompt in one call, then one token per call (and, at
    chunk_at, three tokens in one call)."""
    cache = gen.new_cache()
    out = [gen.forward(tokens[:, :prompt_len], cache)]
    t = prompt_len
    while t < tokens.shape[1]:
        n = 3 if t == chunk_at else 1
        out.append(gen.forward(tokens[:, t:t + n], cache))
        t += n
    return torch.cat(out, dim=1), cache


@pytest.mark.parametrize("moe,gate", [(False, "data_dependent"), (True, "data_dependent"), (False, "alibi"),
                                      (False, "data_independent")], ids=["dense", "moe", "alibi", "data_independent"])
def test_decoding_equals_full_forward(megatron_world, moe, gate):
    """moe: a dense layer, then one with experts and a shared expert; the router takes each
    token on its own, so one token a call routes as the full forward does. gate: the forget
    gate's kind (the cache's prefix sums of a per-head constant log f for the other two)."""
    from megatron_fox.training.cpu_compat import route_megatron_buffers_to_cpu

    route_megatron_buffers_to_cpu()  # the router asks for the CUDA device
    model = _model("--no-acp", "--fox-forget-gate-type", gate,
                   *(["--num-experts", "4", "--moe-ffn-hidden-size", "32", "--moe-layer-freq", "[0,1]",
                      "--moe-shared-expert-intermediate-size", "16"] if moe else []))
    tokens = torch.randint(0, 96, (2, 40))
    gen = FoxGenerator(model, max_length=64, evict_log_eps=None)
    logits, cache = _teacher_forced(gen, tokens, prompt_len=17, chunk_at=25)
    full = _full_logits(model, tokens)
    assert logits.shape == full.shape
    err = (logits - full).abs().max().item()
    assert err <= 1e-4 * full.abs().max().item(), err
    assert cache.cached_keys() == [40, 40] and cache.evicted_keys() == [0, 0] and cache.tokens == 40


def test_eviction_keeps_the_cache_small_within_eps(megatron_world):
    model = _model("--no-acp")
    _fast_forgetting(model, -3.0)  # log f ~ -3 a token: old keys fall behind the threshold fast
    tokens = torch.randint(0, 96, (1, 60))
    exact, _ = _teacher_forced(FoxGenerator(model, 64, evict_log_eps=None), tokens, prompt_len=20)
    gen = FoxGenerator(model, 64, evict_log_eps=-10.0)
    evicting, cache = _teacher_forced(gen, tokens, prompt_len=20)
    # threshold delta = -(2U + log 64) - 10 with U = sqrt(16) (unit QK-norm weights) = -22.2;
    # log f <= logsigmoid(-3 + |logit|): a key leaves after a few dozen tokens at most
    assert all(n < 40 for n in cache.cached_keys()), cache.cached_keys()
    assert all(n > 20 for n in cache.evicted_keys()), cache.evicted_keys()
    err = (evicting - exact).abs().max().item()
    assert err <= 1e-3 * exact.abs().max().item(), err


def test_eviction_rule_is_exact_for_every_later_query(megatron_world):
    """Every evicted key is pruned (c_t - c_j < delta) for each head at the evicting step,
    hence for all later queries: checked on the prefix sums the cache saw."""
    model = _model("--no-acp")
    _fast_forgetting(model, -2.0)
    gen = FoxGenerator(model, 64, evict_log_eps=-10.0)
    tokens = torch.randint(0, 96, (1, 50))
    cache = gen.new_cache()
    gen.forward(tokens[:, :5], cache)
    for t in range(5, 50):
        layer = cache.layers[0]
        before = layer.c.clone() if layer.c is not None else None
        gen.forward(tokens[:, t:t + 1], cache)
        gone = before.shape[-1] + 1 - layer.length  # keys evicted this step
        if gone:
            gap = layer.c_last[..., None] - before[..., :gone]  # [b, heads, gone]
            assert (gap < layer.delta[None, :, None]).all()


def test_generate_greedy_follows_argmax(megatron_world):
    model = _model("--no-acp")
    prompt = torch.randint(0, 96, (2, 12))
    out, cache = FoxGenerator(model, 64, evict_log_eps=None).generate(prompt, 10)
    assert out.shape == (2, 22) and torch.equal(out[:, :12], prompt)
    full = _full_logits(model, out)
    assert torch.equal(out[:, 12:], full[:, 11:-1].argmax(-1))


def test_bad_arguments(megatron_world):
    model = _model("--no-acp")
    with pytest.raises(ValueError, match="max_length"):
        FoxGenerator(model, 0)
    gen = FoxGenerator(model, 16, evict_log_eps=None)
    with pytest.raises(ValueError, match="max_length"):
        gen.generate(torch.zeros(1, 20, dtype=torch.long), 1)
    with pytest.raises(ValueError, match="temperature"):
        gen.generate(torch.zeros(1, 4, dtype=torch.long), 1, temperature=-1.0)
    for top_p in (0.0, 1.5):
        with pytest.raises(ValueError, match="top_p"):
            gen.generate(torch.zeros(1, 4, dtype=torch.long), 1, temperature=1.0, top_p=top_p)
    with pytest.raises(ValueError, match="fox_qk_norm"):
        FoxGenerator(_model("--no-acp", "--no-fox-qk-norm"), 16, evict_log_eps=-10.0)
    with pytest.raises(ValueError, match="model: .*Linear"):
        FoxGenerator(torch.nn.Linear(4, 4), 16)
    model.decoder.layers[1].mlp = torch.nn.Identity()  # a layer without its MLP still decodes its attention
    assert len(FoxGenerator(model, 16, evict_log_eps=None).attention_layers) == 2


def test_sampling_logits_top_k_and_nucleus():
    """The tokens sampling may draw, on probabilities worked out by hand: 0.5, 0.25, 0.15,
    0.1 (shuffled). top_p 0.7 keeps the first two (0.5 < 0.7 <= 0.75), 0.74 the same, 0.76
    three, 0.4 only the first; top_k 3 then top_p 0.9 keeps three; and draws stay inside."""
    from megatron_fox.inference.generate import sampling_logits

    probs = torch.tensor([[0.15, 0.5, 0.1, 0.25]])
    logits = probs.log() + 3.0  # any shift
    for top_k, top_p, kept in ((None, 0.7, {1, 3}), (None, 0.74, {1, 3}), (None, 0.76, {0, 1, 3}), (None, 0.4, {1}),
                               (3, 0.9, {0, 1, 3}), (2, None, {1, 3}), (None, 1.0, {0, 1, 2, 3})):
        out = sampling_logits(logits, top_k, top_p)
        assert set(torch.isfinite(out[0]).nonzero()[:, 0].tolist()) == kept, (top_k, top_p)
        assert torch.equal(out[0, sorted(kept)], logits[0, sorted(kept)])  # kept logits unchanged
    g = torch.Generator().manual_seed(0)
    draws = torch.multinomial(torch.softmax(sampling_logits(logits.expand(400, 4), None, 0.7), -1), 1, generator=g)
    assert set(draws[:, 0].tolist()) == {1, 3}


def test_layer_cache_appends_and_evicts_like_a_list():
    from megatron_fox.inference import LayerCache

    cache = LayerCache(delta=torch.tensor([-1.0, -2.0]))
    keys, vals, cs = [], [], []
    c_now = torch.zeros(1, 2)
    for step in range(60):
        n = 5 if step == 0 else 1 + step % 3
        k, v = torch.randn(1, n, 1, 4), torch.randn(1, n, 1, 4)
        c = c_now[..., None] - 0.3 * torch.arange(1, n + 1)  # non-increasing prefix sums
        c_now = c[..., -1]
        cache.append(k, v, c)
        cache.c_last = c_now
        keys += list(k.unbind(1))
        vals += list(v.unbind(1))
        cs += list(c.unbind(-1))
        gone = cache.evict_pruned()
        # the rule by hand: leading keys with c_now - c_j < delta for both heads
        expect = 0
        while expect < len(cs) - 1 and bool(((c_now - cs[expect]) < torch.tensor([-1.0, -2.0])).all()):
            expect += 1
        assert gone == expect
        keys, vals, cs = keys[gone:], vals[gone:], cs[gone:]
        assert cache.length == len(keys)
        assert torch.equal(cache.k, torch.stack(keys, 1)) and torch.equal(cache.v, torch.stack(vals, 1))
        assert torch.equal(cache.c, torch.stack(cs, -1))
    assert cache.evicted > 0


def _pruning_model(beta):
    model = _model("--no-acp", "--fox-context-pruning", "--fox-context-pruning-dim", "16",
                   "--fox-context-pruning-beta-init", str(beta))
    with torch.no_grad():  # interaction weights large enough for scores on both sides of 0
        for layer in model.decoder.layers:
            layer.self_attention.context_pruning.q_int.normal_(0, 0.5)
            layer.self_attention.context_pruning.k_int.normal_(0, 0.5)
    return model


@pytest.mark.parametrize("alpha", [1.5, float("inf")])
def test_context_pruning_decoding_equals_full_forward(megatron_world, alpha):
    """Learned context pruning: the cache's keep weights (products of the later tokens'
    decisions, updated token by token, dropped keys packed out) give the logits of the
    model's full forward with the materialised mask."""
    from megatron_fox.layers.context_pruning import set_context_pruning_state

    model = _pruning_model(0.5)
    tokens = torch.randint(0, 96, (2, 48))
    gen = FoxGenerator(model, max_length=64, evict_log_eps=None, context_pruning_alpha=alpha)
    logits, cache = _teacher_forced(gen, tokens, prompt_len=9, chunk_at=20)
    set_context_pruning_state(model, alpha=alpha)
    full = _full_logits(model, tokens)
    err = (logits - full).abs().max().item()
    assert err <= 1e-4 * full.abs().max().item(), err
    assert all(d > 0 for d in cache.dropped_keys()), cache.dropped_keys()  # keys really left the cache
    assert all(n + d == 48 for n, d in zip(cache.cached_keys(), cache.dropped_keys()))
    kept = [layer.self_attention.context_pruning.last_kept_fraction for layer in model.decoder.layers]
    assert all(0.0 < float(f) < 1.0 for f in kept), kept
    # a different alpha is a different model: the check above can fail
    set_context_pruning_state(model, alpha=1.0)
    assert (_full_logits(model, tokens) - full).abs().max().item() > 1e-3


def test_context_pruning_bad_alpha(megatron_world):
    with pytest.raises(ValueError, match="context_pruning_alpha"):
        FoxGenerator(_pruning_model(0.5), 64, evict_log_eps=None, context_pruning_alpha=0.5)
