"""Mixture-of-Experts MLPs (--num-experts): Megatron-Core's MoELayer in the FoX layers on
the CPU engine. The load-balancing loss's gradient is checked against the Switch
Transformer formula computed here from the routers' inputs; --moe-layer-freq and shared
experts build the layers asked for; DP, TP+SP, CP, PP and expert-parallel layouts give one
process's losses and logged balance; a run resumes exactly; expert-parallel checkpoints
resume, export and load whole weights; bad keys are named."""

import math
import os

import pytest
import torch
import torch.nn.functional as F

from megatron_fox.training.arguments import ConfigError, parse_args
from megatron_fox.training.cpu_compat import route_megatron_buffers_to_cpu

from .test_train import TINY, train

MOE = ["--num-experts", "4", "--moe-ffn-hidden-size", "64", "--moe-router-topk", "2"]


def _switch_aux_loss(x: torch.Tensor, weight: torch.Tensor, topk: int) -> torch.Tensor:
    """E * sum_e f_e * P_e (Switch Transformer eq. 4, top-k as in GShard) of one micro-batch's
    router inputs x [T, h]: f_e the share of the T * topk assignments going to expert e,
    P_e the mean over tokens of the softmax over all experts."""
    logits = x.double() @ weight.double().t()
    experts = logits.shape[1]
    chosen = torch.nn.functional.one_hot(logits.topk(topk, dim=1).indices, experts).sum(dim=(0, 1)).double()
    return experts * (chosen / (x.shape[0] * topk) * logits.softmax(dim=1).mean(dim=0)).sum()


def _random_batches(eod: int) -> list[dict]:
    """2 micro-batches of 2 random sequences of 24 tokens (the trainer's collated form)."""
    from megatron_fox.training.step import collate, with_documents

    batches = []
    for _ in range(2):
        tokens = torch.randint(0, eod, (2, 25))
        samples = [{"tokens": t[:-1], "labels": t[1:], "loss_mask": torch.ones(24), "position_ids": torch.arange(24)}
                   for t in tokens]
        batches.append(with_documents(collate(samples), eod))
    return batches


def test_aux_loss_gradient_is_the_token_weighted_switch_loss(megatron_world):
    """Every parameter's gradient from the engine (Megatron's router adding its balancing
    loss with coefficient c) equals autograd of the mean token loss plus c times each
    layer's and micro-batch's load-balancing loss computed here from the routers' inputs,
    weighted by the micro-batch's share of the global batch's tokens (as Megatron's
    schedule scales them); the logged value of each layer is its mean over the micro-batches."""
    from megatron_fox.training.model import build_model, padded_vocab_size, transformer_config
    from megatron_fox.training.step import model_forward, moe_load_balancing_losses
    from megatron_fox.training.torch_engine import TorchEngine

    route_megatron_buffers_to_cpu()
    coeff, hidden, eod = 0.5, 32, 63
    args = parse_args(["--num-layers", "2", "--hidden-size", str(hidden), "--num-attention-heads", "2",
                       "--ffn-hidden-size", "64", "--seq-length", "24", "--micro-batch-size", "2",
                       "--global-batch-size", "4", "--vocab-size", "64", "--device", "cpu",
                       "--moe-aux-loss-coeff", str(coeff), *MOE])
    torch.manual_seed(0)
    model = build_model(args, transformer_config(args, torch.device("cpu")), padded_vocab_size(64, args))
    batches = _random_batches(eod)
    engine = TorchEngine(model, args, eod=eod)
    _, tokens = engine.gradients(batches)
    engine_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    logged = moe_load_balancing_losses(args, len(batches))

    routers = [m.router for m in model.modules() if hasattr(m, "router") and hasattr(m.router, "weight")]
    assert len(routers) == 2
    inputs = []
    hooks = [r.register_forward_hook(lambda mod, a, out, r=r: inputs.append((r, a[0].reshape(-1, hidden))))
             for r in routers]
    model.config.moe_aux_loss_coeff = 0.0  # the routers read the shared config: Megatron adds nothing now
    model.zero_grad(set_to_none=True)
    objective, balance = 0.0, []
    for b in batches:
        inputs.clear()
        loss = (model_forward(model, b, args, eod).float() * b["loss_mask"]).sum() / float(tokens)
        aux = [_switch_aux_loss(x, r.weight, args.moe_router_topk) for r, x in inputs]
        balance += [float(a) for a in aux]
        objective = objective + loss + coeff * sum(a * x.shape[0] for a, (_, x) in zip(aux, inputs)) / float(tokens)
    objective.backward()
    for h in hooks:
        h.remove()
    for name, p in model.named_parameters():
        torch.testing.assert_close(engine_grads[name], p.grad, rtol=1e-4, atol=1e-7, msg=name)
    # balance: [layer 1 batch 1, layer 2 batch 1, layer 1 batch 2, layer 2 batch 2]
    assert logged == pytest.approx({1: (balance[0] + balance[2]) / 2, 2: (balance[1] + balance[3]) / 2}, rel=1e-5)
    # the balancing term matters: without it the routers' gradients differ
    model.zero_grad(set_to_none=True)
    engine.gradients(batches)
    assert all((engine_grads[n] - p.grad).abs().max() > 1e-4 for n, p in model.named_parameters() if "router" in n)


