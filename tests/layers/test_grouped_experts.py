"""--moe-grouped-gemm: the experts' SwiGLU MLPs as two torch._grouped_mm calls
(layers/grouped_experts.py) against a per-expert loop written here, values and gradients,
with experts that get no tokens; and in the model, training with it equals training with
Megatron-Core's SequentialMLP in one process and with TP=2 + SP or EP=2."""

import pytest
import torch
import torch.nn.functional as F

from megatron_fox.layers.grouped_experts import grouped_swiglu_experts


def _loop_reference(x, w1, w2, probs, counts):
    """Expert e's rows: (silu(x W_gate^T) * x W_up^T * prob) W2^T, in float64."""
    out, start = [], 0
    for e, n in enumerate(counts):
        xe = x[start:start + n].double()
        gate, up = (xe @ w1[e].double().t()).chunk(2, dim=-1)
        out.append((F.silu(gate) * up * probs[start:start + n].double().unsqueeze(-1)) @ w2[e].double().t())
        start += n
    return torch.cat(out)


@pytest.mark.parametrize("dtype,tol,fused", [(torch.float32, 1e-5, False), (torch.bfloat16, 3e-2, False),
                                             (torch.float32, 1e-5, True)], ids=["fp32", "bf16", "fp32_fused"])
@pytest.mark.parametrize("counts", [[5, 0, 9, 2], [4, 4, 4, 4], [0, 0, 16, 0]])
def test_grouped_experts_match_loop(dtype, tol, fused, counts):
    """fused: the activation by Megatron's weighted SwiGLU kernel (the CUDA path's)."""
    E, h, ffn, T = len(counts), 32, 24, sum(counts)
    x = torch.randn(T, h, dtype=dtype, requires_grad=True)
    w1 = (torch.randn(E, 2 * ffn, h) / h ** 0.5).to(dtype).requires_grad_()
    w2 = (torch.randn(E, h, ffn) / ffn ** 0.5).to(dtype).requires_grad_()
    probs = torch.rand(T, requires_grad=True)
    y = grouped_swiglu_experts(x, w1, w2, probs, torch.tensor(counts), fused_activation=fused)
    assert y.dtype == dtype and y.shape == (T, h)
    grad = torch.randn(T, h, dtype=torch.float64)
    (y.double() * grad).sum().backward()
    leaves = [t.detach().clone().double().requires_grad_() for t in (x, w1, w2, probs)]
    ref = _loop_reference(*leaves, counts)
    (ref * grad).sum().backward()

    def close(a, b, name):
        scale = b.abs().max().clamp_min(1e-6)
        assert float((a.double() - b).abs().max() / scale) < tol, name

    close(y.detach(), ref.detach(), "out")
    for name, t, r in zip(("x", "w1", "w2", "probs"), (x, w1, w2, probs), leaves):
        close(t.grad, r.grad, f"grad {name}")
    # the gradient y.sum() hands back is broadcast (stride 0): accepted
    x.grad = None
    grouped_swiglu_experts(x, w1, w2, probs, torch.tensor(counts)).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_spec_swap_in_both_megatron_forms():
    """layers.spec puts GroupedGemmExperts in Megatron-Core's MoE spec in either form it
    comes in: a ModuleSpec (megatron-core 0.16) or functools.partial builders (0.19)."""
    import functools

    from megatron.core.transformer.mlp import MLPSubmodules
    from megatron.core.transformer.moe.experts import SequentialMLP
    from megatron.core.transformer.moe.moe_layer import MoELayer, MoESubmodules

    from megatron_fox.layers.grouped_experts import GroupedGemmExperts
    from megatron_fox.layers.spec import _use_grouped_experts, fox_mlp_submodules

    spec = fox_mlp_submodules("local", num_experts=4, grouped_gemm=True)["mlp"]
    if isinstance(spec, functools.partial):  # the installed megatron-core builds with partials
        assert spec.keywords["submodules"].experts.func is GroupedGemmExperts
    else:
        assert spec.submodules.experts.module is GroupedGemmExperts
    inner = MLPSubmodules(linear_fc1=object, linear_fc2=object)
    partial_spec = functools.partial(MoELayer, submodules=MoESubmodules(
        experts=functools.partial(SequentialMLP, submodules=inner)))
    _use_grouped_experts(partial_spec)
    experts = partial_spec.keywords["submodules"].experts
    assert experts.func is GroupedGemmExperts and experts.keywords == {"submodules": inner}


def test_no_tokens_gives_zero_gradients():
    """A rank whose experts get no token at all (expert parallelism, small batches): an empty
    output and zero weight gradients, as SequentialMLP's loop over empty inputs gives (every
    rank must hand the same gradients to the all-reduce)."""
    x = torch.randn(0, 16, requires_grad=True)
    w1, w2 = torch.randn(3, 16, 16, requires_grad=True), torch.randn(3, 16, 8, requires_grad=True)
    probs = torch.rand(0, requires_grad=True)
    y = grouped_swiglu_experts(x, w1, w2, probs, torch.zeros(3, dtype=torch.long))
    assert y.shape == (0, 16)
    y.sum().backward()
    assert w1.grad is not None and not w1.grad.any() and w2.grad is not None and not w2.grad.any()


def test_availability_by_device_and_dtype():
    from megatron_fox.layers.grouped_experts import grouped_mm_available

    cpu = torch.device("cpu")
    assert grouped_mm_available(cpu, torch.float32) and grouped_mm_available(cpu, torch.bfloat16)
    assert not grouped_mm_available(cpu, torch.float64)  # torch._grouped_mm refuses it: the loop runs
    with pytest.raises(RuntimeError):
        torch._grouped_mm(torch.zeros(2, 8, dtype=torch.float64), torch.zeros(1, 8, 8, dtype=torch.float64),
                          offs=torch.tensor([2], dtype=torch.int32))
