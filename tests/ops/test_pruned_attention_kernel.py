"""The Triton kernels of forgetting attention with learned context pruning's keep mask
(`ops.context_pruning.pruned_forgetting_attention`) against the float64 plain-PyTorch
reference: output and the gradients of q, k, v, log f and the mask, also where the mask is 0.

Tolerances as the main op's tests: fp32 max abs error <= 2e-4 * max|ref|; bf16 relative
error of the norm <= 1.5e-2 (the reference sees the same bf16 inputs in float64).
"""

import pytest
import torch
import torch.nn.functional as F

from megatron_fox.ops.context_pruning import keep_mask, pruned_forgetting_attention, pruned_forgetting_attention_reference

from .test_forgetting_attention import check_close


def _inputs(B, T, H, G, D, dtype, device, beta):
    q, k, v = torch.randn(B, T, H, D), torch.randn(B, T, G, D), torch.randn(B, T, G, D)
    log_f = F.logsigmoid(torch.randn(B, T, H) + 2.0)
    keep = keep_mask(torch.randn(B, T, 8), torch.randn(B, T, 8), beta, 1.5)  # exact zeros below beta ~ 0
    return [t.to(device, dtype) for t in (q, k, v)] + [log_f.to(device), keep.to(device)]


def _reference_inputs(ins):
    """q, k, v upcast to float64 (the reference computes in float64); log f and the mask as they are."""
    return [t.double().requires_grad_() for t in ins[:3]] + [t.clone().requires_grad_() for t in ins[3:]]


@pytest.mark.parametrize("dtype,D,G,beta", [(torch.float32, 16, 2, 0.5), (torch.float32, 64, 4, -0.5),
                                            (torch.bfloat16, 32, 1, 0.0)])
def test_kernel_matches_reference(device, dtype, D, G, beta):
    B, T, H = 2, 80, 4  # T not a multiple of the 64-blocks
    ins = _inputs(B, T, H, G, D, dtype, device, beta)
    keep = ins[-1]
    assert 0.02 < float((keep == 0).float().mean()) < 0.5  # some pairs dropped, some kept
    ours = [t.clone().requires_grad_() for t in ins]
    o = pruned_forgetting_attention(*ours)
    do = torch.randn_like(o)
    grads = torch.autograd.grad(o, ours, do)
    ref_in = _reference_inputs(ins)
    o_ref = pruned_forgetting_attention_reference(*ref_in, dtype=torch.float64)
    ref_grads = torch.autograd.grad(o_ref, ref_in, do.double())
    check_close(o, o_ref, dtype, "out")
    for name, g, r in zip(("dq", "dk", "dv", "dlog_f", "dkeep"), grads, ref_grads):
        check_close(g, r, dtype, name)
    dropped = keep == 0
    assert ref_grads[-1][dropped].abs().max() > 0  # the mask's gradient where it is 0, matched above


def test_kernel_documents(device):
    """Packed documents (cu_seqlens, batch 1): attention and the gate sums restart at each."""
    T, H, D = 96, 2, 16
    ins = _inputs(1, T, H, 1, D, torch.float32, device, 0.5)
    cu = torch.tensor([0, 30, 71, 96], dtype=torch.int32, device=device)
    ours = [t.clone().requires_grad_() for t in ins]
    o = pruned_forgetting_attention(*ours, cu_seqlens=cu)
    do = torch.randn_like(o)
    grads = torch.autograd.grad(o, ours, do)
    ref_in = _reference_inputs(ins)
    o_ref = pruned_forgetting_attention_reference(*ref_in, cu_seqlens=cu, dtype=torch.float64)
    ref_grads = torch.autograd.grad(o_ref, ref_in, do.double())
    check_close(o, o_ref, torch.float32, "out")
    for name, g, r in zip(("dq", "dk", "dv", "dlog_f", "dkeep"), grads, ref_grads):
        check_close(g, r, torch.float32, name)
    # a mask without gradient (hard decisions at evaluation) skips its kernel, nothing else changes
    frozen = [t.clone().requires_grad_() for t in ins[:4]]
    o2 = pruned_forgetting_attention(*frozen, ins[4], cu_seqlens=cu)
    for name, g, g2 in zip(("dq", "dk", "dv", "dlog_f"), grads, torch.autograd.grad(o2, frozen, do)):
        assert torch.equal(g, g2), name


@pytest.mark.parametrize("bound,backward,docs", [(None, "bound", False), (4.0, "bound", False), (4.0, "lse", False),
                                                 (None, "bound", True), (4.0, "lse", True)])
