"""Context-parallel FoX attention with 2 and 4 gloo processes equals the single-process op.

Kernels run in the Triton interpreter (TRITON_INTERPRET=1 from conftest), fp32. Tolerance:
max abs error <= 2e-4 * max |reference| for the output and the four gradients.
"""

import math
import os
import sys

import pytest
import torch
import torch.nn.functional as F

from megatron_fox.ops import forgetting_attention
from megatron_fox.ops.token_shift import token_shift
from megatron_fox.parallel import chunk_boundary_rows, gather_from_context_parallel

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "training"))
from workers import launch  # noqa: E402


def run_cp(world, opts):
    # the kernels run as in this process: the Triton interpreter on CPU
    launch("cp", world, dict(opts, interpret=os.environ.get("TRITON_INTERPRET", "0")))
    return [torch.load(os.path.join(opts["out"], f"cp_{r}.pt")) for r in range(world)]


def close(a, b, what):
    err = (a.double() - b.double()).abs().max().item()
    assert err <= 2e-4 * b.abs().max().item() + 1e-6, f"{what}: max abs err {err}"


@pytest.mark.parametrize("world,log_eps,gate,docs,data_bound,skip_chunks", [
    (2, None, 2.0, False, False, True), (2, -10.0, -2.0, False, False, True), (4, -10.0, -2.0, False, False, True),
    (4, -10.0, 4.0, False, False, True), (4, None, 1.0, False, False, True), (2, None, 2.0, True, False, True),
    (4, -10.0, 3.0, True, False, True), (4, -10.0, -2.0, False, True, True), (4, -10.0, -2.0, False, False, False)])
def test_matches_single_process(tmp_path, world, log_eps, gate, docs, data_bound, skip_chunks):
    _check_against_single_process(tmp_path, world, log_eps, gate, docs, data_bound, skip_chunks)


@pytest.mark.parametrize("world,gate,docs", [(4, -2.0, False), (2, 1.0, True)])
def test_lse_backward_pruning_matches_single_process(tmp_path, world, gate, docs):
    """backward_pruning="lse": the ring's backward kernels also prune by the merged rows' lse."""
    _check_against_single_process(tmp_path, world, -10.0, gate, docs, False, True, backward_pruning="lse")


@pytest.mark.parametrize("world,log_eps,gate,backward_pruning", [(2, -10.0, 3.0, "lse"), (4, -10.0, -2.0, "bound")])
def test_batch_of_packed_rows_matches_single_process(tmp_path, world, log_eps, gate, backward_pruning):
    """Two rows of packed documents in one call (offsets over the batch's 2 x L tokens, as
    Megatron packs a micro-batch): the kernels take a document map per row."""
    _check_against_single_process(tmp_path, world, log_eps, gate, True, False, True, backward_pruning, batch=2)