@pytest.mark.parametrize("freq,expected", [("1", [1, 1, 1, 1]), ("2", [1, 0, 1, 0]), ("([0]+[1])*2", [0, 1, 0, 1])])
def test_layer_frequency_and_shared_experts(megatron_world, freq, expected):
    """--moe-layer-freq puts experts in the layers Megatron-LM's flag names, the others keep
    the dense MLP; --moe-shared-expert-intermediate-size adds a shared expert to each MoE layer."""
    from megatron_fox.training.model import build_model, padded_vocab_size, transformer_config

    route_megatron_buffers_to_cpu()
    args = parse_args(["--num-layers", "4", "--hidden-size", "32", "--num-attention-heads", "2", "--ffn-hidden-size",
                       "64", "--vocab-size", "64", "--device", "cpu", *MOE, "--moe-layer-freq", freq,
                       "--moe-shared-expert-intermediate-size", "48"])
    model = build_model(args, transformer_config(args, torch.device("cpu")), padded_vocab_size(64, args))
    kinds = [int(hasattr(layer.mlp, "router")) for layer in model.decoder.layers]
    assert kinds == expected
    for layer, moe in zip(model.decoder.layers, kinds):
        if moe:
            assert tuple(layer.mlp.shared_experts.linear_fc2.weight.shape) == (32, 48)
            assert len(layer.mlp.experts.local_experts) == 4
            assert type(layer.mlp.experts).__name__ == "SequentialMLP"
        else:
            assert tuple(layer.mlp.linear_fc2.weight.shape) == (32, 64)


TP2_SP = ["--tensor-model-parallel-size", "2", "--sequence-parallel"]
EP2 = ["--expert-model-parallel-size", "2"]


@pytest.mark.parametrize("layout", [[], TP2_SP, ["--context-parallel-size", "2"], ["--pipeline-model-parallel-size", "2"],
                                    EP2, EP2 + ["--context-parallel-size", "2"], EP2 + TP2_SP,
                                    EP2 + ["--pipeline-model-parallel-size", "2"]],
                         ids=["dp2", "tp2_sp", "cp2", "pp2", "ep2", "ep2_cp2", "ep2_tp2_sp_dp2", "ep2_pp2_dp2"])
