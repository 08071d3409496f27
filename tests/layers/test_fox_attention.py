"""FoX-Pro attention layer against an independent plain-PyTorch rewrite of its math."""

import math
import os

import pytest
import torch
import torch.nn.functional as F

from megatron_fox.ops import forgetting_attention_reference
from megatron_fox.ops.token_shift import head_rms_norm, token_shift


def test_token_shift_matches_loop():
    s, b, h, d = 9, 2, 3, 4
    x, logit = torch.randn(s, b, h, d), torch.randn(s, b, h)
    starts = torch.zeros(s, b, dtype=torch.bool)
    starts[4, 0] = starts[7, 1] = True
    prev0 = torch.randn(1, b, h, d)
    out = token_shift(x, logit, starts, prev0)
    for t in range(s):
        for j in range(b):
            prev = prev0[0, j] if t == 0 else x[t - 1, j]
            if starts[t, j]:
                prev = torch.zeros_like(prev)
            a = torch.sigmoid(logit[t, j])[:, None]
            torch.testing.assert_close(out[t, j], a * prev + (1 - a) * x[t, j])


def _layer(num_kv=2, kv_shift=True, output_gate=True):
    from megatron_fox.layers import FoxSelfAttention, FoxTransformerConfig, get_fox_layer_spec

    cfg = FoxTransformerConfig(num_layers=1, hidden_size=64, num_attention_heads=4, num_query_groups=num_kv,
                               ffn_hidden_size=128, normalization="RMSNorm", add_bias_linear=False,
                               hidden_dropout=0.0, attention_dropout=0.0, use_cpu_initialization=True,
                               layernorm_epsilon=1e-6, fox_kv_shift=kv_shift, fox_output_gate=output_gate,
                               fox_output_norm=output_gate, acp_log_eps=-10.0)
    spec = get_fox_layer_spec("local").submodules.self_attention
    layer = FoxSelfAttention(cfg, spec.submodules, layer_number=1)
    with torch.no_grad():  # non-trivial per-head parameters
        for p in layer.head_params.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return layer, cfg


@pytest.mark.parametrize("num_kv,kv_shift,output_gate", [(2, True, True), (4, False, False), (1, True, False)])
def test_layer_matches_plain_rewrite(megatron_world, num_kv, kv_shift, output_gate):
    layer, cfg = _layer(num_kv, kv_shift, output_gate)
    s, b, H, d = 24, 2, 4, 16
    x = torch.randn(s, b, 64, requires_grad=True)
    out, _ = layer(x)
    # plain rewrite: per key/value group g the fused GEMM holds [q (H/G heads) | k | v | f (H/G) | o (H/G heads) | 2]
    W = layer.linear_qkv.weight.detach()
    hpg = H // num_kv
    sizes = [hpg * d, d, d, hpg] + ([hpg * d] if output_gate else []) + ([2] if kv_shift else [])
    pad = -sum(sizes) % 8  # each group's rows padded with zeros to a multiple of 8 (aligned GEMM output)
    assert pad > 0 and W.shape[0] == num_kv * (sum(sizes) + pad)
    assert W.view(num_kv, sum(sizes) + pad, -1)[:, sum(sizes):].abs().max() == 0
    per_group = (x @ W.t()).view(s, b, num_kv, sum(sizes) + pad).split(sizes + [pad], dim=-1)[:-1]
    q = per_group[0].reshape(s, b, H, d)
    k, v, f = per_group[1], per_group[2], per_group[3].reshape(s, b, H)
    hp = layer.head_params
    if kv_shift:
        sh = per_group[-1]
        k = token_shift(k, sh[..., 0])
        v = token_shift(v, sh[..., 1])
    q, k = head_rms_norm(q, hp.q_norm, 1e-5), head_rms_norm(k, hp.k_norm, 1e-5)
    log_f = F.logsigmoid(f + hp.fgate_bias)
    o = forgetting_attention_reference(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
                                       log_f.transpose(0, 1).contiguous(), dtype=torch.float64).transpose(0, 1)
    if output_gate:
        o = head_rms_norm(o, hp.output_norm, 1e-6) * torch.sigmoid(per_group[4].reshape(s, b, H, d))
    ref = o.reshape(s, b, H * d) @ layer.linear_proj.weight.detach().t()
    torch.testing.assert_close(out, ref.to(out.dtype), rtol=2e-4, atol=2e-5)
    g, gr = torch.autograd.grad(out.sum(), x, retain_graph=True), torch.autograd.grad(ref.sum(), x)
    torch.testing.assert_close(g[0], gr[0], rtol=2e-4, atol=2e-5)
    (gw,) = torch.autograd.grad(out.sum(), layer.linear_qkv.weight)  # the padding rows learn nothing
    gw = gw.view(num_kv, sum(sizes) + pad, -1)
    assert gw[:, sum(sizes):].abs().max() == 0 and gw[:, :sum(sizes)].abs().min(-1).values.gt(0).all()


