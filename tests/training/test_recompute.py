"""--recompute-granularity full (Megatron's activation checkpointing) on the FoX model:
each layer's forward runs again in the backward, and the gradients are those of the run
that keeps every activation."""

import torch

from megatron_fox.training.cpu_compat import route_megatron_buffers_to_cpu

TINY = ["--num-layers", "4", "--hidden-size", "64", "--num-attention-heads", "4", "--num-query-groups", "2",
        "--ffn-hidden-size", "128", "--seq-length", "48", "--micro-batch-size", "2", "--global-batch-size", "2",
        "--vocab-size", "96", "--device", "cpu"]


def _run(flags, weights=None, pruning=None):
    """(loss, grads by name, core-attention forward calls) of one forward+backward; pruning:
    learned context pruning's (alpha, penalty weight)."""
    from megatron_fox.training.arguments import parse_args
    from megatron_fox.training.model import attention_layers, build_model, padded_vocab_size, transformer_config

    args = parse_args(TINY + flags)
    model = build_model(args, transformer_config(args, torch.device("cpu")), padded_vocab_size(96, args)).train()
    if weights is not None:
        model.load_state_dict(weights)
    if pruning is not None:
        from megatron_fox.layers.context_pruning import set_context_pruning_state

        set_context_pruning_state(model, alpha=pruning[0], penalty_weight=pruning[1])
    calls = []
    for layer in attention_layers(model):
        layer.register_forward_hook(lambda *_: calls.append(1))
    gen = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, 96, (2, 48), generator=gen)
    loss = model(tokens, None, None, labels=torch.roll(tokens, -1, 1)).mean()
    loss.backward()
    return loss.item(), {k: p.grad.clone() for k, p in model.named_parameters()}, len(calls), model.state_dict()


def test_recompute_repeats_forwards_and_keeps_gradients(megatron_world):
    """Each recompute layout (uniform chunks of 1 and 2 layers, the first 3 layers as a
    block) against one run that keeps every activation, from the same weights (one
    reference run for the three: the interpreter's attention is most of the time)."""
    route_megatron_buffers_to_cpu()
    loss, grads, calls, weights = _run([])
    assert calls == 4
    for method, n, expected_calls in (("uniform", 1, 8), ("uniform", 2, 8), ("block", 3, 7)):
        loss_r, grads_r, calls_r, _ = _run(["--recompute-granularity", "full", "--recompute-method", method,
                                           "--recompute-num-layers", str(n)], weights)
        assert calls_r == expected_calls, (method, n)  # block: the first 3 layers run twice, the last one once
        assert loss_r == loss, (method, n)
        for name, g in grads.items():
            torch.testing.assert_close(grads_r[name], g, rtol=1e-5, atol=1e-7, msg=f"{method} {n}: {name}")


def test_recompute_with_context_pruning_keeps_penalty_gradients(megatron_world):
    """Learned context pruning under full recompute: the penalty is attached in the recomputed
    forward only (the first runs without autograd), so the gradients, the penalty's in beta
    and the interaction projections included, are those of the run without recompute."""
    route_megatron_buffers_to_cpu()
    flags = ["--fox-context-pruning", "--fox-context-pruning-beta-init", "0.5"]
    loss, grads, _, weights = _run(flags, pruning=(1.5, 0.3))
    _, free, _, _ = _run(flags, weights, pruning=(1.5, 0.0))
    assert not torch.allclose(free["decoder.layers.0.self_attention.context_pruning.beta"],
                              grads["decoder.layers.0.self_attention.context_pruning.beta"])  # the penalty acts
    loss_r, grads_r, calls_r, _ = _run(flags + ["--recompute-granularity", "full", "--recompute-method", "uniform",
                                                "--recompute-num-layers", "1"], weights, pruning=(1.5, 0.3))
    assert calls_r == 8 and loss_r == loss
    for name, g in grads.items():
        torch.testing.assert_close(grads_r[name], g, rtol=1e-5, atol=1e-7, msg=name)
