"""The reductions behind the pruning plan (row norms for ACP's data bound, diagonal logits)
against float64 torch."""

import pytest
import torch

from megatron_fox.ops.forgetting_attn.row_norm import diagonal_logits, max_row_norm


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T, D", [(70, 64), (1, 16), (129, 128)])
def test_max_row_norm_matches_torch(dtype, T, D, device):
    big = torch.randn(2, T, 5, D, device=device) * torch.rand(2, T, 5, 1, device=device) * 3
    x = big[:, :, 1:4].to(dtype)  # a strided view: heads 1..3 of 5
    got = max_row_norm(x)
    want = torch.linalg.vector_norm(x.double(), dim=-1).amax(dim=1)
    assert got.shape == (2, 3) and got.dtype == torch.float32
    assert torch.allclose(got.double(), want, rtol=1e-6, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T, H, Hkv, D", [(70, 4, 2, 64), (1, 2, 2, 16), (129, 3, 1, 128)])
def test_diagonal_logits_match_torch(dtype, T, H, Hkv, D, device):
    q = torch.randn(2, T, H + 1, D, device=device)[:, :, 1:].to(dtype)  # strided: heads 1..H of H+1
    k = torch.randn(2, T, Hkv, D, device=device).to(dtype)
    got, qn, kn = diagonal_logits(q, k, 0.3, norms=True)
    kk = k.double().repeat_interleave(H // Hkv, dim=2)
    want = 0.3 * torch.einsum("bthd,bthd->bht", q.double(), kk)
    assert got.shape == (2, H, T) and got.dtype == torch.float32
    assert torch.allclose(got.double(), want, rtol=1e-5, atol=1e-5)
    assert torch.equal(diagonal_logits(q, k, 0.3), got)
    for x, n in ((q, qn), (k, kn)):
        assert torch.allclose(n.double(), torch.linalg.vector_norm(x.double(), dim=-1).amax(dim=1), rtol=1e-6, atol=0)