def _check_against_single_process(tmp_path, world, log_eps, gate, docs, data_bound, skip_chunks,
                                  backward_pruning="bound", batch=1):
    B, T, H, Hkv, D = batch, 16 * 2 * world, 4, 2, 64
    q = F.rms_norm(torch.randn(B, T, H, D), (D,))
    k = F.rms_norm(torch.randn(B, T, Hkv, D), (D,))
    v = torch.randn(B, T, Hkv, D)
    # heads 0-1 forget fast (pruned far back), heads 2-3 follow `gate`
    shift = torch.tensor([-2.0, -1.5, gate, gate])
    f = F.logsigmoid(torch.randn(B, T, H) * 0.1 + shift)
    do = torch.randn(B, T, H, D)
    torch.save({"q": q, "k": k, "v": v, "f": f, "do": do}, tmp_path / "in.pt")
    bound = None if data_bound else math.sqrt(D) * 1.0001  # None: U all-reduced from the data
    cu = None
    if docs:  # documents crossing chunk borders (chunks are 16 long), one inside a chunk, one of length 1;
        # with a batch, offsets over its B * T tokens in batch-major order (every row starts a document)
        cu = [0]
        for row in range(B):
            cuts = sorted(set(torch.randperm(T - 1)[: T // 12].add(1).tolist()) | {20, 21, 40})
            cu += [row * T + c for c in cuts if c < T] + [(row + 1) * T]
    outs = run_cp(world, {"inputs": str(tmp_path / "in.pt"), "out": str(tmp_path), "log_eps": log_eps,
                          "bound": bound, "cu": cu, "skip_chunks": skip_chunks,
                          "backward_pruning": backward_pruning})
    ins = [t.clone().requires_grad_() for t in (q, k, v, f)]
    packed = [t.reshape(1, B * T, *t.shape[2:]) for t in ins]  # the rows one after another: the op's packed form
    ref = forgetting_attention(*packed, log_eps=None,
                               cu_seqlens=None if cu is None else torch.tensor(cu, dtype=torch.int32)).view_as(q)
    ref_grads = torch.autograd.grad(ref, ins, do)
    close(gather_from_context_parallel([o["o"] for o in outs], 1), ref, "out")
    for i, name in enumerate("q k v log_fgate".split()):
        close(gather_from_context_parallel([o["grads"][i] for o in outs], 1), ref_grads[i], f"d{name}")
    if os.environ.get("TRITON_INTERPRET") == "1":  # the kernels' path: the lse rule used exactly when asked
        # (or for exact FoX's blocks that are zero in float32)
        assert all((o["lse_thresholds"] > 0) == (backward_pruning == "lse" or log_eps is None) for o in outs)
        if log_eps is None and not docs and world == 4:  # the fast heads' far blocks are zero in float32
            assert sum(o["start_blocks"] for o in outs) > 0
    skipped = sum(o["stats"]["blocks_skipped"] for o in outs)
    not_sent = sum(o["stats"]["bytes_not_sent"] for o in outs)
    if log_eps is None or not skip_chunks:  # nothing pruned by ACP, documents or not
        assert all(o["stats"]["skipped_fraction"] == 0.0 for o in outs)
    if (log_eps is None or not skip_chunks) and not docs:  # nothing skipped at chunk level
        assert skipped == 0 and not_sent == 0
    elif not docs:
        if gate < 0:  # every head forgets fast: far chunk pairs pruned for all heads (at CP=2
            # only a rank's own far pair, which still goes to the kernels: counted as pruned,
            # not as skipped)
            assert max(o["stats"]["skipped_fraction"] for o in outs) > 0
            assert skipped > 0 or world == 2
        if world == 4:  # far pairs pruned at least for the fast heads: their K, V are not sent
            assert not_sent > 0
        if world == 4 and gate < 0:  # only neighbouring chunks interact: whole steps skipped
            assert sum(o["stats"]["steps_skipped"] for o in outs) > 0
    for o in outs:  # a step a rank skips moves no bytes to it; a step it computes does
        st = o["stats"]
        assert len(st["bytes_received_by_step"]) == len(st["computed_by_step"]) == world - 1
        for got, computed in zip(st["bytes_received_by_step"], st["computed_by_step"]):
            assert (got > 0) == computed, (got, computed)


def test_skip_memory_waits_only_after_dead_pairs(tmp_path):
    """A layer's ChunkSkipMemory: the first call waits for the skip table and skips; a call
    waits again only when the previous call had a dead chunk pair, else it sends and computes
    every causal pair. Every call equals the single-process op, right prediction or not,
    and leaves nothing of its inputs alive once its output is gone (no reference cycle
    waiting for the garbage collector: on CUDA one held ~1 GB a step at 64k). Two heads (the
    interpreter's time goes with the heads): a fast one and one that is fast or slow."""
    world, B, T, H, D = 4, 1, 16 * 8, 2, 64
    kinds = ["fast", "slow", "slow", "fast", "fast"]  # fast: every head forgets fast; slow: head 1 remembers
    calls = []
    for kind in kinds:
        q = F.rms_norm(torch.randn(B, T, H, D), (D,))
        k = F.rms_norm(torch.randn(B, T, H, D), (D,))
        shift = torch.tensor([-2.0, -2.0 if kind == "fast" else 5.0])
        calls.append({"q": q, "k": k, "v": torch.randn(B, T, H, D), "do": torch.randn(B, T, H, D),
                      "f": F.logsigmoid(torch.randn(B, T, H) * 0.1 + shift)})
    torch.save(calls, tmp_path / "in.pt")
    launch("cp_memory", world, {"inputs": str(tmp_path / "in.pt"), "out": str(tmp_path), "bound": math.sqrt(D) * 1.0001,
                                "interpret": os.environ.get("TRITON_INTERPRET", "0")})
    ranks = [torch.load(tmp_path / f"cp_memory_{r}.pt") for r in range(world)]
    # call 1: first (waits); 2: after dead pairs (waits, finds none); 3: after none (no wait);
    # 4: after none (no wait, although its own pairs die: still exact); 5: after 4's dead pairs
    expected = [True, True, False, False, True]
    for i, data in enumerate(calls):
        outs = [rank[i] for rank in ranks]
        assert all(o["q_freed"] for o in outs), f"call {i + 1}: q kept alive after the call"
        assert [o["waited"] for o in outs] == [expected[i]] * world, (i, [o["waited"] for o in outs])
        skipped = sum(o["skipped"] for o in outs)
        if expected[i] and kinds[i] == "fast":
            assert skipped > 0 and sum(o["not_sent"] for o in outs) > 0
        if not expected[i]:  # every causal pair sent and computed
            assert skipped == 0 and all(o["not_sent"] == 0 for o in outs)
        if kinds[i] == "fast":  # ACP's whole-pair share is reported either way
            assert max(o["fraction"] for o in outs) > 0
        ins = [data[n].clone().requires_grad_() for n in ("q", "k", "v", "f")]
        ref = forgetting_attention(*ins, log_eps=None)
        ref_grads = torch.autograd.grad(ref, ins, data["do"])
        close(gather_from_context_parallel([o["o"] for o in outs], 1), ref, f"call {i + 1} out")
        for j, name in enumerate("q k v log_fgate".split()):
            close(gather_from_context_parallel([o["grads"][j] for o in outs], 1), ref_grads[j], f"call {i + 1} d{name}")


@pytest.mark.parametrize("world,docs", [(2, True), (4, False), (4, True)])
def test_chunk_boundary_rows_shift_matches_single_process(tmp_path, world, docs):
    """The KV-shift of each rank's chunks, each chunk's first token mixed with the last of
    the chunk before (another rank's, or for chunk P this rank's other chunk), equals the
    shift over the whole sequence; so does d mixed, the predecessor rows' gradients added
    back on the ranks they came from. Documents start at chunk borders and inside chunks."""
    S, B, G, W, start, cols = 8 * 2 * world, 2, 2, 7, 2, 4  # columns [2, 6) of each group's 7
    mixed = torch.randn(S, B, G * W, dtype=torch.float64)
    alpha = torch.randn(S, B, G, cols, dtype=torch.float64)[..., 0]
    doc_start = torch.zeros(S, B, dtype=torch.bool)
    doc_start[0] = True
    if docs:
        doc_start[8, 0] = doc_start[8 * 3, 1] = doc_start[13, 0] = True  # two chunk starts, one inside
    dy = torch.randn(S, B, G, cols, dtype=torch.float64)
    torch.save({"mixed": mixed, "alpha": alpha, "doc_start": doc_start, "dy": dy}, tmp_path / "in.pt")
    launch("chunk_shift", world, {"inputs": str(tmp_path / "in.pt"), "out": str(tmp_path), "groups": G,
                                  "start": start, "cols": cols})
    ranks = [torch.load(tmp_path / f"chunk_shift_{r}.pt") for r in range(world)]
    full = mixed.clone().requires_grad_()
    ref = token_shift(full.view(S, B, G, W)[..., start:start + cols], alpha, doc_start)
    (d_ref,) = torch.autograd.grad(ref, full, dy)
    close(gather_from_context_parallel([o["y"] for o in ranks], 0), ref.detach(), "shifted columns")
    close(gather_from_context_parallel([o["d_mixed"] for o in ranks], 0), d_ref, "d mixed")
    # without the predecessor rows the chunk starts would differ: the comparison can fail
    alone = torch.cat([token_shift(c.view(-1, B, G, W)[..., start:start + cols], a, d)
                       for c, a, d in zip(mixed.split(8), alpha.split(8), doc_start.split(8))])
    assert (alone - ref).abs().max() > 1e-3


def test_chunk_boundary_rows_names_bad_arguments():
    with pytest.raises(ValueError, match="mixed"):
        chunk_boundary_rows(torch.zeros(5, 1, 14), None, 2, 2, 4)
    with pytest.raises(ValueError, match="start, cols"):
        chunk_boundary_rows(torch.zeros(4, 1, 14), None, 2, 5, 4)
    with pytest.raises(ValueError, match="prev0"):
        token_shift(torch.zeros(6, 1, 2, 3), torch.zeros(6, 1, 2), None, torch.zeros(4, 1, 2, 3))


def test_batch_offsets_checked_against_the_whole_rows():
    """The CP ops' check of a batch's offsets (this rank holds 2c of each row's L = 2cP
    tokens): they must end at B * L and hold every row's start, a multiple of L, not of 2c."""
    from megatron_fox.ops.forgetting_attn.common import check_inputs

    B, T2, P, H, D = 2, 16, 2, 2, 64
    L = T2 * P
    q = torch.randn(B, T2, H, D)
    f = F.logsigmoid(torch.randn(B, T2, H))

    def check(cu):
        return check_inputs(q, q, q, f, None, None, None, torch.tensor(cu, dtype=torch.int32),
                            cu_seqlens_total=B * L, per_sample=True)

    check([0, 5, L, L + 7, 2 * L])  # each row starts a document: accepted
    with pytest.raises(ValueError, match=f"cu_seqlens must hold every sample's start.*{L}"):
        check([0, 5, L + 7, 2 * L])  # row 1's start missing
    with pytest.raises(ValueError, match=f"cu_seqlens must start at 0, end at batch \\* seq \\({2 * L}\\)"):
        check([0, 5, L, 2 * T2])  # offsets of the local rows, not the whole ones
