"""Adam's step after a resume: megatron-core's load (no Apex/TE) hands every parameter the
same step tensor; `_restore_adam_step` must give each its own, or an update advances the
shared one once per parameter and the bias correction goes wrong."""

import torch

from megatron_fox.training.megatron_engine import _restore_adam_step


class _Wrapped:  # the shape of a Megatron optimizer: .optimizer is the torch one
    def __init__(self, inner):
        self.optimizer = inner


def _adam(params):
    return torch.optim.Adam(params, lr=1e-2, betas=(0.9, 0.95), foreach=True)


def test_resumed_adam_matches_uninterrupted():
    torch.manual_seed(0)
    init = [torch.randn(5), torch.randn(3, 2), torch.randn(4)]
    grads = [[torch.randn_like(p) for p in init] for _ in range(6)]

    def run(params, opt, steps):
        for g in steps:
            for p, gp in zip(params, g):
                p.grad = gp.clone()
            opt.step()

    ref = [p.clone().requires_grad_() for p in init]
    ref_opt = _adam(ref)
    run(ref, ref_opt, grads)

    # first 3 steps, then a "load": same moments, one step tensor shared by all parameters
    mine = [p.clone().requires_grad_() for p in init]
    opt = _adam(mine)
    run(mine, opt, grads[:3])
    shared = torch.tensor(3.0)
    for p in mine:
        opt.state[p]["step"] = shared
    _restore_adam_step(_Wrapped(opt), 3)
    steps = [opt.state[p]["step"] for p in mine]
    assert len({id(s) for s in steps}) == len(mine)
    run(mine, opt, grads[3:])
    assert [opt.state[p]["step"].item() for p in mine] == [6.0] * 3
    for a, b in zip(mine, ref):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_shared_step_without_the_fix_drifts():
    # the failure the fix is for, shown on the same setting: a shared step goes wrong
    p = [torch.zeros(2, requires_grad=True), torch.zeros(2, requires_grad=True)]
    opt = _adam(p)
    for q in p:
        q.grad = torch.ones(2)
    opt.step()
    shared = torch.tensor(1.0)
    for q in p:
        opt.state[q]["step"] = shared
    opt.step()
    assert shared.item() == 3.0  # advanced once per parameter, not once per update