def test_layouts_match_one_process(cache, tmp_path, layout):
    """Two processes as DP=2, TP=2 with sequence parallelism or CP=2 (each router sees half
    the tokens: the balancing loss's gradient must not halve, training/step.py
    set_moe_aux_loss_scale), PP=2 and DP=2 with the experts split over them (EP=2: tokens
    gathered to their expert's rank, expert gradients summed over no other rank, the
    gradient norm over both ranks' experts) train like one; so do EP=2 over the two
    context-parallel ranks, and four processes of EP=2 beside TP=2 + SP or PP=2."""
    # layer 0 with experts (and a shared one), layer 1 dense: PP=2 puts one on each stage
    flags = MOE + ["--train-iters", "4", "--log-interval", "2", "--moe-layer-freq", "2",
                   "--moe-shared-expert-intermediate-size", "32", "--moe-per-layer-logging", "--log-params-norm"]
    one = train(tmp_path, "one", flags)
    ep_beside = EP2[0] in layout and any(k in layout for k in (TP2_SP[0], "--pipeline-model-parallel-size"))
    two = train(tmp_path, "two", flags + layout, world=4 if ep_beside else 2)
    assert [h["step"] for h in two] == [1, 2, 3, 4]
    assert all(h.get("moe_load_balancing_loss", 0) > 0.9 for h in one[1::2]), one
    for a, b in zip(one, two):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5), (a["step"], a["loss"], b["loss"])
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4), (a["step"], a["grad_norm"], b["grad_norm"])
        # the logged balance: the ranks' parts summed, stages gathered, DP averaged
        assert b["moe_load_balancing_loss"] == pytest.approx(a["moe_load_balancing_loss"], rel=1e-5), a["step"]
        assert list(b["moe_load_balancing_loss_by_layer"]) == [1]  # layer 2 is dense
        # whole-model figures from the shards: every expert counted once
        assert b["model_flops"] == pytest.approx(a["model_flops"], rel=1e-12)
        if "params_norm" in a:
            assert b["params_norm"] == pytest.approx(a["params_norm"], rel=1e-6), a["step"]
    assert sum("params_norm" in h for h in one) == 2


@pytest.mark.parametrize("extra", [[], ["--moe-router-score-function", "sigmoid", "--moe-router-enable-expert-bias",
                                         "--moe-router-bias-update-rate", "0.05"]], ids=["aux_loss", "expert_bias"])
def test_resume_matches_uninterrupted(cache, tmp_path, extra):
    """A resumed run continues the uninterrupted one (with aux-loss-free balancing the
    routers' expert biases are in the checkpoint)."""
    flags = MOE + ["--train-iters", "6", "--log-interval", "3", *extra]
    full = train(tmp_path, "full", flags)
    ckpt = tmp_path / "ckpt"
    train(tmp_path, "first", flags + ["--exit-interval", "3", "--save", str(ckpt)])
    rest = train(tmp_path, "rest", flags + ["--load", str(ckpt)])
    assert [h["step"] for h in rest] == [4, 5, 6]
    for a, b in zip(full[3:], rest):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-6), (a["step"], a["loss"], b["loss"])
        assert b["moe_load_balancing_loss"] == pytest.approx(a["moe_load_balancing_loss"], rel=1e-6)


