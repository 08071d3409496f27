"""The per-micro-batch cache of document maps: a hit only for the same, unmodified tensor."""

import torch

from megatron_fox.ops._memo import memo_on_first_tensor
from megatron_fox.ops.forgetting_attn.common import document_maps


def test_document_maps_cached_per_tensor_and_fresh_after_changes():
    calls = []

    @memo_on_first_tensor
    def starts(cu, n):
        calls.append(n)
        return torch.repeat_interleave(cu[:-1], cu.diff())[:n]

    cu = torch.tensor([0, 3, 7, 10])
    first = starts(cu, 10)
    assert starts(cu, 10) is first and len(calls) == 1  # same tensor, same args: cached
    assert starts(cu, 9).shape == (9,) and len(calls) == 2  # other args: recomputed
    cu[1] = 2  # changed in place: recomputed, and right
    assert starts(cu, 10).tolist() == [0, 0, 2, 2, 2, 2, 2, 7, 7, 7] and len(calls) == 3
    other = torch.tensor([0, 5, 10])  # a new micro-batch's tensor
    assert starts(other, 10).tolist() == [0] * 5 + [5] * 5 and len(calls) == 4


def test_document_maps_match_a_loop():
    for _ in range(3):
        cuts = sorted(set(torch.randint(1, 50, (6,)).tolist()))
        cu = torch.tensor([0, *cuts, 50], dtype=torch.int32)
        start, end = document_maps(cu, 50, torch.device("cpu"))
        for t in range(50):
            d = max(i for i in range(len(cu) - 1) if cu[i] <= t)
            assert (start[t].item(), end[t].item()) == (cu[d].item(), cu[d + 1].item())


def test_document_start_mask_matches_offsets():
    from megatron_fox.ops.token_shift import document_start_mask

    b, s = 3, 7
    cu = torch.tensor([0, 2, 7, 9, 15, 21], dtype=torch.int32)  # batch-major flattening of [3, 7]
    mask = document_start_mask(cu, s, b)
    assert mask.shape == (s, b)
    flat = {int(x) for x in cu[:-1]}
    for j in range(b):
        for i in range(s):
            assert bool(mask[i, j]) == (j * s + i in flat)
