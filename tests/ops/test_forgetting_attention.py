"""Triton forgetting attention against the float64 plain-PyTorch reference.

Tolerances: fp32 inputs, max abs error <= 2e-4 * max|ref| (ieee dots in fp32, float32
accumulation); bf16 inputs, ||out - ref|| / ||ref|| <= 1.5e-2 for outputs and gradients
(the reference sees the same bf16 inputs upcast to float64).
"""

import math
import os

import pytest
import torch
import torch.nn.functional as F

from megatron_fox.ops import forgetting_attention, forgetting_attention_reference
from megatron_fox.ops.reference import softmax_weight_before


def make_inputs(B, T, H, Hkv, D, dtype, device, gate_shift=2.0, rms_norm=False):
    q = torch.randn(B, T, H, D, device=device)
    k = torch.randn(B, T, Hkv, D, device=device)
    if rms_norm:  # |q_i| = |k_j| = sqrt(D): U = sqrt(D) bounds |q.k| / sqrt(D)
        q, k = F.rms_norm(q, (D,)), F.rms_norm(k, (D,))
    v = torch.randn(B, T, Hkv, D, device=device)
    log_f = F.logsigmoid(torch.randn(B, T, H, device=device) + gate_shift)
    q, k, v = (t.to(dtype).requires_grad_() for t in (q, k, v))
    return q, k, v, log_f.requires_grad_()


def check_close(out, ref, dtype, what):
    out, ref = out.double(), ref.double()
    assert torch.isfinite(out).all(), f"{what}: non-finite values"
    if dtype == torch.float32:
        err = (out - ref).abs().max().item()
        assert err <= 2e-4 * ref.abs().max().item() + 1e-6, f"{what}: max abs err {err}"
    else:
        rel = ((out - ref).norm() / ref.norm()).item()
        assert rel <= 1.5e-2, f"{what}: relative error {rel}"


def grads(out, inputs, dout):
    return torch.autograd.grad(out, inputs, dout)


def check_grads(out, ref, inputs, dtype):
    """The gradients of out and ref in inputs (q, k, v, log_fgate) for one random cotangent."""
    dout = torch.randn_like(out)
    for name, g, gr in zip("q k v log_fgate".split(), grads(out, inputs, dout), grads(ref, inputs, dout)):
        check_close(g, gr, dtype, f"d{name}")


@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("H,Hkv", [(2, 2), (4, 2)])
@pytest.mark.parametrize("log_eps", [None, -10.0])
def test_matches_reference(D, dtype, H, Hkv, log_eps, device):
    B, T = 2, 45 if D == 128 else 77  # not multiples of any tile
    q, k, v, log_f = make_inputs(B, T, H, Hkv, D, dtype, device)
    out = forgetting_attention(q, k, v, log_f, log_eps=log_eps)
    ref = forgetting_attention_reference(q, k, v, log_f, dtype=torch.float64)
    assert out.shape == q.shape and out.dtype == dtype
    check_close(out, ref, dtype, "out")
    dout = torch.randn_like(out)
    for name, g, gr in zip("q k v log_fgate".split(), grads(out, (q, k, v, log_f), dout),
                           grads(ref, (q, k, v, log_f), dout)):
        assert g.shape == gr.shape, name
        check_close(g, gr, dtype, f"d{name}")


@pytest.mark.parametrize("log_eps", [None, -10.0])
def test_packed_documents(log_eps, device):
    T, H, Hkv, D = 90, 4, 2, 64
    q, k, v, log_f = make_inputs(1, T, H, Hkv, D, torch.float32, device, gate_shift=0.0)
    # a one-token document, documents inside one tile and across tiles
    cu = torch.tensor([0, 5, 37, 38, 70, 90], dtype=torch.int32, device=device)
    out = forgetting_attention(q, k, v, log_f, cu_seqlens=cu, log_eps=log_eps)
    ref = forgetting_attention_reference(q, k, v, log_f, cu_seqlens=cu, dtype=torch.float64)
    check_close(out, ref, torch.float32, "out")
    # independent check: each document alone
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
        alone = forgetting_attention_reference(q[:, a:b], k[:, a:b], v[:, a:b], log_f[:, a:b].detach(),
                                               dtype=torch.float64)
        check_close(out[:, a:b], alone, torch.float32, f"document {a}:{b}")
    check_grads(out, ref, (q, k, v, log_f), torch.float32)