def test_kernel_skips_acp_blocks(device, bound, backward, docs):
    """log_eps: the blocks ACP prunes are skipped (more than a third of the pairs with these
    fast-forgetting gates, a fifth with two documents) and the output and gradients stay within the exact reference's
    tolerance (the skipped pairs weigh <= e^-10 per row); logit_bound given or from the data;
    the backward pruned as the forward or by the rows' lse; packed documents, the second
    starting inside a query block (its rows' own keys must not be taken as far behind the
    first document's)."""
    B, T, H, G, D = 1, 300, 2, 1, 16
    cu = torch.tensor([0, 210, T], dtype=torch.int32, device=device) if docs else None
    ins = _inputs(B, T, H, G, D, torch.float32, device, 0.5)
    ins[3] = F.logsigmoid(torch.randn(B, T, H, device=device) - 0.5)  # c falls ~1 a token
    if bound is not None:  # q, k scaled so that |sm_scale q.k| <= 4
        ins[0] = ins[0] / ins[0].norm(dim=-1, keepdim=True) * 2 * D ** 0.25
        ins[1] = ins[1] / ins[1].norm(dim=-1, keepdim=True) * 2 * D ** 0.25
    ours = [t.clone().requires_grad_() for t in ins]
    o, stats = pruned_forgetting_attention(*ours, log_eps=-10.0, logit_bound=bound, return_stats=True,
                                          backward_pruning=backward, cu_seqlens=cu)
    # of the causal pairs within documents; two documents leave fewer far pairs to skip
    assert float(stats.skipped_fraction) > (0.2 if docs else 0.33) and stats.skipped_fraction_per_head.shape == (H,)
    do = torch.randn_like(o)
    grads = torch.autograd.grad(o, ours, do)
    ref_in = _reference_inputs(ins)
    o_ref = pruned_forgetting_attention_reference(*ref_in, cu_seqlens=cu, dtype=torch.float64)
    ref_grads = torch.autograd.grad(o_ref, ref_in, do.double())
    check_close(o, o_ref, torch.float32, "out")
    for name, g, r in zip(("dq", "dk", "dv", "dlog_f", "dkeep"), grads, ref_grads):
        check_close(g, r, torch.float32, name)
    far = torch.ones(T, T, device=device).tril(-200).bool()  # behind every boundary here: skipped, written 0
    assert torch.all(grads[4][0][far] == 0)


def test_kernel_batch_of_packed_samples(device):
    """cu_seqlens over a batch of two (batch-major offsets over its 2 * T tokens, each sample
    starting a document; the layer's micro-batch in one call) with ACP skipping: output and
    gradients equal each sample alone through the reference with its own offsets, and the
    reference's batched path gives the same."""
    B, T, H, D = 2, 256, 2, 16
    ins = _inputs(B, T, H, 1, D, torch.float32, device, 0.5)
    ins[3] = F.logsigmoid(torch.randn(B, T, H, device=device) - 0.5)
    for i in (0, 1):  # |sm_scale q.k| <= 4
        ins[i] = ins[i] / ins[i].norm(dim=-1, keepdim=True) * 2 * D ** 0.25
    cu = torch.tensor([0, 200, 256, 306, 512], dtype=torch.int32, device=device)
    alone = [torch.tensor([0, 200, 256], dtype=torch.int32), torch.tensor([0, 50, 256], dtype=torch.int32)]
    ours = [t.clone().requires_grad_() for t in ins]
    o, stats = pruned_forgetting_attention(*ours, cu_seqlens=cu, log_eps=-10.0, logit_bound=4.0,
                                          backward_pruning="lse", return_stats=True)
    assert float(stats.skipped_fraction) > 0.2
    do = torch.randn_like(o)
    grads = torch.autograd.grad(o, ours, do)
    for i in range(B):
        ref_in = _reference_inputs([t[i:i + 1] for t in ins])
        o_ref = pruned_forgetting_attention_reference(*ref_in, cu_seqlens=alone[i].to(device), dtype=torch.float64)
        ref_grads = torch.autograd.grad(o_ref, ref_in, do[i:i + 1].double())
        check_close(o[i:i + 1], o_ref, torch.float32, f"out {i}")
        for name, g, r in zip(("dq", "dk", "dv", "dlog_f", "dkeep"), grads, ref_grads):
            check_close(g[i:i + 1], r, torch.float32, f"{name} {i}")
    batched = pruned_forgetting_attention_reference(*_reference_inputs(ins), cu_seqlens=cu, dtype=torch.float64)
    check_close(o, batched, torch.float32, "out, batched reference")


def test_kernel_errors(device):
    q, k, v, log_f, keep = _inputs(1, 16, 2, 1, 16, torch.float32, device, 0.5)
    with pytest.raises(ValueError, match="keep"):
        pruned_forgetting_attention(q, k, v, log_f, keep[:, :8])
    with pytest.raises(ValueError, match="backward_pruning"):
        pruned_forgetting_attention(q, k, v, log_f, keep, log_eps=-10.0, backward_pruning="rows")
    q2, k2, v2, log_f2, keep2 = _inputs(2, 16, 2, 1, 16, torch.float32, device, 0.5)
    with pytest.raises(ValueError, match="every sample's start"):  # sample 1 starts at 16
        pruned_forgetting_attention(q2, k2, v2, log_f2, keep2, cu_seqlens=torch.tensor([0, 10, 32], device=device))
    with pytest.raises(ValueError, match=r"end at batch \* seq \(32\)"):
        pruned_forgetting_attention(q2, k2, v2, log_f2, keep2, cu_seqlens=torch.tensor([0, 16], device=device))
    with pytest.raises(ValueError, match="head_dim"):
        pruned_forgetting_attention(q[..., :12], k[..., :12], v[..., :12], log_f, keep)
