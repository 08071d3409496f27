"""The foreach stand-ins for Apex's multi-tensor kernels against plain per-tensor math."""

import pytest
import torch

from megatron_fox.training import multi_tensor


def _grads(seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = [(7, 5), (13,), (3, 4, 2), (1,), (64, 33)]
    return [torch.randn(s, generator=g) * (i + 1) for i, s in enumerate(shapes)]


def test_l2_norm_equals_norm_of_concatenation():
    grads = _grads()
    want = torch.cat([t.reshape(-1) for t in grads]).double().norm()
    total, per = multi_tensor.foreach_l2_norm(0, None, [grads], True)
    assert total.shape == (1,) and total.dtype == torch.float32
    torch.testing.assert_close(total.double()[0], want, rtol=1e-6, atol=0)
    torch.testing.assert_close(per.double(), torch.stack([t.double().norm() for t in grads]), rtol=1e-6, atol=0)
    assert multi_tensor.foreach_l2_norm(0, None, [grads], False)[1] is None
    bf16 = [t.bfloat16() for t in grads]
    torch.testing.assert_close(multi_tensor.foreach_l2_norm(0, None, [bf16], False)[0].double()[0],
                               torch.cat([t.reshape(-1).double() for t in bf16]).norm(), rtol=1e-2, atol=0)
    with pytest.raises(ValueError, match="tensor_lists"):
        multi_tensor.foreach_l2_norm(0, None, [[]], False)


def test_scale_in_place_and_into_other_tensors():
    grads = _grads(1)
    before = [t.clone() for t in grads]
    multi_tensor.foreach_scale(0, None, [grads, grads], 0.37)
    for a, b in zip(grads, before):
        torch.testing.assert_close(a, b * 0.37, rtol=0, atol=0)
    dst = [torch.empty_like(t, dtype=torch.bfloat16) for t in grads]
    multi_tensor.foreach_scale(0, None, [grads, dst], 1.0)  # Megatron's copy main -> model params
    for a, b in zip(dst, grads):
        assert torch.equal(a, b.bfloat16())
    with pytest.raises(ValueError, match="tensor_lists"):
        multi_tensor.foreach_scale(0, None, [grads, dst[:-1]], 2.0)


def test_install_replaces_only_megatron_local_fallbacks():
    from megatron.core import utils
    from megatron.core.optimizer import clip_grads, optimizer

    saved = (clip_grads.l2_norm_impl, clip_grads.multi_tensor_scale_impl, optimizer.multi_tensor_scale_impl)
    try:
        expected = [name for name, impl in zip(("l2_norm_impl", "multi_tensor_scale_impl", "multi_tensor_scale_impl"),
                                               saved)
                    if impl in (utils.local_multi_tensor_l2_norm, utils.local_multi_tensor_scale)]
        done = multi_tensor.install()
        assert [d.rsplit(".", 1)[1] for d in done] == expected
        if expected:  # no Apex / TE on this machine: Megatron's own clip function now uses ours
            assert clip_grads.l2_norm_impl is multi_tensor.foreach_l2_norm
            grads = _grads(2)
            norm, _ = clip_grads.multi_tensor_applier(clip_grads.l2_norm_impl, None, [grads], False)
            torch.testing.assert_close(norm.double()[0], torch.cat([t.reshape(-1) for t in grads]).double().norm(),
                                       rtol=1e-6, atol=0)
        assert multi_tensor.install() == []  # idempotent: nothing left to replace
    finally:
        clip_grads.l2_norm_impl, clip_grads.multi_tensor_scale_impl, optimizer.multi_tensor_scale_impl = saved