@pytest.mark.parametrize("D,dtype,log_eps,backward_pruning", [(64, torch.float32, None, "bound"),
                                                            (64, torch.float32, -10.0, "bound"),
                                                            (128, torch.bfloat16, -10.0, "lse")])
def test_documents_per_row(D, dtype, log_eps, backward_pruning, device):
    """A Megatron micro-batch: [s, b] memory order passed as transposed views, cu_seqlens over
    the b * s batch-major tokens (each row's start among them). Each document equals the
    reference on it alone; o comes back in q's memory order; all four gradients match."""
    T, B, H, Hkv = 40, 2, 4, 2
    qs, ks, vs = (torch.randn(T, B, h, D, device=device).to(dtype).requires_grad_() for h in (H, Hkv, Hkv))
    log_f = F.logsigmoid(torch.randn(B, T, H, device=device)).requires_grad_()
    # row 0: 0-17, 17-40; row 1: 40-41 (one token), 41-79, 79-80 (one token at the row's end)
    cu = torch.tensor([0, 17, 40, 41, 79, 80], dtype=torch.int32, device=device)
    q, k, v = (t.transpose(0, 1) for t in (qs, ks, vs))
    out = forgetting_attention(q, k, v, log_f, cu_seqlens=cu, log_eps=log_eps, backward_pruning=backward_pruning)
    if device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1":
        assert out.transpose(0, 1).is_contiguous()  # the kernel's o in [s, b] order, no copy
    ref = forgetting_attention_reference(q, k, v, log_f, cu_seqlens=cu, log_eps=log_eps, dtype=torch.float64)
    check_close(out, ref, dtype, "out")
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
        row, a, b = a // T, a % T, (b - 1) % T + 1
        sl = (slice(row, row + 1), slice(a, b))
        alone = forgetting_attention_reference(q[sl], k[sl], v[sl], log_f[sl].detach(), log_eps=log_eps,
                                               dtype=torch.float64)
        check_close(out[sl], alone, dtype, f"row {row} document {a}:{b}")
    check_grads(out, ref, (qs, ks, vs, log_f), dtype)


def test_documents_per_row_need_row_starts(device):
    q, k, v, log_f = make_inputs(2, 16, 2, 2, 64, torch.float32, device)
    with pytest.raises(ValueError, match="cu_seqlens must hold every sample's start"):
        forgetting_attention(q, k, v, log_f, cu_seqlens=torch.tensor([0, 10, 32], dtype=torch.int32, device=device))


def _row_key_start(stats, T):
    """First computed key per query row, [B, H, T]."""
    return stats.query_block_start.repeat_interleave(stats.block_m, dim=-1)[..., :T]


