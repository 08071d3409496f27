"""TP=2, TP=2 with sequence parallel, and PP=2 equal TP=1 on the same weights (2 gloo processes).

Loss and every parameter gradient of one global batch (2 micro-batches of 2 x 32 tokens,
packed documents) are compared after merging the shards back to the TP=1 layout.
"""

import os

import pytest
import torch

from megatron_fox.checkpoint import merge_state_dicts

from .workers import launch

EOD = 1


def make_batches(seq=32, mbs=2, micro=2, vocab=128):
    batches = []
    for _ in range(micro):
        tokens = torch.randint(2, vocab, (mbs, seq + 1))
        tokens[torch.rand(mbs, seq + 1) < 0.08] = EOD  # several documents per sample
        batches.append({"tokens": tokens[:, :-1].contiguous(), "labels": tokens[:, 1:].contiguous(),
                        "loss_mask": (torch.rand(mbs, seq) > 0.1).float(),
                        "position_ids": torch.arange(seq).expand(mbs, seq).contiguous()})
    return batches


def _prepare(tmp_path_factory, name, extra, mbs=2):
    """Shared weights and batch (micro-batches of mbs samples), and the single-process
    reference loss and gradients."""
    d = tmp_path_factory.mktemp(name)
    torch.manual_seed(int.from_bytes(os.urandom(4), "little"))
    opts = {"weights": str(d / "weights.pt"), "batch": str(d / "batch.pt"), "eod": EOD,
            "seed": int(torch.randint(0, 10**6, ())), "extra": extra}
    torch.save(make_batches(mbs=mbs), opts["batch"])
    launch("init", 1, opts)
    ref_dir = d / "ref"
    ref_dir.mkdir()
    launch("grads", 1, dict(opts, out=str(ref_dir)))
    return d, opts, torch.load(ref_dir / "out_0.pt")


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    return _prepare(tmp_path_factory, "equiv", [])


def _gather(out_dir, world, tp, pp):
    outs = [torch.load(os.path.join(out_dir, f"out_{r}.pt")) for r in range(world)]
    shards = {(o["tp"], o["pp"]): o["grads"] for o in outs}
    return outs[0]["loss"], merge_state_dicts(shards, num_layers=2, tp_size=tp, pp_size=pp)


@pytest.mark.parametrize("name,tp,pp,sp", [("tp2", 2, 1, False), ("tp2_sp", 2, 1, True), ("pp2", 1, 2, False)])
def test_equals_single_rank(shared, name, tp, pp, sp):
    d, opts, ref = shared
    out = d / name
    out.mkdir()
    launch("grads", 2, dict(opts, out=str(out), tp=tp, pp=pp, sp=sp))
    loss, grads = _gather(out, 2, tp, pp)
    assert loss == pytest.approx(ref["loss"], rel=1e-5, abs=1e-6)
    assert set(grads) == set(ref["grads"])
    for key, g in grads.items():
        r = ref["grads"][key]
        assert g.shape == r.shape, key
        err = (g - r).abs().max().item()
        assert err <= 1e-4 * (r.abs().max().item() + 1e-3), f"{key}: max abs err {err}"


# learned context pruning: alpha 1.5 at once (soft, exact zeros and ones both occur), a small
# beta so that pairs are really dropped, and the penalty's gradient in the comparison
DCP = ["--fox-context-pruning", "--fox-context-pruning-alpha", "1.5", "--fox-context-pruning-alpha-iters", "0",
       "--fox-context-pruning-beta-init", "0.3", "--fox-context-pruning-dim", "8", "--fox-context-pruning-lambda", "2.0"]


@pytest.fixture(scope="module")
def shared_dcp(tmp_path_factory):
    return _prepare(tmp_path_factory, "equiv_dcp", DCP)


@pytest.mark.parametrize("name,tp,pp,sp", [("tp2", 2, 1, False), ("tp2_sp", 2, 1, True), ("pp2", 1, 2, False)])
def test_context_pruning_equals_single_rank(shared_dcp, name, tp, pp, sp):
    """The replicated interaction projections get the whole gradient on every TP rank."""
    test_equals_single_rank(shared_dcp, name, tp, pp, sp)
    assert any("context_pruning.q_int" in k for k in shared_dcp[2]["grads"])


