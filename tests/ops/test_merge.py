"""In-place log-sum-exp merge (Triton kernel in the interpreter) against the exact formula
in float64 and against attention over the union of two key sets."""

import pytest
import torch

from megatron_fox.ops.forgetting_attn.merge import merge_partial_, merge_reference_


def _exact(o_a, l_a, o_b, l_b, base2=False):
    l_a, l_b = l_a.double(), l_b.double()
    ln2 = torch.log(torch.tensor(2.0, dtype=torch.float64)) if base2 else 1.0
    lse = torch.logaddexp(l_a * ln2, l_b * ln2) / ln2  # base 2: log2(2^a + 2^b)
    wa = torch.exp((l_a - lse) * ln2).nan_to_num(0.0).transpose(1, 2)[..., None]
    wb = torch.exp((l_b - lse) * ln2).nan_to_num(0.0).transpose(1, 2)[..., None]
    return o_a.double() * wa + o_b.double() * wb, lse


@pytest.mark.parametrize("D,dtype", [(64, torch.float32), (128, torch.bfloat16)])
@pytest.mark.parametrize("base2", [False, True])
def test_merge_matches_formula_with_empty_rows_and_views(D, dtype, base2):
    B, T, H = 2, 45, 3  # T not a multiple of the kernel's row block
    big = torch.randn(B, 2 * T, H, D)
    lse_big = torch.randn(B, H, 2 * T) * 3
    rows = slice(T, 2 * T)  # merge into the second half: strided views, as the ring does
    o_b = torch.randn(B, T, H, D).to(dtype)
    lse_b = torch.randn(B, H, T) * 3
    lse_big[0, 1, T:T + 7] = float("-inf")  # rows empty on the accumulated side only
    lse_b[1, 2, :5] = float("-inf")  # empty on the new side only
    lse_big[1, 0, T + 10:T + 13] = float("-inf")  # empty on both: stay o = 0, lse = -inf
    lse_b[1, 0, 10:13] = float("-inf")
    big[1, 10:13, 0] = 0.0
    want_o, want_l = _exact(big[:, rows], lse_big[..., rows], o_b.float(), lse_b, base2)
    first_half = big[:, :T].clone()
    o_ref, l_ref = big[:, rows].clone(), lse_big[..., rows].clone()
    merge_reference_(o_ref, l_ref, o_b, lse_b, base2)  # the CPU path's merge
    torch.testing.assert_close(o_ref.double(), want_o, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(l_ref.double(), want_l, rtol=1e-5, atol=1e-5)
    merge_partial_(big[:, rows], lse_big[..., rows], o_b, lse_b, base2=base2)
    torch.testing.assert_close(big[:, rows].double(), want_o, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse_big[..., rows].double(), want_l, rtol=1e-5, atol=1e-5)
    assert torch.equal(big[:, :T], first_half)  # rows outside the view untouched
    assert torch.isneginf(lse_big[1, 0, T + 10:T + 13]).all() and (big[1, T + 10:T + 13, 0] == 0).all()


def test_merge_of_two_key_sets_is_attention_over_both():
    B, T, H, D, N = 1, 20, 2, 16, 30
    q, k, v = torch.randn(B, T, H, D), torch.randn(B, N, H, D), torch.randn(B, N, H, D)
    s = torch.einsum("bthd,bnhd->bhtn", q, k)

    def part(cols):
        lse = torch.logsumexp(s[..., cols], -1)
        o = torch.einsum("bhtn,bnhd->bthd", torch.softmax(s[..., cols], -1), v[:, cols])
        return o, lse

    o_acc, lse_acc = (t.contiguous() for t in part(slice(0, 12)))
    o_b, lse_b = part(slice(12, N))
    merge_partial_(o_acc, lse_acc, o_b, lse_b)
    o_all, lse_all = part(slice(0, N))
    torch.testing.assert_close(o_acc, o_all, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse_acc, lse_all, rtol=1e-5, atol=1e-5)