@pytest.mark.parametrize("bound", ["data", "float", "per_head"])
def test_acp_skips_and_respects_eps(bound, device):
    # long enough for whole key blocks to fall behind the boundary with the GPU's 64-row tiles
    B, T, H, D, log_eps = 2, (96 if device.type == "cpu" else 512), 4, 64, -10.0
    q, k, v, _ = make_inputs(B, T, H, H, D, torch.float32, device, rms_norm=True)
    # fast forgetting: about -2 per token in heads 0-1, slow (no pruning) in heads 2-3
    shift = torch.tensor([-2.0, -1.5, 4.0, 6.0], device=device)
    log_f = F.logsigmoid(torch.randn(B, T, H, device=device) * 0.1 + shift).requires_grad_()
    U = {"data": None, "float": math.sqrt(D) * 1.0001,
         "per_head": torch.full((H,), math.sqrt(D) * 1.0001, device=device)}[bound]
    out, stats = forgetting_attention(q, k, v, log_f, log_eps=log_eps, logit_bound=U, return_stats=True)
    assert stats.skipped_fraction.item() > 0.2
    assert (stats.skipped_fraction_per_head[:2] > 0.3).all()
    assert (stats.skipped_fraction_per_head[2:] == 0).all()
    # the pruned weight of every row, measured on the exact float64 softmax
    key_start = _row_key_start(stats, T)
    pruned_mass = softmax_weight_before(q, k, log_f.detach(), key_start)
    assert (pruned_mass <= math.exp(log_eps)).all(), pruned_mass.max()
    # every skipped pair satisfies the rule: c_i - c_j < -(2U + log T) + log_eps
    c = torch.cumsum(log_f.detach().double(), 1).transpose(1, 2)  # [B, H, T]
    Ud = torch.linalg.vector_norm(q.detach().double(), dim=-1).amax(1) * torch.linalg.vector_norm(
        k.detach().double(), dim=-1).amax(1) / math.sqrt(D) if U is None else torch.full((B, H), math.sqrt(D) * 1.0001)
    delta = -(2 * Ud.to(c.device) + math.log(T)) + log_eps
    j = torch.arange(T, device=device)
    skipped = j[None, None, None, :] < key_start[..., None]
    gap = c[..., :, None] - c[..., None, :]
    assert not (skipped & (gap >= delta[..., None, None])).any()
    # recount the skipped fraction from the boundary
    causal = j[None, :] <= j[:, None]
    assert stats.skipped_fraction.item() == pytest.approx(
        (skipped & causal).sum().item() / (causal.sum().item() * B * H), rel=1e-9)
    # output and gradients stay within the exact FoX result
    ref = forgetting_attention_reference(q, k, v, log_f, dtype=torch.float64)
    check_close(out, ref, torch.float32, "out")
    check_grads(out, ref, (q, k, v, log_f), torch.float32)


def test_no_pruning_without_log_eps(device):
    q, k, v, _ = make_inputs(1, 64, 2, 2, 64, torch.float32, device)
    log_f = torch.full((1, 64, 2), -3.0, device=device)
    _, stats = forgetting_attention(q, k, v, log_f, return_stats=True)
    assert stats.skipped_fraction.item() == 0.0
    assert (stats.query_block_start == 0).all()


def test_data_bound_covers_logits(device):
    from megatron_fox.ops.forgetting_attn.common import logit_bound_per_head

    q, k, _, _ = make_inputs(2, 50, 4, 2, 64, torch.float32, device)
    U = logit_bound_per_head(q.detach(), k.detach(), 0.125, None)
    logits = 0.125 * torch.einsum("bihd,bjhd->bhij", q.detach(), k.detach().repeat_interleave(2, dim=2))
    assert (logits.abs().amax((-1, -2)) <= U * (1 + 1e-6)).all()


def test_lse_and_its_gradient(device):
    q, k, v, log_f = make_inputs(2, 40, 2, 1, 64, torch.float32, device)
    cu = None
    out, lse = forgetting_attention(q, k, v, log_f, return_lse=True, cu_seqlens=cu)
    from megatron_fox.ops.forgetting_attn.reference import reference_attention_with_lse

    ref, ref_lse, _ = reference_attention_with_lse(q, k, v, log_f, sm_scale=0.125, dtype=torch.float64)
    check_close(lse, ref_lse, torch.float32, "lse")
    w = torch.randn_like(lse)
    loss, ref_loss = out.sum() + (lse * w).sum(), ref.sum() + (ref_lse * w).sum()
    for name, g, gr in zip("q k v log_fgate".split(), torch.autograd.grad(loss, (q, k, v, log_f)),
                           torch.autograd.grad(ref_loss, (q, k, v, log_f))):
        check_close(g, gr, torch.float32, f"d{name}")


def test_strided_megatron_layout(device):
    """[seq, batch, heads, dim] tensors passed as transposed views."""
    T, B, H, D = 33, 2, 2, 64
    qs, ks, vs = (torch.randn(T, B, H, D, device=device, requires_grad=True) for _ in range(3))
    log_f = F.logsigmoid(torch.randn(B, T, H, device=device))
    out = forgetting_attention(qs.transpose(0, 1), ks.transpose(0, 1), vs.transpose(0, 1), log_f)
    ref = forgetting_attention_reference(qs.transpose(0, 1).contiguous(), ks.transpose(0, 1).contiguous(),
                                         vs.transpose(0, 1).contiguous(), log_f, dtype=torch.float64)
    check_close(out, ref, torch.float32, "out")
    dout = torch.randn_like(out)
    g = torch.autograd.grad(out, (qs,), dout)[0]
    gr = torch.autograd.grad(ref, (qs,), dout)[0]
    check_close(g, gr, torch.float32, "dq")


