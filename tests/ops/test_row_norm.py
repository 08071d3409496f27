"""The row-norm kernel behind ACP's data bound against float64 norms in torch."""

import pytest
import torch

from megatron_fox.ops.forgetting_attn.row_norm import max_row_norm


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T, D", [(70, 64), (1, 16), (129, 128)])
def test_max_row_norm_matches_torch(dtype, T, D, device):
    big = torch.randn(2, T, 5, D, device=device) * torch.rand(2, T, 5, 1, device=device) * 3
    x = big[:, :, 1:4].to(dtype)  # a strided view: heads 1..3 of 5
    got = max_row_norm(x)
    want = torch.linalg.vector_norm(x.double(), dim=-1).amax(dim=1)
    assert got.shape == (2, 3) and got.dtype == torch.float32
    assert torch.allclose(got.double(), want, rtol=1e-6, atol=0)
