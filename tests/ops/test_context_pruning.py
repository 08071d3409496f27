"""Learned dynamic context pruning: the sparse sigmoid, the keep mask and the attention that
uses it, against closed forms, brute-force loops and finite differences."""

import math

import pytest
import torch
import torch.nn.functional as F

from megatron_fox.ops import forgetting_attention_decode, forgetting_attention_reference
from megatron_fox.ops.context_pruning import (keep_mask, keep_probabilities, kept_fraction,
                                              pruned_forgetting_attention_reference, sparse_sigmoid)


def _entmax2_first(x, alpha):
    """alpha-entmax([x, 0])[0] by bisection on tau (the definition, not the p-equation the op solves)."""
    a = alpha - 1.0
    out = []
    for xi in x.tolist():
        z = [a * xi, 0.0]
        lo, hi = max(z) - 1.0, max(z)  # tau brackets: sum_i [z_i - tau]_+^(1/a) = 1 between these
        for _ in range(200):
            tau = 0.5 * (lo + hi)
            total = sum(max(zi - tau, 0.0) ** (1.0 / a) for zi in z)
            lo, hi = (tau, hi) if total > 1.0 else (lo, tau)
        out.append(max(z[0] - tau, 0.0) ** (1.0 / a))
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("alpha", [1.25, 1.5, 2.0, 3.0, 8.0])
def test_sparse_sigmoid_is_first_entry_of_entmax(alpha):
    x = torch.randn(40, dtype=torch.float64) * 2.0
    # the definition recovers p = (z - tau)^(1/(alpha-1)) from a tau known to ~1e-15, so near
    # p = 0 it is itself only good to about (1e-15)^(1/(alpha-1)) (0.007 at alpha 8)
    tol = 1e-9 + 2.0 * 1e-15 ** (1.0 / (alpha - 1.0))
    assert torch.allclose(sparse_sigmoid(x, alpha), _entmax2_first(x, alpha), atol=tol)


def test_sparse_sigmoid_closed_forms_and_limits():
    x = torch.linspace(-4, 4, 81, dtype=torch.float64)
    assert torch.allclose(sparse_sigmoid(x, 2.0), ((x + 1) / 2).clamp(0, 1), atol=1e-12)  # sparsemax
    assert torch.equal(sparse_sigmoid(x, 1.0), torch.sigmoid(x))
    assert torch.allclose(sparse_sigmoid(x, 1.0 + 1e-6), torch.sigmoid(x), atol=1e-5)
    assert torch.equal(sparse_sigmoid(x, math.inf), (x > 0).double())
    p8 = sparse_sigmoid(x, 8.0)
    assert torch.all(p8[x <= -1 / 7] == 0) and torch.all(p8[x >= 1 / 7] == 1)  # exact zeros and ones
    with pytest.raises(ValueError, match="alpha"):
        sparse_sigmoid(x, 0.5)


@pytest.mark.parametrize("alpha", [1.2, 1.5, 2.0, 4.0])
def test_sparse_sigmoid_gradient(alpha):
    x = (torch.rand(30, dtype=torch.float64) * 1.6 - 0.8) / (alpha - 1)  # inside the ramp mostly
    x.requires_grad_()
    assert torch.autograd.gradcheck(lambda z: sparse_sigmoid(z, alpha), (x,))