def _one_moe_layer(experts: int, topk: int, extra: list):
    """(a 1-layer model's MoELayer in eval mode, its input x [24, 2, 32], its output [48, 32]
    in float64) for hidden 32, experts of 16; the same weights for any routing flags."""
    from megatron_fox.training.model import build_model, padded_vocab_size, transformer_config

    route_megatron_buffers_to_cpu()
    args = parse_args(["--num-layers", "1", "--hidden-size", "32", "--num-attention-heads", "2", "--ffn-hidden-size",
                       "64", "--vocab-size", "64", "--device", "cpu", "--num-experts", str(experts),
                       "--moe-ffn-hidden-size", "16", "--moe-router-topk", str(topk), *extra])
    torch.manual_seed(0)
    model = build_model(args, transformer_config(args, torch.device("cpu")), padded_vocab_size(64, args))
    layer = model.decoder.layers[0].mlp
    layer.eval()
    x = torch.randn(24, 2, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return layer, x, layer(x)[0].reshape(-1, 32).double()


def _experts_output(xs, layer, weights):
    """sum_e weights[t, e] * SwiGLU_e(x_t) in float64 from the layer's expert weights."""
    out = torch.zeros_like(xs)
    for e, expert in enumerate(layer.experts.local_experts):
        rows = weights[:, e].nonzero().flatten()
        gate, up = (xs[rows] @ expert.linear_fc1.weight.double().t()).chunk(2, dim=-1)
        out[rows] += weights[rows, e, None] * ((F.silu(gate) * up) @ expert.linear_fc2.weight.double().t())
    return out


def _dropping_reference(x, layer, topk, capacity_factor):
    """A MoE layer's output from its weights, in float64: the router's top-k logits, a
    softmax over them, each expert keeping the ceil(T * topk / E * factor) assignments of
    highest weight (Megatron's "probs" policy), output = sum of weight x SwiGLU expert.
    Returns (output [T, h], assignments dropped)."""
    xs = x.reshape(-1, x.shape[-1]).double()
    logits = xs @ layer.router.weight.double().t()
    experts = logits.shape[1]
    top, chosen = logits.topk(topk, dim=1)
    weights = torch.zeros_like(logits).scatter(1, chosen, top.softmax(dim=1))
    capacity = math.ceil(xs.shape[0] * topk / experts * capacity_factor)
    kept = torch.zeros_like(weights)
    for e in range(experts):
        routed = weights[:, e].nonzero().flatten()
        keep = routed[weights[routed, e].argsort(descending=True)[:capacity]]
        kept[keep, e] = weights[keep, e]
    return _experts_output(xs, layer, kept), int((weights > 0).sum() - (kept > 0).sum())


@pytest.mark.parametrize("extra", [[], ["--moe-pad-expert-input-to-capacity"],
                                   ["--moe-pad-expert-input-to-capacity", "--moe-grouped-gemm"]],
                         ids=["drop", "drop_and_pad", "drop_and_pad_grouped"])
def test_capacity_factor_drops_as_the_reference(megatron_world, extra):
    """--moe-expert-capacity-factor: the MoE layer's output is the reference's with the
    overflowing assignments of each expert dropped (some are, at factor 0.5); padding each
    expert's input to its capacity (zero-weighted rows), through SequentialMLP or the
    grouped GEMMs, changes nothing; without the factor the output differs."""
    layer, x, dropping = _one_moe_layer(4, 2, ["--moe-expert-capacity-factor", "0.5", *extra])
    _, _, dropless = _one_moe_layer(4, 2, [])
    with torch.no_grad():
        ref, dropped = _dropping_reference(x, layer, 2, 0.5)
    assert dropped >= 48, dropped  # of 48 x 2 assignments each expert keeps 12 at most
    torch.testing.assert_close(dropping, ref, rtol=1e-4, atol=1e-5)
    assert (dropless - ref).abs().max() > 1e-3


def test_capacity_factor_trains_alike_with_experts_split(cache, tmp_path):
    """With a capacity factor each router call drops by its own tokens (a micro-batch on
    each rank): DP=2 with the experts split (EP=2) trains like one process, and the drops
    change the losses against the dropless run."""
    flags = MOE + ["--train-iters", "3", "--log-interval", "1", "--moe-expert-capacity-factor", "0.5"]
    one = train(tmp_path, "one", flags)
    two = train(tmp_path, "two", flags + EP2, world=2)
    dropless = train(tmp_path, "dropless", MOE + ["--train-iters", "3", "--log-interval", "1"])
    for a, b in zip(one, two):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5), (a["step"], a["loss"], b["loss"])
    gaps = [abs(c["loss"] - a["loss"]) for a, c in zip(one, dropless)]
    assert max(gaps) > 1e-4, gaps