def test_qk_norm_bound_covers_logits(megatron_world):
    layer, cfg = _layer()
    U = layer.logit_bound()  # [heads]
    s, b, d = 40, 2, 16
    q = head_rms_norm(torch.randn(s, b, 4, d) * 5, layer.head_params.q_norm.detach(), 1e-6)
    k = head_rms_norm(torch.randn(s, b, 2, d) * 5, layer.head_params.k_norm.detach(), 1e-6)
    logits = torch.einsum("sbhd,tbhd->bhst", q, k.repeat_interleave(2, dim=2)) / math.sqrt(d)
    assert (logits.abs().amax(dim=(0, 2, 3)) <= U * (1 + 1e-5)).all()
    # and it is tight: with constant weights per head, q_i = k_j (same direction) reaches it
    hp = layer.head_params
    with torch.no_grad():
        hp.q_norm.copy_(torch.tensor([0.5, 1.0, 1.5, 2.0])[:, None].expand(4, d))
        hp.k_norm.copy_(torch.tensor([1.0, 3.0])[:, None].expand(2, d))
    U = layer.logit_bound()
    x = torch.randn(d).expand(s, b, 4, d)
    q = head_rms_norm(x, hp.q_norm.detach(), 0.0)
    k = head_rms_norm(x[:, :, :2], hp.k_norm.detach(), 0.0)
    logits = torch.einsum("sbhd,tbhd->bhst", q, k.repeat_interleave(2, dim=2)) / math.sqrt(d)
    assert torch.allclose(logits.abs().amax(dim=(0, 2, 3)), U, rtol=1e-4)


def _rope_angles(s, d, base=10000.0):
    """[s, 1, 1, d] rotation angles of positions 0..s-1 (channel i and i + d/2 share a frequency)."""
    inv = base ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    ang = torch.arange(s, dtype=torch.float64)[:, None] * inv[None]
    return torch.cat([ang, ang], dim=-1)[:, None, None, :]


def _rotate(t, ang):
    half = t.shape[-1] // 2
    turned = torch.cat([-t[..., half:], t[..., :half]], dim=-1)
    return t * torch.cos(ang) + turned * torch.sin(ang)


@pytest.mark.parametrize("forget_gate,rope,documents", [(False, True, False), (False, True, True),
                                                         (False, False, True), (True, True, True)])