@pytest.mark.parametrize("alpha", [1.01, 1.5, 2.0, 3.0, 8.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sparse_sigmoid_kernel_matches_torch(device, alpha, dtype):
    """The fused Triton kernel (the CUDA path; here the interpreter) against the torch ops:
    the same root search, so p and its slope agree to rounding, across the ramp and its ends."""
    from megatron_fox.ops.context_pruning.sparse_sigmoid import solve_with_slope

    a = alpha - 1.0
    x = torch.cat([torch.linspace(-1.3 / a, 1.3 / a, 3001), torch.randn(999) / a]).to(device, dtype)
    p_ref, slope_ref = solve_with_slope(x.cpu(), a, use_triton=False)
    p, slope = solve_with_slope(x, a, use_triton=True)
    assert p.dtype == dtype and slope.dtype == (dtype if dtype == torch.float64 else torch.float32)
    assert ((p_ref == 0) | (p_ref == 1)).any() and ((p_ref > 0) & (p_ref < 1)).any()
    torch.testing.assert_close(p.cpu(), p_ref, rtol=0, atol=1e-12 if dtype == torch.float64 else 1e-7)
    torch.testing.assert_close(slope.cpu(), slope_ref, rtol=1e-9 if dtype == torch.float64 else 1e-6, atol=0)


def test_keep_mask_is_the_product_over_later_queries():
    B, T, r = 2, 9, 4
    qi, ki = torch.randn(B, T, r, dtype=torch.float64), torch.randn(B, T, r, dtype=torch.float64)
    beta, alpha = 0.7, 1.5
    keep = keep_mask(qi, ki, beta, alpha)
    for b in range(B):
        for kq in range(T):
            for j in range(T):
                want = 1.0
                for n in range(j + 1, kq + 1):
                    z = float(qi[b, n] @ ki[b, j]) / math.sqrt(r) + beta
                    want *= float(sparse_sigmoid(torch.tensor([z], dtype=torch.float64), alpha))
                assert keep[b, kq, j].item() == pytest.approx(want, abs=1e-6), (b, kq, j)
    assert keep_probabilities(qi, ki, beta, alpha).shape == (B, T, T)


def test_keep_mask_gradient():
    B, T, r = 1, 6, 3
    qi = torch.randn(B, T, r, dtype=torch.float64, requires_grad=True)
    ki = torch.randn(B, T, r, dtype=torch.float64, requires_grad=True)
    beta = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b, c: keep_mask(a, b, c, 1.5), (qi, ki, beta))


def _loop_attention(q, k, v, log_f, keep):
    """o_k = sum_j I_kj exp(s_kj) v_j / sum_j I_kj exp(s_kj), one row at a time in float64."""
    B, T, H, D = q.shape
    g = H // k.shape[2]
    c = torch.cumsum(log_f.double(), dim=1)
    out = torch.zeros(B, T, H, D, dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            for i in range(T):
                s = torch.stack([q[b, i, h].double() @ k[b, j, h // g].double() / math.sqrt(D) + c[b, i, h] - c[b, j, h]
                                 for j in range(i + 1)])
                w = torch.exp(s - s.max()) * keep[b, i, :i + 1].double()
                out[b, i, h] = (w[:, None] * v[b, :i + 1, h // g].double()).sum(0) / w.sum()
    return out


def test_pruned_attention_equals_loop_and_reduces_to_fox():
    B, T, H, Hkv, D, r = 2, 11, 4, 2, 16, 8
    q, k, v = torch.randn(B, T, H, D), torch.randn(B, T, Hkv, D), torch.randn(B, T, Hkv, D)
    log_f = F.logsigmoid(torch.randn(B, T, H) + 2.0)
    keep = keep_mask(torch.randn(B, T, r), torch.randn(B, T, r), -0.5, 2.0)  # sparsemax: exact zeros
    assert (keep == 0).any() and (keep.diagonal(dim1=1, dim2=2) == 1).all()
    out = pruned_forgetting_attention_reference(q, k, v, log_f, keep, dtype=torch.float64)
    assert (out.double() - _loop_attention(q, k, v, log_f, keep)).abs().max() < 1e-5
    ones = torch.ones(B, T, T)
    fox = forgetting_attention_reference(q, k, v, log_f, dtype=torch.float64)
    assert (pruned_forgetting_attention_reference(q, k, v, log_f, ones) - fox).abs().max() < 1e-5


def test_pruned_attention_gradients_and_documents():
    B, T, H, D, r = 1, 10, 2, 16, 4
    q = torch.randn(B, T, H, D, dtype=torch.float64, requires_grad=True)
    k = torch.randn(B, T, H, D, dtype=torch.float64, requires_grad=True)
    v = torch.randn(B, T, H, D, dtype=torch.float64, requires_grad=True)
    log_f = F.logsigmoid(torch.randn(B, T, H, dtype=torch.float64) + 2.0).float().double().requires_grad_()
    keep = keep_mask(torch.randn(B, T, r), torch.randn(B, T, r), 0.5, 1.5).double().requires_grad_()
    cu = torch.tensor([0, 4, 10], dtype=torch.int32)

    def f(q, k, v, log_f, keep):
        return pruned_forgetting_attention_reference(q, k, v, log_f.float(), keep, cu_seqlens=cu, dtype=torch.float64)

    assert torch.autograd.gradcheck(lambda q, k, v, keep: f(q, k, v, log_f, keep), (q, k, v, keep))
    # documents: the second document's rows see only its own keys (the first ones' keep is irrelevant)
    out = f(q, k, v, log_f, keep).detach()
    alone = pruned_forgetting_attention_reference(q[:, 4:], k[:, 4:], v[:, 4:], log_f[:, 4:].float(),
                                                  keep[:, 4:, 4:], dtype=torch.float64)
    assert (out[:, 4:] - alone).abs().max() < 1e-10


def test_kept_fraction_and_errors():
    B, T = 2, 6
    keep = torch.rand(B, T, T)
    pairs = torch.ones(T, T).tril(-1).bool()
    assert kept_fraction(keep).item() == pytest.approx(keep[:, pairs].mean().item(), rel=1e-6)
    # documents per sample, offsets over the batch's B * T tokens: sample 0 holds [0, 2) and
    # [2, 6), sample 1 [0, 3) and [3, 6); each sample's fraction over its own pairs, then the mean
    cu = torch.tensor([0, 2, 6, 9, 12], dtype=torch.int32)
    fractions = []
    for b, cut in enumerate((2, 3)):
        same_doc = pairs.clone()
        same_doc[cut:, :cut] = False
        fractions.append(keep[b][same_doc].mean().item())
    assert kept_fraction(keep, cu).item() == pytest.approx(sum(fractions) / 2, rel=1e-6)
    assert kept_fraction(keep[:1], cu[:3]).item() == pytest.approx(fractions[0], rel=1e-6)
    # its own backward (no [B, T, T] tensor saved) against finite differences
    keep64 = keep.double().requires_grad_()
    assert torch.autograd.gradcheck(lambda k: kept_fraction(k, cu), (keep64,))
    assert torch.autograd.gradcheck(lambda k: kept_fraction(k), (keep64,))
    for bad, match in ((torch.tensor([0, 2, 6], dtype=torch.int32), "end at batch"),
                       (torch.tensor([0, 2, 9, 12], dtype=torch.int32), "every sample's start")):
        with pytest.raises(ValueError, match=match):
            kept_fraction(keep, bad)
    q = torch.randn(1, T, 2, 16)
    with pytest.raises(ValueError, match="keep"):
        pruned_forgetting_attention_reference(q, q, q, torch.zeros(1, T, 2), torch.ones(1, T, T + 1))
    with pytest.raises(ValueError, match="q_int"):
        keep_mask(torch.randn(1, T, 4), torch.randn(1, T, 5), 0.0, 2.0)


def test_decode_with_keep_equals_last_row():
    B, T, H, D, r = 2, 13, 4, 16, 8
    q, k, v = torch.randn(B, T, H, D), torch.randn(B, T, H, D), torch.randn(B, T, H, D)
    log_f = F.logsigmoid(torch.randn(B, T, H) + 1.0)
    keep = keep_mask(torch.randn(B, T, r), torch.randn(B, T, r), 0.0, 2.0)
    ref = pruned_forgetting_attention_reference(q, k, v, log_f, keep, dtype=torch.float64)[:, -1]
    c = torch.cumsum(log_f, dim=1).transpose(1, 2)
    out = forgetting_attention_decode(q[:, -1], k, v, c[..., -1], c, keep=keep[:, -1])
    assert (out.double() - ref.double()).abs().max() < 1e-5
    with pytest.raises(ValueError, match="keep"):
        forgetting_attention_decode(q[:, -1], k, v, c[..., -1], c, keep=keep[:, -1, :-1])