def test_expert_bias_moves_toward_balance(megatron_world):
    """--moe-router-enable-expert-bias (sigmoid scores): after each step every router's bias
    is the previous one plus rate * sign(mean load - load of e), the loads counted here from
    the routers' inputs as top-k of sigmoid(logits) + bias over the step's micro-batches;
    the counts restart each step."""
    from megatron_fox.training.model import build_model, padded_vocab_size, transformer_config
    from megatron_fox.training.torch_engine import TorchEngine

    route_megatron_buffers_to_cpu()
    rate, hidden, eod = 0.01, 32, 63
    args = parse_args(["--num-layers", "2", "--hidden-size", str(hidden), "--num-attention-heads", "2",
                       "--ffn-hidden-size", "64", "--seq-length", "24", "--micro-batch-size", "2",
                       "--global-batch-size", "4", "--vocab-size", "64", "--device", "cpu", *MOE,
                       "--moe-router-score-function", "sigmoid", "--moe-router-enable-expert-bias",
                       "--moe-router-bias-update-rate", str(rate), "--moe-router-load-balancing-type", "none"])
    torch.manual_seed(0)
    model = build_model(args, transformer_config(args, torch.device("cpu")), padded_vocab_size(64, args))
    engine = TorchEngine(model, args, eod=eod)
    routers = [m.router for m in model.modules() if hasattr(m, "router") and hasattr(m.router, "weight")]
    inputs = {id(r): [] for r in routers}
    for r in routers:
        r.register_forward_hook(lambda mod, a, out, r=r: inputs[id(r)].append(a[0].detach().reshape(-1, hidden)))
    expected = {id(r): torch.zeros(4, dtype=torch.float64) for r in routers}
    for step in range(3):
        batches = _random_batches(eod)
        for r in routers:
            inputs[id(r)].clear()
        engine.gradients(batches)
        for r in routers:
            counts = torch.zeros(4, dtype=torch.float64)
            for x in inputs[id(r)]:
                scores = torch.sigmoid(x.double() @ r.weight.double().t()) + expected[id(r)]
                counts += torch.nn.functional.one_hot(scores.topk(2, dim=1).indices, 4).sum(dim=(0, 1))
            assert counts.sum() == 2 * 2 * 2 * 24 and len(inputs[id(r)]) == 2
            expected[id(r)] += rate * torch.sign(counts.mean() - counts)
            torch.testing.assert_close(r.expert_bias.double(), expected[id(r)], rtol=0, atol=1e-6)
            assert not r.local_tokens_per_expert.any()
    assert any(b.abs().sum() > 0 for b in expected.values())


@pytest.mark.parametrize("layout", [EP2, TP2_SP], ids=["dp2_ep2", "tp2_sp"])
def test_expert_bias_layouts_match_one_process(cache, tmp_path, layout):
    """The expert-bias update counts every rank's tokens (TP x CP x DP): DP=2 with EP=2 and
    TP=2 + SP train like one process (the biases decide the routing of later steps)."""
    flags = MOE + ["--train-iters", "5", "--log-interval", "1", "--moe-router-score-function", "sigmoid",
                   "--moe-router-enable-expert-bias", "--moe-router-bias-update-rate", "0.05"]
    one = train(tmp_path, "one", flags)
    two = train(tmp_path, "two", flags + layout, world=2)
    for a, b in zip(one, two):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5), (a["step"], a["loss"], b["loss"])


