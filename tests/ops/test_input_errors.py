"""Bad arguments raise ValueError naming the argument."""

import pytest
import torch

from megatron_fox.ops import forgetting_attention, forgetting_attention_reference


def good(B=1, T=16, H=2, Hkv=2, D=64):
    return (torch.randn(B, T, H, D), torch.randn(B, T, Hkv, D), torch.randn(B, T, Hkv, D),
            -torch.rand(B, T, H))


CASES = {
    "q rank": (lambda q, k, v, f: (q[0], k, v, f), {}, "q must be 4-D"),
    "k seq": (lambda q, k, v, f: (q, k[:, :8], v[:, :8], f), {}, "k must be"),
    "v shape": (lambda q, k, v, f: (q, k, v[..., :32], f), {}, "k and v must have the same shape"),
    "head_dim": (lambda q, k, v, f: (q[..., :48], k[..., :48], v[..., :48], f), {}, "head_dim of q, k, v"),
    "heads": (lambda q, k, v, f: (q[:, :, :1].repeat(1, 1, 3, 1), k, v, f[..., :1].repeat(1, 1, 3)), {},
              "multiple of k/v heads"),
    "dtype mix": (lambda q, k, v, f: (q.half(), k, v, f), {}, "share a dtype"),
    "int dtype": (lambda q, k, v, f: (q.long(), k.long(), v.long(), f), {}, "q dtype"),
    "fgate shape": (lambda q, k, v, f: (q, k, v, f[..., :1]), {}, "log_fgate must be"),
    "fgate dtype": (lambda q, k, v, f: (q, k, v, f.double()), {}, "log_fgate must be float32"),
    "fgate positive": (lambda q, k, v, f: (q, k, v, f.abs() + 0.1), {}, "log_fgate must be finite and <= 0"),
    "log_eps positive": (lambda *a: a, {"log_eps": 1.0}, "log_eps"),
    "bound negative": (lambda *a: a, {"log_eps": -10.0, "logit_bound": -1.0}, "logit_bound"),
    "bound shape": (lambda *a: a, {"log_eps": -10.0, "logit_bound": torch.ones(3)}, "logit_bound"),
    "sm_scale": (lambda *a: a, {"sm_scale": -1.0}, "sm_scale"),
    "cu dtype": (lambda *a: a, {"cu_seqlens": torch.tensor([0.0, 16.0])}, "cu_seqlens must be int32"),
    "cu end": (lambda *a: a, {"cu_seqlens": torch.tensor([0, 8], dtype=torch.int32)}, "cu_seqlens must start at 0"),
    "cu order": (lambda *a: a, {"cu_seqlens": torch.tensor([0, 9, 9, 16], dtype=torch.int32)}, "strictly increasing"),
}


@pytest.mark.parametrize("fn", [forgetting_attention, forgetting_attention_reference])
@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_raises(fn, case):
    make, kwargs, message = CASES[case]
    args = make(*good())
    with pytest.raises(ValueError, match=message):
        fn(*args, **kwargs)


def test_cu_seqlens_covers_the_batch():
    """With batch > 1, cu_seqlens holds offsets over batch * seq tokens, not one row's."""
    q, k, v, f = good(B=2)
    with pytest.raises(ValueError, match=r"cu_seqlens must start at 0, end at batch \* seq"):
        forgetting_attention(q, k, v, f, cu_seqlens=torch.tensor([0, 16], dtype=torch.int32))
