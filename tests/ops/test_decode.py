"""One decoding step against the last row of the reference, and the eviction count."""

import torch
import torch.nn.functional as F

from megatron_fox.ops import evictable_prefix, forgetting_attention_decode, forgetting_attention_reference


def test_decode_step_equals_last_row_of_reference():
    B, T, H, Hkv, D = 2, 23, 4, 2, 32
    q, k, v = torch.randn(B, T, H, D), torch.randn(B, T, Hkv, D), torch.randn(B, T, Hkv, D)
    log_f = F.logsigmoid(torch.randn(B, T, H) + 1.0)
    ref = forgetting_attention_reference(q, k, v, log_f, dtype=torch.float64)[:, -1]  # [B, H, D]
    c = torch.cumsum(log_f, dim=1).transpose(1, 2)  # [B, H, T]
    out = forgetting_attention_decode(q[:, -1], k, v, c[..., -1], c)
    assert (out.double() - ref).abs().max() <= 1e-5 * ref.abs().max()


def test_evictable_prefix_counts_keys_pruned_by_every_head():
    c_k = torch.tensor([[[0.0, -1.0, -5.0, -9.0], [0.0, -0.5, -6.0, -9.5]]])  # [1, 2 heads, 4]
    c_q = torch.tensor([[-10.0, -10.0]])
    # head 0 prunes keys with c_q - c_k < -4, i.e. c_k > -6: the first three; head 1 the first two
    assert evictable_prefix(c_q, c_k, torch.tensor([-4.0, -5.0])) == 2
    assert evictable_prefix(c_q, c_k, torch.tensor([-20.0, -20.0])) == 0
    assert evictable_prefix(c_q, c_k[..., :0], torch.tensor([-4.0, -4.0])) == 0