@pytest.mark.parametrize("case", ["gqa_bf16_acp", "varlen_fp32", "strided", "aligned_rows"])
def test_tma_tile_loads(case, device, monkeypatch):
    """Every kernel reading its tiles through 4-d TMA descriptors (zero fill past T), and
    the keys' prefix sums through a 2-d one (rows padded where T is not a multiple of 4;
    read in place where it is: "aligned_rows"), gives the reference's output and
    gradients, like the pointer path."""
    from megatron_fox.ops.forgetting_attn import function, tiles

    used = []
    real_tiles = function._tiles
    def spy(tma, *pairs):  # the q/k/v(/dO) loads of each launch
        if len(pairs) >= 3:
            used.append(tma)
        return real_tiles(tma, *pairs)

    monkeypatch.setattr(function, "_tiles", spy)
    tiles.set_tma(True)
    gluon_was = function.set_gluon_forward(False)  # the Triton forward's loads (Gluon: tests/gpu)
    try:
        cu, log_eps, dtype = None, None, torch.float32
        if case == "gqa_bf16_acp":
            q, k, v, log_f = make_inputs(2, 45, 4, 2, 128, torch.bfloat16, device, gate_shift=-1.0)
            log_eps, dtype = -10.0, torch.bfloat16
        elif case == "aligned_rows":
            q, k, v, log_f = make_inputs(1, 48, 2, 2, 64, torch.float32, device, gate_shift=-1.0)
            log_eps = -10.0
        elif case == "varlen_fp32":
            q, k, v, log_f = make_inputs(1, 70, 2, 1, 64, torch.float32, device)
            cu = torch.tensor([0, 9, 40, 70], dtype=torch.int32, device=device)
        else:  # [seq, batch, heads, dim] storage seen through a transpose
            qs, ks, vs = (torch.randn(37, 2, 2, 64, device=device) for _ in range(3))
            q, k, v = (t.transpose(0, 1).requires_grad_() for t in (qs, ks, vs))
            log_f = F.logsigmoid(torch.randn(2, 37, 2, device=device)).requires_grad_()
        out = forgetting_attention(q, k, v, log_f, log_eps=log_eps, cu_seqlens=cu)
        ref = forgetting_attention_reference(q, k, v, log_f, cu_seqlens=cu, dtype=torch.float64)
        check_close(out, ref, dtype, "out")
        check_grads(out, ref, (q, k, v, log_f), dtype)
    finally:
        tiles.set_tma(None)
        function.set_gluon_forward(gluon_was)
    assert used == [True, True, True], used  # forward, dK/dV, dQ


