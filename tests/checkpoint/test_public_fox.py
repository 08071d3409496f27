"""Conversion of the public FoX code's checkpoints: megatron_fox's model, loaded from a
converted random public state dict, gives the logits of an independent plain-PyTorch
rewrite of the public model's forward pass (written from its published description)."""

import math

import pytest
import torch
import torch.nn.functional as F

from megatron_fox.checkpoint.public_fox import FoxLayout, from_public_fox, to_public_fox

L, D, H, d, I, V = 2, 64, 4, 16, 96, 128  # noqa: E741
FLAGS = ["--num-layers", str(L), "--hidden-size", str(D), "--num-attention-heads", str(H), "--ffn-hidden-size",
         str(I), "--seq-length", "64", "--vocab-size", str(V), "--device", "cpu", "--norm-epsilon", "1e-6",
         "--untie-embeddings-and-output-weights", "--no-acp"]
LAYOUT = FoxLayout(num_layers=L, heads=H, groups=H, head_dim=d)


def random_public_state(shared_qk_norm: bool, vocab: int = V) -> dict:
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31, (1,))))

    def w(*shape, scale=0.08):
        return torch.randn(*shape, generator=g) * scale

    def norm(n):
        return 1.0 + 0.2 * torch.randn(n, generator=g)

    sd = {"model.embeddings.weight": w(vocab, D, scale=1.0), "model.norm.weight": norm(D),
          "lm_head.weight": w(vocab, D)}
    for i in range(L):
        p = f"model.layers.{i}."
        sd.update({
            p + "attn_norm.weight": norm(D), p + "attn.q_proj.weight": w(D, D),
            p + "attn.k_proj.linear.weight": w(D, D), p + "attn.k_proj.shift_proj.weight": w(H, D, scale=0.5),
            p + "attn.v_proj.linear.weight": w(D, D), p + "attn.v_proj.shift_proj.weight": w(H, D, scale=0.5),
            p + "attn.fgate_proj.weight": w(H, D, scale=0.3), p + "attn.fgate_proj.bias": 2.0 + w(H, scale=1.0),
            p + "attn.ogate_proj.weight": w(D, D), p + "attn.output_norm.weight": norm(D),
            p + "attn.q_norm.weight": norm(d if shared_qk_norm else D),
            p + "attn.k_norm.weight": norm(d if shared_qk_norm else D),
            p + "attn.o_proj.weight": w(D, D), p + "mlp_norm.weight": norm(D),
            p + "mlp.gate_proj.weight": w(2 * I, D), p + "mlp.down_proj.weight": w(D, I)})
    return sd


def public_fox_logits(sd, tokens, eps=1e-6, qk_eps=1e-5):
    """The public FoX-Pro causal LM forward, [b, T] -> [b, T, V] float64."""
    sd = {k: v.double() for k, v in sd.items()}
    b, T = tokens.shape

    def rms(x, weight, e):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + e) * weight

    def heads(x):
        return x.view(b, T, H, d)

    def head_weight(wt):
        return wt.view(1, d).expand(H, d) if wt.numel() == d else wt.view(H, d)

    x = sd["model.embeddings.weight"][tokens]
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    for i in range(L):
        p = f"model.layers.{i}.attn."
        h = rms(x, sd[f"model.layers.{i}.attn_norm.weight"], eps)

        def shifted(name):
            out = heads(h @ sd[p + name + ".linear.weight"].T)
            alpha = torch.sigmoid(h @ sd[p + name + ".shift_proj.weight"].T)[..., None]  # [b, T, H, 1]
            prev = torch.cat([torch.zeros_like(out[:, :1]), out[:, :-1]], dim=1)  # raw previous projection
            return alpha * prev + (1 - alpha) * out

        q = rms(heads(h @ sd[p + "q_proj.weight"].T), head_weight(sd[p + "q_norm.weight"]), qk_eps)
        k = rms(shifted("k_proj"), head_weight(sd[p + "k_norm.weight"]), qk_eps)
        v = shifted("v_proj")
        c = torch.cumsum(F.logsigmoid(h @ sd[p + "fgate_proj.weight"].T + sd[p + "fgate_proj.bias"]), dim=1)
        s = torch.einsum("bihd,bjhd->bhij", q, k) / math.sqrt(d) + (c.transpose(1, 2)[..., :, None]
                                                                   - c.transpose(1, 2)[..., None, :])
        att = torch.softmax(s.masked_fill(~causal, float("-inf")), dim=-1)
        o = torch.einsum("bhij,bjhd->bihd", att, v)
        o = rms(o, sd[p + "output_norm.weight"].view(H, d), eps) * torch.sigmoid(heads(h @ sd[p + "ogate_proj.weight"].T))
        x = x + o.reshape(b, T, D) @ sd[p + "o_proj.weight"].T
        h = rms(x, sd[f"model.layers.{i}.mlp_norm.weight"], eps)
        gate, up = (h @ sd[f"model.layers.{i}.mlp.gate_proj.weight"].T).chunk(2, dim=-1)
        x = x + (F.silu(gate) * up) @ sd[f"model.layers.{i}.mlp.down_proj.weight"].T
    return rms(x, sd["model.norm.weight"], eps) @ sd["lm_head.weight"].T


