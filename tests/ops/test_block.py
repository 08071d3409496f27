"""Block-level forward/backward of context parallelism (diagonal and past chunk) against the
plain-PyTorch block reference, with the merged output and log-sum-exp of other chunks."""

import pytest
import torch
import torch.nn.functional as F

from megatron_fox.ops.forgetting_attn.block import _reference_backward, _reference_forward, block_backward, block_forward

from .test_forgetting_attention import check_close, make_inputs


@pytest.mark.parametrize("causal", [True, False])
def test_block_forward_backward(causal, device):
    B, T, H, Hkv, D = 1, 40, 4, 2, 64
    q, k, v, _ = (t.detach() for t in make_inputs(B, T, H, Hkv, D, torch.float32, device))
    c = torch.cumsum(F.logsigmoid(torch.randn(B, H, 2 * T, device=device) + 2.0), -1)
    c_q, c_k = (c[..., :T], c[..., :T]) if causal else (c[..., T:], c[..., :T])
    o, lse, _ = block_forward(q, k, v, c_q, c_k, sm_scale=D ** -0.5, causal=causal)
    c_q0, c_k0 = c_q - c_k[..., :1], c_k - c_k[..., :1]
    o_ref, lse_ref = _reference_forward(q, k, v, c_q0, c_k0, D ** -0.5, causal, None)
    check_close(o, o_ref, torch.float32, "o")
    check_close(lse, lse_ref, torch.float32, "lse")
    # as if merged with other chunks' partial results (so the row sums of dS are not ~0)
    o, lse = o + 0.3 * torch.randn_like(o), lse + 0.7
    do = torch.randn_like(o)
    got = block_backward(q, k, v, o, do, lse, c_q, c_k, sm_scale=D ** -0.5, causal=causal)
    ref = _reference_backward(q, k, v, o, do, lse, c_q0, c_k0, D ** -0.5, causal, None)
    for name, g, gr in zip(["dq", "dk", "dv", "dc_q", "dc_k"], got, ref):
        assert gr.abs().max() > 0, name
        check_close(g, gr, torch.float32, name)


def test_block_backward_prunes_by_lse(device, monkeypatch):
    """With `bound` the block backward's kernels prune by the rows' lse: a per-query-block
    threshold reaches the boundary search, fewer key blocks are computed, and the gradients
    stay within the reference's (which prunes by delta alone)."""
    import math

    from megatron_fox.ops.forgetting_attn import boundary, tiles

    B, T, H, Hkv, D = 1, 96, 2, 2, 64
    q, k, v, _ = (t.detach() for t in make_inputs(B, T, H, Hkv, D, torch.float32, device, rms_norm=True))
    c = torch.cumsum(F.logsigmoid(torch.randn(B, H, T, device=device) * 0.1 - 1.3), -1)  # ~ -1.6 a token
    U = torch.full((B, H), math.sqrt(D) * 1.0001, device=device)
    delta = -(2 * U + math.log(T)) - 10.0
    o, lse, _ = block_forward(q, k, v, c, c, sm_scale=D ** -0.5, causal=True, delta=delta)
    o, lse = o + 0.3 * torch.randn_like(o), lse + 0.7  # as if merged with other chunks
    do = torch.randn_like(o)
    starts = {}
    real = boundary.key_block_start

    def spy(c_q, c_k, d, *args, **kw):
        out = real(c_q, c_k, d, *args, **kw)
        if d is not None and d.shape[-1] == out.shape[-1] and d.dim() == 3:
            starts["lse"] = out
        elif d is not None:
            starts.setdefault("bound", out)
        return out

    monkeypatch.setattr(boundary, "key_block_start", spy)
    # Small tiles on every device: the lse start must be able to pass the bound's by a key
    # block, which the GPU's 64-row query blocks at T=96 cannot show.
    monkeypatch.setattr(tiles, "_override", tiles.KernelConfig(
        fwd=tiles.Tile(16, 16, 1, 1), dkdv=tiles.Tile(16, 32, 1, 1), dq=tiles.Tile(32, 16, 1, 1)))
    got = block_backward(q, k, v, o, do, lse, c, c, sm_scale=D ** -0.5, causal=True, delta=delta, bound=U)
    ref = _reference_backward(q, k, v, o, do, lse, c - c[..., :1], c - c[..., :1], D ** -0.5, True, delta)
    for name, g, gr in zip(["dq", "dk", "dv", "dc_q", "dc_k"], got, ref):
        check_close(g, gr, torch.float32, name)
    t = tiles.kernel_config(D, q.device, q.dtype).dq
    bound_start = real(c, c, delta, None, t.block_m, t.block_n)
    assert "lse" in starts and (starts["lse"] >= bound_start).all() and (starts["lse"] > bound_start).any()


def test_block_backward_thresholds_shared_across_key_chunks(device):
    """A ring reuses one query chunk's lse thresholds (`thresholds=`) for all its key chunks,
    also after a chunk whose heads were not sent (c_k = +1e30, as exchange.py fills them):
    every gradient equals the one computed without sharing."""
    import math

    B, T, H, Hkv, D = 1, 64, 2, 2, 64
    q, k1, v1, _ = (t.detach() for t in make_inputs(B, T, H, Hkv, D, torch.float32, device, rms_norm=True))
    _, k2, v2, _ = (t.detach() for t in make_inputs(B, T, H, Hkv, D, torch.float32, device, rms_norm=True))
    c = torch.cumsum(F.logsigmoid(torch.randn(B, H, 3 * T, device=device) * 0.1 - 2.0), -1)
    c_q = c[..., 2 * T:]
    c_dead = c[..., T:2 * T].clone()
    c_dead[:, 1] = 1e30  # head 1 of this key chunk not sent: all its pairs pruned
    U = torch.full((B, H), math.sqrt(D) * 1.0001, device=device)
    delta = -(2 * U + math.log(3 * T)) - 10.0
    o, lse = torch.randn(B, T, H, D, device=device), torch.randn(B, H, T, device=device) + 3.0
    do = torch.randn_like(o)
    pairs = [(k2, v2, c_dead, False), (k1, v1, c[..., :T], False), (q, v1, c_q, True)]
    shared = {}
    for kk, vv, cc, causal in pairs:
        kw = dict(sm_scale=D ** -0.5, causal=causal, delta=delta, bound=U)
        alone = block_backward(q, kk, vv, o, do, lse, c_q, cc, **kw)
        reused = block_backward(q, kk, vv, o, do, lse, c_q, cc, thresholds=shared, **kw)
        for name, a, b in zip(["dq", "dk", "dv", "dc_q", "dc_k"], alone, reused):
            assert torch.equal(a, b), name
    assert len(shared) >= 1