def test_rope_and_no_forget_gate_layer_matches_plain_attention(megatron_world, forget_gate, rope, documents):
    """fox_forget_gate False (the Transformer baseline): no forget-gate columns in the GEMM,
    causal softmax attention (within documents when packed); rope: rotary positions on q
    and k after the QK-norm; FoX with rope adds the decay bias c_i - c_j (restarting at each
    document) to the rotated logits."""
    from megatron.core.packed_seq_params import PackedSeqParams

    from megatron_fox.layers import FoxSelfAttention, FoxTransformerConfig, get_fox_layer_spec

    H, G, d, s, b = 4, 2, 16, 20, 2
    cfg = FoxTransformerConfig(num_layers=1, hidden_size=64, num_attention_heads=H, num_query_groups=G,
                               ffn_hidden_size=128, normalization="RMSNorm", add_bias_linear=False,
                               hidden_dropout=0.0, attention_dropout=0.0, use_cpu_initialization=True,
                               layernorm_epsilon=1e-6, fox_kv_shift=False, fox_forget_gate=forget_gate,
                               acp_log_eps=None)
    layer = FoxSelfAttention(cfg, get_fox_layer_spec("local").submodules.self_attention.submodules, layer_number=1)
    hp = layer.head_params
    assert hasattr(hp, "fgate_bias") == forget_gate
    with torch.no_grad():
        for p in hp.parameters():
            p.add_(0.3 * torch.randn_like(p))
    x = torch.randn(s, b, 64, requires_grad=True)
    ang = _rope_angles(s, d)
    cu = torch.tensor([0, 7, 20, 31, 40], dtype=torch.int32)  # batch-major offsets over b * s tokens
    psp = PackedSeqParams(qkv_format="sbhd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=s, max_seqlen_kv=s)
    out, _ = layer(x, packed_seq_params=psp if documents else None, rotary_pos_emb=ang.float() if rope else None)

    W = layer.linear_qkv.weight.detach().double()
    hpg = H // G
    sizes = [hpg * d, d, d] + ([hpg] if forget_gate else []) + [hpg * d]  # q | k | v | (f) | output gate
    sizes.append(-sum(sizes) % 8)  # | zero padding to a multiple of 8
    assert W.shape[0] == G * sum(sizes)
    parts = list((x.double() @ W.t()).view(s, b, G, sum(sizes)).split(sizes, dim=-1))[:-1]
    q = head_rms_norm(parts[0].reshape(s, b, H, d), hp.q_norm.double(), 1e-5)
    k = head_rms_norm(parts[1], hp.k_norm.double(), 1e-5).repeat_interleave(hpg, dim=2)
    v = parts[2].repeat_interleave(hpg, dim=2)
    doc = torch.zeros(b * s, dtype=torch.long)
    if documents:
        doc[cu[1:-1].long()] = 1
        doc = doc.cumsum(0)
    doc = doc.view(b, s)
    if rope and documents:
        # positions restarting at each document (--reset-position-ids): the same attention,
        # as rope's logits depend on the distance within a document only
        pos_in_doc = torch.arange(b * s) - cu.long()[doc.flatten()]  # doc ids count over the b * s tokens
        ang = _rope_angles(s, d)[pos_in_doc.view(b, s).t()].squeeze(2)  # [s, b, 1, d]
    if rope:
        q, k = _rotate(q, ang), _rotate(k, ang)
    pos = torch.arange(s)
    allowed = (pos[None, :, None] >= pos[None, None, :]) & (doc[:, :, None] == doc[:, None, :])  # [b, i, j]
    logits = torch.einsum("ibhd,jbhd->bhij", q, k) / math.sqrt(d)
    if forget_gate:  # c_i - c_j = sum of log f over (j, i]: the same within a document
        log_f = F.logsigmoid(parts[3].reshape(s, b, H) + hp.fgate_bias.double()).permute(1, 2, 0)  # [b, h, s]
        c = log_f.cumsum(-1)
        logits = logits + c[..., :, None] - c[..., None, :]
    p = torch.softmax(logits.masked_fill(~allowed[:, None], float("-inf")), dim=-1)
    o = torch.einsum("bhij,jbhd->ibhd", p, v)
    o = head_rms_norm(o, hp.output_norm.double(), 1e-6) * torch.sigmoid(parts[-1].reshape(s, b, H, d))
    ref = o.reshape(s, b, H * d) @ layer.linear_proj.weight.detach().double().t()
    torch.testing.assert_close(out.double(), ref, rtol=2e-4, atol=2e-5)
    g, gr = torch.autograd.grad(out.sum(), x)[0], torch.autograd.grad(ref.sum(), x)[0]
    torch.testing.assert_close(g, gr, rtol=2e-4, atol=2e-5)


def test_fused_extras_get_aligned_parameters():
    """DeepSpeed's ZeRO leaves parameters at odd offsets of a flat buffer; the compiled
    extras receive 16-byte aligned copies of those, views of aligned parameters (plain
    tensors either way, so one compiled graph serves every layer), the activations as they
    are, and the gradient still reaches each parameter."""
    from megatron_fox.layers.extras import _aligned_args

    flat = torch.zeros(1 + 4 * 8, dtype=torch.bfloat16)
    odd = torch.nn.Parameter(flat[1:].view(4, 8))  # 2 bytes past an aligned start, as ZeRO packs a [heads] bias
    even = torch.nn.Parameter(torch.zeros(4, 8, dtype=torch.bfloat16))
    assert odd.data_ptr() % 16 == 2 and even.data_ptr() % 16 == 0
    seen = []

    def body(x, w1, w2):
        seen.extend((type(t), t.data_ptr() % 16, t.data_ptr()) for t in (x, w1, w2))
        return (x * w1 + 2 * x * w2).sum()

    x = torch.randn(4, 8, dtype=torch.bfloat16)
    _aligned_args(body)(x, odd, even).backward()
    assert [s[:2] for s in seen] == [(torch.Tensor, 0)] * 3
    assert seen[0][2] == x.data_ptr() and seen[1][2] != odd.data_ptr() and seen[2][2] == even.data_ptr()
    torch.testing.assert_close(odd.grad, x)
    torch.testing.assert_close(even.grad, 2 * x)


@pytest.mark.parametrize("config", ["tiny", "fox_pro_125m", "fox_pro_360m", "fox_pro_760m"])
def test_fused_projection_is_aligned_for_every_tp_split(config):
    """Each group's width in linear_qkv is a multiple of 8 values (16-byte rows in bf16, the
    alignment cuBLAS's fast kernels need) whatever the options, so every TP shard's GEMM
    output is aligned: checked against the widths the options add, for the shipped configs'
    head shapes."""
    import yaml

    from megatron_fox.layers.qkv_layout import fused_qkv_sizes

    with open(os.path.join(os.path.dirname(__file__), "..", "..", "configs", f"{config}.yaml")) as f:
        c = yaml.safe_load(f)
    heads = c["num_attention_heads"]
    groups = c.get("num_query_groups") or heads
    d = c.get("kv_channels") or c["hidden_size"] // heads
    hpg = heads // groups
    for gate in (True, False):
        for ogate in (True, False):
            for shift in (True, False):
                sizes = fused_qkv_sizes(hpg, d, gate, ogate, shift)
                unpadded = hpg * d + 2 * d + (hpg if gate else 0) + (hpg * d if ogate else 0) + (2 if shift else 0)
                assert sum(sizes[:-1]) == unpadded and 0 <= sizes[-1] < 8
                assert sum(sizes) % 8 == 0, (config, gate, ogate, shift, sizes)  # any groups a rank


def test_core_attention_with_documents_copies_nothing_of_q_size():
    """Packed documents at batch > 1 run on [b, s] views of the [s, b] tensors: forward and
    backward make no copy as large as q (the op's kernels, in the Triton interpreter here),
    and the output and the gradients keep the [s, b] memory order; the result equals the
    reference on each row with its own documents."""
    import traceback

    from torch.utils._python_dispatch import TorchDispatchMode

    from megatron_fox.layers import FoxCoreAttention, FoxTransformerConfig

    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the kernels' path (on CPU: the Triton interpreter)")
    s, b, h, g, d = 24, 2, 4, 2, 64
    cfg = FoxTransformerConfig(num_layers=1, hidden_size=h * d, num_attention_heads=h, num_query_groups=g,
                               use_cpu_initialization=True, acp_log_eps=-10.0)
    attn = FoxCoreAttention(cfg)
    q, k, v = (torch.randn(s, b, n, d, requires_grad=True) for n in (h, g, g))
    log_f = F.logsigmoid(torch.randn(s, b, h) + 1.0).requires_grad_()
    cu = torch.tensor([0, 9, 24, 30, 48], dtype=torch.int32)

    class BigCopies(TorchDispatchMode):
        names: list = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            copying = func.overloadpacket in (torch.ops.aten.clone, torch.ops.aten.copy_, torch.ops.aten._to_copy)
            if copying and isinstance(out, torch.Tensor) and out.numel() >= q.numel() // 2:
                # the interpreter copies every kernel argument to and from its host buffers
                if not any("triton/runtime/interpreter" in f.filename for f in traceback.extract_stack()):
                    self.names.append(str(func))
            return out

    dout = torch.randn(s, b, h, d)
    with BigCopies() as mode:
        out = attn(q, k, v, log_f, cu_seqlens=cu)
        grads = torch.autograd.grad(out, (q, k, v, log_f), dout)
    assert mode.names == [], mode.names
    assert out.is_contiguous() and all(t.is_contiguous() for t in grads[:3])
    ref = forgetting_attention_reference(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
                                         log_f.transpose(0, 1), cu_seqlens=cu, log_eps=-10.0,
                                         dtype=torch.float64).transpose(0, 1)  # float64 inside, float32 out
    torch.testing.assert_close(out, ref, atol=2e-4 * ref.abs().max().item(), rtol=0)
    ref_grads = torch.autograd.grad(ref, (q, k, v, log_f), dout)
    for name, a, r in zip("q k v log_f".split(), grads, ref_grads):
        torch.testing.assert_close(a, r, atol=2e-4 * r.abs().max().item(), rtol=0, msg=name)