def _model():
    from megatron_fox.training.arguments import parse_args
    from megatron_fox.training.model import build_model, padded_vocab_size, transformer_config

    args = parse_args(FLAGS)
    return build_model(args, transformer_config(args, torch.device("cpu")), padded_vocab_size(V, args)).eval(), args


@pytest.mark.parametrize("shared_qk_norm", [True, False])
def test_converted_model_gives_the_public_logits(megatron_world, tmp_path, shared_qk_norm):
    from megatron_fox.training.model import load_full_state_dict

    public = random_public_state(shared_qk_norm)
    path = tmp_path / "converted.pt"
    torch.save(from_public_fox(public, LAYOUT), path)
    model, args = _model()
    load_full_state_dict(model, str(path), args)
    tokens = torch.randint(0, V, (2, 37))
    with torch.no_grad():
        ours = model(tokens, None, None).double()
    ref = public_fox_logits(public, tokens)
    err = (ours - ref).abs().max().item()
    assert err <= 1e-4 * ref.abs().max().item(), err


@pytest.mark.parametrize("shared_qk_norm", [True, False])
def test_round_trip(shared_qk_norm):
    public = random_public_state(shared_qk_norm)
    back = to_public_fox(from_public_fox(public, LAYOUT), LAYOUT, share_qk_norm=shared_qk_norm)
    assert sorted(back) == sorted(public)
    for name, t in public.items():
        assert torch.equal(back[name], t), name


def test_mismatched_options_name_the_tensor(megatron_world, tmp_path):
    public = random_public_state(True)
    with pytest.raises(ValueError, match="shift_proj"):  # a model without KV-shift leaves them over
        from_public_fox({k.replace(".linear.", "."): v for k, v in public.items()},
                        FoxLayout(L, H, H, d, kv_shift=False))
    del public["model.layers.1.attn.fgate_proj.bias"]
    with pytest.raises(KeyError, match="model.layers.1.attn.fgate_proj.bias"):
        from_public_fox(public, LAYOUT)
    with pytest.raises(ValueError, match="heads differ"):
        state = from_public_fox(random_public_state(False), LAYOUT)
        to_public_fox(state, LAYOUT, share_qk_norm=True)
    from megatron_fox.training.model import load_full_state_dict

    model, args = _model()
    state = from_public_fox(random_public_state(True), LAYOUT)
    state["decoder.layers.0.mlp.linear_fc2.weight"] = torch.zeros(D, I + 1)
    torch.save(state, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="wrong shape.*linear_fc2"):
        load_full_state_dict(model, str(tmp_path / "bad.pt"), args)