def test_group_limited_sigmoid_routing_as_the_reference(megatron_world):
    """DeepSeek-style routing: sigmoid scores, the experts in --moe-router-num-groups groups,
    each token's top-k taken within the --moe-router-group-topk groups of highest sum of
    their top (k / group_topk) scores, the chosen scores normalised to sum 1 and scaled by
    --moe-router-topk-scaling-factor: the layer's output is the reference's; without the
    groups some tokens' experts span groups and the output differs."""
    experts, groups, topk, scale = 8, 2, 2, 2.5
    sigmoid = ["--moe-router-score-function", "sigmoid", "--moe-router-topk-scaling-factor", str(scale)]
    layer, x, grouped = _one_moe_layer(experts, topk, sigmoid + ["--moe-router-num-groups", str(groups),
                                                                 "--moe-router-group-topk", "1"])
    _, _, free_output = _one_moe_layer(experts, topk, sigmoid)
    xs = x.reshape(-1, 32).double()
    scores = torch.sigmoid(xs @ layer.router.weight.double().t()).view(-1, groups, experts // groups)
    best_group = scores.topk(topk, dim=-1).values.sum(dim=-1).argmax(dim=-1)  # group_topk 1
    within = scores[torch.arange(len(xs)), best_group]  # [T, experts per group]
    top, idx = within.topk(topk, dim=-1)
    chosen = best_group[:, None] * (experts // groups) + idx
    weights = torch.zeros(len(xs), experts, dtype=torch.float64).scatter(1, chosen, scale * top / top.sum(-1, True))
    ref = _experts_output(xs, layer, weights)
    torch.testing.assert_close(grouped, ref, rtol=1e-4, atol=1e-5)
    free = scores.flatten(1).topk(topk, dim=-1).indices // (experts // groups)
    assert (free[:, 0] != free[:, 1]).sum() > 3  # tokens whose free choice spans both groups
    assert (free_output - ref).abs().max() > 1e-3


def test_grouped_gemm_keeps_sequential_names(megatron_world):
    """--moe-grouped-gemm builds GroupedGemmExperts with SequentialMLP's state-dict names and
    shapes (checkpoints and exports are the same either way)."""
    from megatron_fox.layers.grouped_experts import GroupedGemmExperts
    from megatron_fox.training.model import build_model, padded_vocab_size, transformer_config

    route_megatron_buffers_to_cpu()
    states = {}
    for extra in ([], ["--moe-grouped-gemm"]):
        args = parse_args(["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "2", "--ffn-hidden-size",
                           "64", "--vocab-size", "64", "--device", "cpu", *MOE, *extra])
        model = build_model(args, transformer_config(args, torch.device("cpu")), padded_vocab_size(64, args))
        grouped = [isinstance(layer.mlp.experts, GroupedGemmExperts) for layer in model.decoder.layers]
        assert grouped == [bool(extra)] * 2
        states[bool(extra)] = {k: tuple(v.shape) for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
    assert states[True] == states[False]


@pytest.mark.parametrize("layout", [[], ["--tensor-model-parallel-size", "2", "--sequence-parallel"],
                                    ["--expert-model-parallel-size", "2"]], ids=["one", "tp2_sp", "ep2"])
def test_grouped_gemm_trains_like_sequential(cache, tmp_path, layout):
    """--moe-grouped-gemm (the experts as two torch._grouped_mm calls over SequentialMLP's own
    weights) trains like Megatron-Core's SequentialMLP in one process, also with the experts'
    weights split over TP ranks or their experts over EP ranks."""
    flags = MOE + ["--train-iters", "3", "--log-interval", "1", "--moe-shared-expert-intermediate-size", "32"]
    seq = train(tmp_path, "seq", flags)
    grouped = train(tmp_path, "grouped", flags + ["--moe-grouped-gemm"] + layout, world=2 if layout else 1)
    for a, b in zip(seq, grouped):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5), (a["step"], a["loss"], b["loss"])
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4), (a["step"], a["grad_norm"], b["grad_norm"])


def _export(tmp_path, ckpt, flags):
    """tools/convert_checkpoint.py from-megatron of a checkpoint folder: the full state dict."""
    from .test_train import _ok

    out = tmp_path / f"{ckpt.name}.pt"
    _ok(tmp_path, "convert_checkpoint.py", "from-megatron", "--input", str(ckpt), "--output", str(out), *TINY, *flags)
    return torch.load(out)


def test_expert_parallel_checkpoints(cache, tmp_path):
    """EP=2 (DP=2): each rank's file holds its half of the experts (Megatron-LM's
    mp_rank_TT_PPP_EEE.pt); the run resumes like the uninterrupted one-process run; its
    export is the one-process checkpoint's (experts under their global numbers); whole
    weights loaded into EP=2 (--pretrained-checkpoint) train like one process from them, and
    so does one process fine-tuning from the EP=2 checkpoint itself (--load --finetune), while
    a full resume into another layout stops naming 'load'."""
    flags = MOE + ["--train-iters", "6", "--log-interval", "3"]
    ep = ["--expert-model-parallel-size", "2"]
    full = train(tmp_path, "full", flags + ["--exit-interval", "3", "--save", str(tmp_path / "one")])
    ckpt = tmp_path / "two"
    train(tmp_path, "first", flags + ep + ["--exit-interval", "3", "--save", str(ckpt)], world=2)
    files = sorted(os.listdir(ckpt / "iter_0000003"))
    assert [f for f in files if f.endswith(".pt")] == ["mp_rank_00_000_000.pt", "mp_rank_00_000_001.pt"], files
    part = torch.load(ckpt / "iter_0000003" / "mp_rank_00_000_001.pt", weights_only=False)["model"]
    assert sorted({k.split("local_experts.")[1][0] for k in part if "local_experts." in k}) == ["0", "1"]
    rest = train(tmp_path, "rest", flags + ep + ["--load", str(ckpt)], world=2)
    whole = train(tmp_path, "whole", flags)
    assert [h["step"] for h in rest] == [4, 5, 6]
    for a, b in zip(whole[3:], rest):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5), (a["step"], a["loss"], b["loss"])
    assert full[-1]["loss"] == pytest.approx(whole[2]["loss"], rel=1e-6)

    one, two = _export(tmp_path, tmp_path / "one", MOE), _export(tmp_path, ckpt, MOE)
    assert set(two) == set(one) and any("local_experts.3." in k for k in two)
    for name, t in one.items():
        torch.testing.assert_close(two[name], t, rtol=1e-4, atol=1e-6, msg=name)
    start = ["--train-iters", "2", "--log-interval", "1", "--pretrained-checkpoint", str(tmp_path / "two.pt")]
    tuned_one, tuned_two = train(tmp_path, "t1", MOE + start), train(tmp_path, "t2", MOE + start + ep, world=2)
    # the EP=2 checkpoint's weights straight into one process (merged from its rank files)
    direct = train(tmp_path, "t3", MOE + ["--train-iters", "2", "--log-interval", "1", "--load", str(ckpt),
                                          "--finetune"])
    for a, b, c in zip(tuned_one, tuned_two, direct):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5), (a["step"], a["loss"], b["loss"])
        assert c["loss"] == pytest.approx(a["loss"], rel=1e-5), (a["step"], a["loss"], c["loss"])
    # a full resume must keep the layout: named, exit 2
    from .test_train import _run_cli

    r = _run_cli(TINY + flags + ["--load", str(ckpt)], tmp_path)
    assert r.returncode == 2 and "'load'" in r.stderr and "mp_rank_00_000.pt is missing" in r.stderr, r.stderr[-2000:]


