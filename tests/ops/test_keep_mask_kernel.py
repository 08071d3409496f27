"""The fused Triton keep-mask kernels (`ops.context_pruning.keep_mask` on CUDA; here the
interpreter) against the plain-PyTorch reference (`keep_mask_reference`: float64 sparse
sigmoid, materialised probabilities, torch.cumprod and its autograd): the mask and the
gradients of q_int, k_int and beta.

Tolerances: the mask to 5e-5 absolute (the kernel's scores are float32 dots, the reference's
float64, and at alpha 8 the sparse sigmoid's slope reaches 2^(alpha-3) = 32, so a score's
rounding of ~1e-6 moves p by up to ~3e-5). Gradients to 3e-4 relative error of the norm,
with dL/dI > 0: the sparse sigmoid's slope jumps at its clipping points (from 1 to 0 for
alpha > 2), so a score that rounds across one changes that pair's term by O(1); a norm
bounds such rare pairs where a largest-entry bound would not (30 seeds x 3 settings: <= 3e-5).
"""

import math

import pytest
import torch

from megatron_fox.ops.context_pruning import keep_mask, keep_mask_reference


def _close(got, want, rel):
    assert float((got.double() - want).norm() / want.norm()) <= rel


@pytest.mark.parametrize("alpha,beta,r", [(1.0, 0.5, 16), (1.0, -3.0, 64), (1.5, 0.7, 8), (2.0, -0.3, 64),
                                          (8.0, 0.5, 24), (8.0, -1.0, 64)])
def test_keep_mask_kernel_matches_reference(device, alpha, beta, r):
    B, T = 2, 150  # T not a multiple of the 64-blocks; r not a power of two is padded
    qi = torch.randn(B, T, r, device=device, requires_grad=True)
    ki = torch.randn(B, T, r, device=device, requires_grad=True)
    b = torch.tensor([beta], device=device, requires_grad=True)
    ref_in = [t.detach().cpu().double().requires_grad_() for t in (qi, ki, b)]
    keep = keep_mask(qi, ki, b, alpha)
    want = keep_mask_reference(*ref_in, alpha)
    assert keep.dtype == torch.float32 and keep.shape == (B, T, T)
    torch.testing.assert_close(keep.cpu().double(), want.detach(), rtol=0, atol=5e-5)
    assert torch.equal(keep.cpu().triu(), torch.ones(T, T).triu().expand(B, T, T))  # ones on and above the diagonal
    if alpha > 1.0:
        assert float((want == 0).double().mean()) > 0.05  # exact zeros: the gradient's p = 0 rows
    g = torch.rand(B, T, T, dtype=torch.float64)
    grads = torch.autograd.grad(keep, (qi, ki, b), g.to(device).float())
    wants = torch.autograd.grad(want, ref_in, g)
    for name, got, w in zip(("q_int", "k_int", "beta"), grads, wants):
        assert got.shape == w.shape, name
        _close(got.cpu(), w, 3e-4)


def test_keep_mask_kernel_bf16_inputs_and_hard_decisions(device):
    B, T, r = 1, 70, 32
    qi, ki = (torch.randn(B, T, r, device=device).bfloat16() for _ in range(2))
    want = keep_mask_reference(qi.cpu(), ki.cpu(), 0.2, 4.0)
    torch.testing.assert_close(keep_mask(qi, ki, 0.2, 4.0).cpu(), want, rtol=0, atol=5e-5)
    hard = keep_mask(qi, ki, 0.2, math.inf)  # alpha inf: the step, the decoding's decisions
    assert not hard.requires_grad and set(hard.unique().tolist()) <= {0.0, 1.0}
    torch.testing.assert_close(hard.cpu(), keep_mask_reference(qi.cpu(), ki.cpu(), 0.2, math.inf), rtol=0, atol=0)


def test_keep_mask_wide_interaction_takes_the_reference(device):
    """r > 128 does not fit the kernels' registers: the reference answers, the same values."""
    qi, ki = torch.randn(1, 40, 160, device=device), torch.randn(1, 40, 160, device=device)
    torch.testing.assert_close(keep_mask(qi, ki, 0.1, 3.0), keep_mask_reference(qi, ki, 0.1, 3.0), rtol=0, atol=0)


def test_keep_mask_errors(device):
    x = torch.randn(1, 8, 4, device=device)
    with pytest.raises(ValueError, match="q_int and k_int"):
        keep_mask(x, torch.randn(1, 8, 5, device=device), 0.0, 2.0)
    with pytest.raises(ValueError, match="alpha"):
        keep_mask(x, x, 0.0, 0.5)
    with pytest.raises(ValueError, match="beta"):
        keep_mask(x, x, torch.zeros(2, device=device), 2.0)