def test_context_pruning_penalty_gradient(tmp_path):
    """The penalty's gradient (attached in the backward, not part of the logged loss) is that
    of loss + lambda * mean kept fraction: beta's gradient against a central difference."""
    torch.manual_seed(int.from_bytes(os.urandom(4), "little"))
    opts = {"batch": str(tmp_path / "batch.pt"), "eod": EOD, "seed": int(torch.randint(0, 10**6, ())),
            "extra": DCP, "out": str(tmp_path / "fd.pt")}
    torch.save(make_batches(micro=1), opts["batch"])
    launch("penalty_fd", 1, opts)
    for grad, diff in torch.load(opts["out"]):
        assert grad == pytest.approx(diff, rel=0.05, abs=2e-4), (grad, diff)


@pytest.fixture(scope="module")
def shared_no_docs(tmp_path_factory):
    """Same as `shared` without packed documents."""
    return _prepare(tmp_path_factory, "equiv_cp", ["--no-reset-attention-mask"])


@pytest.fixture(scope="module")
def shared_4_groups(tmp_path_factory):
    """Same as `shared` with 4 kv heads (a2a at TP=2 x CP=2 needs 2 per TP rank)."""
    return _prepare(tmp_path_factory, "equiv_4g", ["--num-query-groups", "4"])


@pytest.fixture(scope="module")
def shared_one_sample(tmp_path_factory):
    """Same as `shared` with micro-batches of one sample (the layer then takes its
    document offsets whole)."""
    return _prepare(tmp_path_factory, "equiv_mbs1", [], mbs=1)


@pytest.mark.parametrize("name,tp,cp,world,docs,comm", [
    ("cp2", 1, 2, 2, False, "p2p"), ("cp2_docs", 1, 2, 2, True, "p2p"), ("tp2_cp2_docs", 2, 2, 4, True, "p2p"),
    ("cp2_a2a_docs", 1, 2, 2, True, "a2a"), ("tp2_cp2_a2a_docs", 2, 2, 4, "4 groups", "a2a"),
    ("cp2_docs_one_sample", 1, 2, 2, "one sample", "p2p")])
def test_context_parallel_equals_single_rank(request, name, tp, cp, world, docs, comm):
    fixture = {"4 groups": "shared_4_groups", "one sample": "shared_one_sample"}.get(docs) or (
        "shared" if docs else "shared_no_docs")
    d, opts, ref = request.getfixturevalue(fixture)
    out = d / name
    out.mkdir()
    extra = opts.get("extra", []) + ["--cp-comm-type", comm]
    launch("grads", world, dict(opts, out=str(out), tp=tp, cp=cp, sp=tp > 1, extra=extra))
    outs = [torch.load(os.path.join(out, f"out_{r}.pt")) for r in range(world)]
    # gradients are summed over context-parallel ranks by the engine: take CP rank 0 of each TP rank
    shards = {(o["tp"], 0): o["grads"] for o in outs if o["cp"] == 0}
    grads = merge_state_dicts(shards, num_layers=2, tp_size=tp, pp_size=1)
    assert outs[0]["loss"] == pytest.approx(ref["loss"], rel=1e-5, abs=1e-6)
    for key, g in grads.items():
        r = ref["grads"][key]
        err = (g - r).abs().max().item()
        assert err <= 1e-4 * (r.abs().max().item() + 1e-3), f"{key}: max abs err {err}"


@pytest.fixture(scope="module", params=["alibi", "data_independent"])
def shared_gate_type(request, tmp_path_factory):
    """Same as `shared` with the fixed (ALiBi) or the data-independent forget gate."""
    return _prepare(tmp_path_factory, f"equiv_{request.param}", ["--fox-forget-gate-type", request.param])


@pytest.mark.parametrize("name,tp,pp,sp", [("tp2_sp", 2, 1, True)])
def test_forget_gate_types_equal_single_rank(shared_gate_type, name, tp, pp, sp):
    """Each TP rank takes its own heads' ALiBi slopes / gate biases."""
    test_equals_single_rank(shared_gate_type, name, tp, pp, sp)