def test_expert_shards_round_trip():
    """checkpoint.partition: expert_shard keeps rank e's experts renumbered from 0, the
    dense tensors whole; merge_expert_shards restores the full dict; global_name maps a
    local expert to its number in the full model."""
    from megatron_fox.checkpoint import expert_shard, global_name, merge_expert_shards, num_experts_in

    full = {f"decoder.layers.{i}.mlp.experts.local_experts.{e}.linear_fc1.weight": torch.randn(4, 2)
            for i in range(2) for e in range(6)}
    full["decoder.layers.0.mlp.router.weight"] = torch.randn(6, 2)
    parts = [expert_shard(full, e, 3) for e in range(3)]
    assert num_experts_in(full) == 6 and all(num_experts_in(p) == 2 for p in parts)
    assert torch.equal(parts[2]["decoder.layers.1.mlp.experts.local_experts.1.linear_fc1.weight"],
                       full["decoder.layers.1.mlp.experts.local_experts.5.linear_fc1.weight"])
    assert all(torch.equal(p["decoder.layers.0.mlp.router.weight"], full["decoder.layers.0.mlp.router.weight"])
               for p in parts)
    merged = merge_expert_shards(parts)
    assert set(merged) == set(full) and all(torch.equal(merged[k], full[k]) for k in full)
    assert global_name("decoder.layers.1.mlp.experts.local_experts.1.linear_fc2.weight", 2, 2, 3) == \
        "decoder.layers.3.mlp.experts.local_experts.7.linear_fc2.weight"
    with pytest.raises(ValueError, match="expert_model_parallel_size"):
        expert_shard(full, 0, 4)