def test_backward_pruning_by_lse(device):
    """backward_pruning="lse": the backward skips more than the forward, every pair it skips
    weighs < eps / T on the exact softmax, and the gradients stay within the exact FoX ones."""
    from megatron_fox.ops.forgetting_attn import boundary
    from megatron_fox.ops.forgetting_attn.tiles import kernel_config

    B, T, H, D, log_eps = 1, (192 if device.type == "cpu" else 1024), 4, 64, -10.0
    # q and k nearly parallel: every logit near the bound U, so the guarantee is tight
    u = torch.randn(D, device=device)
    q, k = (F.rms_norm(u + 0.05 * torch.randn(B, T, H, D, device=device), (D,)) for _ in range(2))
    q, k = q.requires_grad_(), k.requires_grad_()
    v = torch.randn(B, T, H, D, device=device, requires_grad=True)
    shift = torch.tensor([-1.3, 1.05, 2.5, 6.0], device=device)  # log f ~ -1.6, -0.3, -0.08, 0 per token
    log_f = F.logsigmoid(torch.randn(B, T, H, device=device) * 0.1 + shift).requires_grad_()
    out, lse, stats = forgetting_attention(q, k, v, log_f, log_eps=log_eps, return_lse=True, return_stats=True,
                                           backward_pruning="lse")
    # the dQ kernel's boundary, rebuilt from the op's lse
    U = torch.linalg.vector_norm(q.detach(), dim=-1).amax(1) * torch.linalg.vector_norm(k.detach(), dim=-1).amax(1)
    U = U / math.sqrt(D)
    delta = -(2 * U + math.log(T)) + log_eps
    tile = kernel_config(D, device, q.dtype).dq
    c = torch.cumsum(log_f.detach(), 1).transpose(1, 2).contiguous()
    thr = boundary.lse_threshold(delta, U, lse.detach(), tile.block_m)
    start_bwd = boundary.key_block_start(c, c, thr, None, tile.block_m, tile.block_n)
    start_fwd = boundary.key_block_start(c, c, delta, None, tile.block_m, tile.block_n)
    assert (start_bwd >= start_fwd).all() and (start_bwd > start_fwd).any()
    key_start = (start_bwd.long() * tile.block_n).repeat_interleave(tile.block_m, dim=-1)[..., :T]
    assert (softmax_weight_before(q, k, log_f.detach(), key_start) <= math.exp(log_eps)).all()
    # and each skipped pair alone weighs < eps / T (the per-pair bound behind the row sum)
    s = torch.einsum("bihd,bjhd->bhij", q.detach().double(), k.detach().double()) / math.sqrt(D)
    s = s + c.double()[..., :, None] - c.double()[..., None, :]
    j = torch.arange(T, device=device)
    p = torch.softmax(s.masked_fill(j[None, :] > j[:, None], -math.inf), -1)
    skipped = j[None, None, None, :] < key_start[..., None]
    assert p[skipped].max().item() < math.exp(log_eps) / T
    causal = j[None, :] <= j[:, None]
    assert stats.backward_skipped_fraction.item() == pytest.approx(
        (skipped & causal).sum().item() / (causal.sum().item() * B * H), rel=1e-9)
    assert stats.backward_skipped_fraction.item() > stats.skipped_fraction.item()
    ref = forgetting_attention_reference(q, k, v, log_f, dtype=torch.float64)
    check_grads(out, ref, (q, k, v, log_f), torch.float32)
    with pytest.raises(ValueError, match="backward_pruning"):
        forgetting_attention(q, k, v, log_f, log_eps=log_eps, backward_pruning="rowmax")


@pytest.mark.parametrize("docs", [False, True])
def test_exact_skips_only_zero_blocks(docs, device):
    """Exact FoX: forward and backward skip blocks whose weights are zero in float32 (the
    forward finds them by the diagonal logits, the backward by the rows' lse), and output and
    gradients equal those computed without skipping to the bit; also with packed documents."""
    from megatron_fox.ops import set_zero_block_skipping

    B, T, H, D = 1, (192 if device.type == "cpu" else 2048), 2, 64
    u = torch.randn(D, device=device)  # q and k nearly parallel: logits near the bound U
    q, k = (F.rms_norm(u + 0.05 * torch.randn(B, T, H, D, device=device), (D,)).requires_grad_() for _ in range(2))
    v = torch.randn(B, T, H, D, device=device, requires_grad=True)
    # head 0: log f ~ -3 per token (zero blocks); head 1: ~ -0.3 (none within T, but visible
    # weights a few dozen tokens back: a threshold too high would change its gradients)
    shift = torch.tensor([-3.0, 1.05], device=device)
    log_f = F.logsigmoid(torch.randn(B, T, H, device=device) * 0.1 + shift).requires_grad_()
    dout = torch.randn(B, T, H, D, device=device)
    cu = torch.tensor([0, T // 3 + 5, T], dtype=torch.int32, device=device) if docs else None
    results = {}
    for skip in (False, True):
        was = set_zero_block_skipping(skip)
        try:
            out, stats = forgetting_attention(q, k, v, log_f, return_stats=True, cu_seqlens=cu)
            results[skip] = (out, stats.backward_skipped_fraction.item(), grads(out, (q, k, v, log_f), dout),
                             stats.skipped_fraction.item())
        finally:
            set_zero_block_skipping(was)
    least = 0.05 if docs else 0.2  # (documents leave fewer far pairs)
    assert results[False][1] == 0.0 and results[True][1] > least
    assert results[False][3] == 0.0 and results[True][3] > least
    assert torch.equal(results[True][0], results[False][0])
    for name, a, b in zip("q k v log_fgate".split(), results[True][2], results[False][2]):
        assert torch.equal(a, b), name
