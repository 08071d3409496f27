"""Block boundaries (boundary.py) against a brute-force loop over every (query block, key
block) pair, with one threshold per head and one per query block (the backward's)."""


import pytest
import torch
import torch.nn.functional as F

from megatron_fox.ops.forgetting_attn import boundary


def _brute_live(c, delta_blocks, block_m, block_n):
    """live[b, h, m, n] by the definition: a key block is live for query block m when
    c[q0_m'] - c[ne_n] >= delta_m' for m itself or any later query block m' (the running
    max that keeps the set a prefix/suffix)."""
    B, H, T = c.shape
    nbm, nbn = -(-T // block_m), -(-T // block_n)
    live = torch.zeros(B, H, nbm, nbn, dtype=torch.bool)
    for b in range(B):
        for h in range(H):
            for m in range(nbm):
                for n in range(nbn):
                    ne = min((n + 1) * block_n, T) - 1
                    live[b, h, m, n] = any(c[b, h, mm * block_m] - c[b, h, ne] >= delta_blocks[b, h, mm]
                                           for mm in range(m, nbm))
    return live


@pytest.mark.parametrize("T, block_m, block_n", [(100, 16, 32), (97, 32, 16), (64, 16, 16)])
@pytest.mark.parametrize("per_block", [False, True])
def test_boundaries_equal_brute_force(T, block_m, block_n, per_block):
    B, H = 2, 3
    # non-increasing; per block: slow enough (< 1 a block) that the running max matters
    c = F.logsigmoid(torch.randn(B, H, T) + (4.0 if per_block else -1.0)).cumsum(-1)
    nbm = -(-T // block_m)
    if per_block:
        delta = -3.0 - 4.0 * torch.rand(B, H, nbm)  # not monotone along the blocks
        delta_blocks = delta
    else:
        delta = -3.0 - 4.0 * torch.rand(B, H)
        delta_blocks = delta[..., None].expand(B, H, nbm)
    live = _brute_live(c, delta_blocks, block_m, block_n)
    start = boundary.key_block_start(c, c, delta, None, block_m, block_n)
    end = boundary.query_block_end(c, c, delta, None, block_m, block_n)
    nbn = live.shape[-1]
    n = torch.arange(nbn)
    m = torch.arange(nbm)
    # the dQ loop (key blocks from start) and the dK/dV loop (query blocks below end) cover
    # exactly the live blocks
    assert torch.equal(n[None, None, None, :] >= start[..., None].long(), live)
    assert torch.equal(m[None, None, :, None] < end[..., None, :].long(), live)
    if not per_block:  # one threshold: no running max needed, the live set is exact
        exact = c[..., ::block_m][..., :, None] - c[..., (n + 1).mul(block_n).clamp(max=T) - 1][..., None, :]
        assert torch.equal(live, exact >= delta[..., None, None])


def test_lse_threshold_bounds_and_rows():
    B, H, T, bm = 2, 2, 70, 16
    delta, U = torch.full((B, H), -30.0), torch.full((B, H), 8.0)
    lse = torch.randn(B, H, T) * 3
    lse[0, 0, 5] = -50.0  # a row below -U: the threshold never goes below delta
    thr = boundary.lse_threshold(delta, U, lse, bm)
    assert thr.shape == (B, H, 5)
    for blk in range(5):
        rows = lse[..., blk * bm:min((blk + 1) * bm, T)]
        want = torch.maximum(rows.min(-1).values + (delta + U), delta)
        assert torch.equal(thr[..., blk], want), blk
    assert thr[0, 0, 0] == -30.0 and (thr >= delta[..., None]).all()


@pytest.mark.parametrize("T, block_m, block_n", [(100, 16, 32), (97, 32, 16), (300, 64, 64), (257, 128, 64)])
@pytest.mark.parametrize("delta_kind", [None, "head", "block"])
@pytest.mark.parametrize("docs", [False, True])
@pytest.mark.parametrize("cross", [False, True])
@pytest.mark.parametrize("ties", [False, True])
def test_fused_boundaries_equal_torch_path(device, T, block_m, block_n, delta_kind, docs, cross, ties):
    """The one-launch Triton boundaries (boundary_triton.py; CPU: the interpreter) give the
    torch path's integers: self-attention (c_q = c_k) and a past key chunk (c_k above c_q,
    as in the ring), thresholds per head or per query block, with and without documents.
    ties: whole-number gates and thresholds, so that c[m0] - c[ne] == delta happens and the
    comparisons' strictness (a block exactly at the threshold is live) is checked."""
    from megatron_fox.ops.forgetting_attn.boundary_triton import block_boundaries
    from megatron_fox.ops.forgetting_attn.common import document_maps

    B, H = 2, 3
    nbm = -(-T // block_m)
    if ties:
        c_q = -torch.randint(0, 2, (B, H, T)).float().cumsum(-1)
        c_k = c_q + 40.0 if cross else c_q
        draw = {None: None, "head": (B, H), "block": (B, H, nbm)}[delta_kind]
        delta = None if draw is None else -torch.randint(2, 30, draw).float()
    else:
        c_q = F.logsigmoid(torch.randn(B, H, T) + 2.0).cumsum(-1)
        c_k = F.logsigmoid(torch.randn(B, H, T) + 2.0).cumsum(-1) - c_q[..., -1:] * 0.9 if cross else c_q
        delta = {None: None, "head": -3.0 - 6.0 * torch.rand(B, H),
                 "block": -3.0 - 6.0 * torch.rand(B, H, nbm)}[delta_kind]
    doc_start = doc_end = None
    if docs:
        cuts = torch.randperm(T - 1)[:3].add(1).sort().values
        cu = torch.cat([torch.tensor([0]), cuts, torch.tensor([T])]).int()
        doc_start, doc_end = document_maps(cu, T, "cpu")
    want_start = boundary.key_block_start(c_q, c_k, delta, doc_start, block_m, block_n)
    want_end = boundary.query_block_end(c_q, c_k, delta, doc_end, block_m, block_n)
    if delta is not None and not cross:  # the searches land inside the range, not only at its ends
        assert 0 < want_start.float().mean() < T / block_n - 1
    on = {"c_q": c_q.to(device), "c_k": c_k.to(device), "delta": None if delta is None else delta.to(device)}
    got_start = block_boundaries(on["c_q"], on["c_k"], on["delta"], None if doc_start is None else doc_start.to(device),
                                 block_m, block_n, end=False)
    got_end = block_boundaries(on["c_q"], on["c_k"], on["delta"], None if doc_end is None else doc_end.to(device),
                               block_m, block_n, end=True)
    assert torch.equal(got_start.cpu(), want_start)
    assert torch.equal(got_end.cpu(), want_end)