@pytest.mark.parametrize("flags,key", [
    (["--num-experts", "1"], "num_experts"),
    (["--num-experts", "4", "--moe-router-topk", "5"], "moe_router_topk"),
    (["--num-experts", "4", "--tensor-model-parallel-size", "2"], "sequence_parallel"),
    (["--num-experts", "4", "--moe-ffn-hidden-size", "63", "--tensor-model-parallel-size", "2",
      "--sequence-parallel"], "moe_ffn_hidden_size"),
    (["--num-experts", "4", "--moe-router-load-balancing-type", "sinkhorn"], "moe_router_load_balancing_type"),
    (["--num-experts", "4", "--moe-aux-loss-coeff", "-1"], "moe_aux_loss_coeff"),
    (["--num-experts", "4", "--moe-token-dispatcher-type", "flex"], "moe_token_dispatcher_type"),
    (["--num-experts", "4", "--num-layers", "2", "--hybrid-layer-pattern", "*-"], "num_experts"),
    (["--num-experts", "4", "--moe-layer-freq", "0"], "moe_layer_freq"),
    (["--num-experts", "4", "--num-layers", "3", "--moe-layer-freq", "[1,0]"], "moe_layer_freq"),
    (["--num-experts", "4", "--num-layers", "2", "--moe-layer-freq", "[1,2]"], "moe_layer_freq"),
    (["--num-experts", "4", "--moe-layer-freq", "every other"], "moe_layer_freq"),
    (["--num-experts", "4", "--moe-shared-expert-intermediate-size", "0"], "moe_shared_expert_intermediate_size"),
    (["--num-experts", "4", "--moe-router-score-function", "tanh"], "moe_router_score_function"),
    (["--num-experts", "4", "--moe-router-enable-expert-bias"], "moe_router_enable_expert_bias"),
    (["--num-experts", "4", "--moe-router-bias-update-rate", "0"], "moe_router_bias_update_rate"),
    (["--num-experts", "4", "--moe-router-topk-scaling-factor", "-1"], "moe_router_topk_scaling_factor"),
    (["--num-experts", "4", "--moe-router-num-groups", "2"], "moe_router_group_topk"),
    (["--num-experts", "4", "--moe-router-num-groups", "3", "--moe-router-group-topk", "1"], "moe_router_num_groups"),
    (["--num-experts", "4", "--moe-router-num-groups", "2", "--moe-router-group-topk", "3"], "moe_router_group_topk"),
    (["--num-experts", "4", "--moe-router-topk", "3", "--moe-router-num-groups", "2", "--moe-router-group-topk", "1"],
     "moe_router_group_topk"),
    (["--num-experts", "4", "--moe-router-expert-pad", "1"], "moe_router_expert_pad"),
    (["--num-experts", "4", "--moe-expert-capacity-factor", "0"], "moe_expert_capacity_factor"),
    (["--num-experts", "4", "--moe-expert-capacity-factor", "1", "--moe-token-drop-policy", "random"],
     "moe_token_drop_policy"),
    (["--num-experts", "4", "--moe-pad-expert-input-to-capacity"], "moe_pad_expert_input_to_capacity"),
    (["--num-experts", "4", "--expert-model-parallel-size", "3"], "expert_model_parallel_size"),
    (["--expert-model-parallel-size", "2"], "expert_model_parallel_size"),
    (["--num-experts", "4", "--expert-model-parallel-size", "4"], "expert_model_parallel_size"),  # DP x CP = 2
    (["--num-experts", "4", "--expert-model-parallel-size", "2", "--deepspeed"], "expert_model_parallel_size"),
])
def test_bad_keys_are_named(flags, key, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match=f"'{key}'"):
        parse_args(flags)


def test_alltoall_dispatcher_needs_cuda_and_public_format_is_dense(tmp_path):
    from .test_train import TINY, _run_cli, _tool

    r = _run_cli(TINY + MOE + ["--train-iters", "1", "--moe-token-dispatcher-type", "alltoall"], tmp_path)
    assert r.returncode == 2 and "'moe_token_dispatcher_type'" in r.stderr, r.stderr[-2000:]
    r = _tool(tmp_path, "convert_checkpoint.py", "to-public", "--input", "moe.pt", "--output", "out.bin", *TINY, *MOE)
    assert r.returncode == 2 and "num_experts: the public FoX format holds dense MLPs" in r.stderr, r.stderr[-2000:]
