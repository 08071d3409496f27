"""Head-parallel (cp_comm_type a2a) FoX attention with 2 and 4 gloo processes.

Each rank runs the single-GPU op on the whole sequence of its heads, so the gathered output
and gradients must equal the single-process op with the same ACP settings (Triton
interpreter, fp32: max abs error <= 2e-5 * max |value|) and stay within ACP's tolerance of
exact FoX from the plain-PyTorch float64 reference (2e-4). The ranks' skipped fractions
average to the single-process op's.
"""

import itertools
import math
import os
import random
import sys

import pytest
import torch
import torch.nn.functional as F

from megatron_fox.ops import forgetting_attention
from megatron_fox.ops.reference import forgetting_attention_reference
from megatron_fox.parallel import assign_heads, gather_from_context_parallel, head_parallel_forgetting_attention
from megatron_fox.parallel import head_parallel as hp

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "training"))
from workers import launch  # noqa: E402


def close(a, b, what, rel):
    err = (a.double() - b.double()).abs().max().item()
    assert err <= rel * b.abs().max().item() + 1e-6, f"{what}: max abs err {err}"


@pytest.mark.parametrize("world,H,Hkv,log_eps,bound,docs,balance", [
    (2, 4, 2, None, "scalar", False, True),
    (4, 8, 4, -10.0, "data", True, True),
    (4, 8, 8, -10.0, "per_head", False, False),
    (2, 8, 2, -10.0, "scalar", False, True),
    (2, 8, 8, None, "data", False, True),  # exact FoX: dealt by the cost above float32's zero
])
def test_matches_single_process(tmp_path, world, H, Hkv, log_eps, bound, docs, balance):
    _check_against_single_process(tmp_path, world, H, Hkv, log_eps, bound, docs, balance)


@pytest.mark.parametrize("world,log_eps", [(2, -10.0)])
def test_batch_of_packed_rows_matches_single_process(tmp_path, world, log_eps):
    """Two rows of packed documents in one call (offsets over the batch's 2 x L tokens): each
    rank's op runs its heads of both rows as one packed row, as one GPU does."""
    _check_against_single_process(tmp_path, world, 8, 4, log_eps, "data", True, True, B=2)


def _check_against_single_process(tmp_path, world, H, Hkv, log_eps, bound, docs, balance, B=1):
    T, D = 16 * 2 * world, 64
    q = F.rms_norm(torch.randn(B, T, H, D), (D,))
    k = F.rms_norm(torch.randn(B, T, Hkv, D), (D,))
    v = torch.randn(B, T, Hkv, D)
    # half-lives from ~1 token to far beyond T: very unequal pruned work per head
    shift = torch.linspace(-3.0, 6.0, H)[torch.randperm(H)]
    f = F.logsigmoid(torch.randn(B, T, H) * 0.1 + shift)
    do = torch.randn(B, T, H, D)
    torch.save({"q": q, "k": k, "v": v, "f": f, "do": do}, tmp_path / "in.pt")
    opts = {"inputs": str(tmp_path / "in.pt"), "out": str(tmp_path), "log_eps": log_eps, "balance": balance,
            "interpret": os.environ.get("TRITON_INTERPRET", "0")}
    logit_bound = None
    if bound == "scalar":
        logit_bound = opts["bound"] = math.sqrt(D) * 1.0001
    elif bound == "per_head":
        per_head = (math.sqrt(D) * (1.0 + torch.rand(H))).tolist()
        opts["bound_per_head"], logit_bound = per_head, torch.tensor(per_head)
    cu = None
    if docs:  # with a batch: offsets over its B * T tokens, batch-major, every row starting a document
        opts["cu"] = [0]
        for row in range(B):
            cuts = sorted(set(torch.randperm(T - 1)[: T // 12].add(1).tolist()) | {20, 21, 40})
            opts["cu"] += [row * T + c for c in cuts if c < T] + [(row + 1) * T]
        cu = torch.tensor(opts["cu"], dtype=torch.int32)
    launch("cp_a2a", world, opts)
    outs = [torch.load(tmp_path / f"cp_a2a_{r}.pt") for r in range(world)]

    heads = sorted(h for o in outs for h in o["heads"])
    assert heads == list(range(H)) and all(o["heads"] for o in outs)
    if balance:  # dealt by estimated cost: ACP's pruned pairs, exact FoX's pairs above float32's zero
        from megatron_fox.ops.forgetting_attn.common import logit_bound_per_head, pruning_threshold
        from megatron_fox.ops.forgetting_attn.plan import ZERO_LOG_WEIGHT
        from megatron_fox.parallel.head_parallel import head_costs

        U = logit_bound_per_head(q, k, D ** -0.5, logit_bound)
        delta = ZERO_LOG_WEIGHT - 2 * U if log_eps is None else pruning_threshold(U, T, log_eps)
        costs = head_costs(f.mean(1), delta, T).tolist()
        G = H // Hkv
        groups = assign_heads([sum(costs[g * G:(g + 1) * G]) for g in range(Hkv)], world)
        assert [sorted(o["heads"]) for o in outs] == [sorted(g * G + j for g in gs for j in range(G)) for gs in groups]
    ins = [t.clone().requires_grad_() for t in (q, k, v, f)]
    same, stats = forgetting_attention(*ins, log_eps=log_eps, logit_bound=logit_bound, cu_seqlens=cu,
                                       return_stats=True)
    same_grads = torch.autograd.grad(same, ins, do)
    exact = forgetting_attention_reference(*ins, cu_seqlens=cu, dtype=torch.float64)
    exact_grads = torch.autograd.grad(exact, ins, do)
    got = gather_from_context_parallel([o["o"] for o in outs], 1)
    close(got, same, "out", 2e-5)
    close(got, exact, "out vs exact FoX", 2e-4)
    for i, name in enumerate("q k v log_fgate".split()):
        g = gather_from_context_parallel([o["grads"][i] for o in outs], 1)
        close(g, same_grads[i], f"d{name}", 2e-5)
        close(g, exact_grads[i], f"d{name} vs exact FoX", 2e-4)
    mean_skipped = sum(o["skipped"] for o in outs) / world
    assert mean_skipped == pytest.approx(float(stats.skipped_fraction), abs=1e-6)
    if log_eps is not None and not docs:  # (short documents leave no whole block to prune)
        assert mean_skipped > 0  # the fast heads really skip
    # bytes: q, k, v, log f of the other ranks' heads out, our heads' outputs back
    for r, o in enumerate(outs):
        mine, others = len(o["heads"]), H - len(o["heads"])
        kv_mine = mine // (H // Hkv)
        want = B * ((T // world) * (others * (D * 4 + 4) + 2 * (Hkv - kv_mine) * D * 4)
                    + (T - T // world) * mine * D * 4)
        assert o["bytes_sent"] == want


def test_assign_heads_near_optimal():
    """Largest-first dealing is within 4/3 of the best split (Graham's bound) and uses every bin."""
    rng = random.Random(0)
    for _ in range(30):
        n, size = rng.randint(2, 8), rng.randint(1, 3)
        if n < size:
            continue
        costs = [rng.choice([0.1, 1.0, 10.0]) * rng.random() for _ in range(n)]
        bins = assign_heads(costs, size)
        assert sorted(i for b in bins for i in b) == list(range(n)) and all(bins)
        got = max(sum(costs[i] for i in b) for b in bins)
        best = min(max(sum(c for c, a in zip(costs, lab) if a == j) for j in range(size))
                   for lab in itertools.product(range(size), repeat=n))
        assert got <= (4 / 3 - 1 / (3 * size)) * best + 1e-12


def test_assign_heads_balances_skewed_costs():
    # one heavy head and many light ones: the heavy one alone on a rank
    assert assign_heads([1, 1, 1, 9, 1, 1, 1, 1, 1, 1], 2) == [[3], [0, 1, 2, 4, 5, 6, 7, 8, 9]]
    with pytest.raises(ValueError, match="head groups"):
        assign_heads([1.0, 2.0], 3)


def test_too_few_kv_heads_named(monkeypatch):
    monkeypatch.setattr(hp.dist, "get_world_size", lambda group=None: 4)
    monkeypatch.setattr(hp.dist, "get_rank", lambda group=None: 0)
    q, k = torch.randn(1, 8, 4, 16), torch.randn(1, 8, 2, 16)
    with pytest.raises(ValueError, match="^k: 2 kv heads"):
        head_parallel_forgetting_attention(q, k, k.clone(), torch.zeros(1, 8, 4), cp_group=None)


def test_odd_rank_sequence_named(monkeypatch):
    """Both context-parallel ops share one input check: this rank's part must be two equal chunks."""
    from megatron_fox.parallel import context_parallel_forgetting_attention

    monkeypatch.setattr(hp.dist, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(hp.dist, "get_rank", lambda group=None: 0)
    q = torch.randn(1, 7, 4, 16)
    for op in (head_parallel_forgetting_attention, context_parallel_forgetting_attention):
        with pytest.raises(ValueError, match=r"^q: this rank's sequence \(7\) must hold two equal chunks"):
            op(q, q.clone(), q.clone(), torch.zeros(1, 7, 4), cp_group=None)


def _dealing(f, bound, log_eps, world):
    """Heads per rank that costs from gates f [1, T, H] give (MHA), recomputed here."""
    T = f.shape[1]
    delta = -(2.0 * bound + math.log(T)) + log_eps
    window = (delta / f[0].double().mean(0).clamp(max=-1e-30)).clamp(1.0, T)
    return assign_heads((T * window - 0.5 * window * window).tolist(), world)


def test_cost_memory_deals_by_previous_call(tmp_path):
    """With a HeadCostMemory the second call deals heads by the first call's costs (no host
    wait) and is still exact."""
    world, B, H, D = 4, 1, 8, 64
    T = 16 * 2 * world
    q = F.rms_norm(torch.randn(B, T, H, D), (D,))
    k = F.rms_norm(torch.randn(B, T, H, D), (D,))
    v = torch.randn(B, T, H, D)
    shift = torch.linspace(-3.0, 6.0, H)
    f = F.logsigmoid(torch.randn(B, T, H) * 0.1 + shift)
    bound, log_eps = math.sqrt(D) * 1.0001, -10.0
    gen = torch.Generator().manual_seed(0)
    while True:  # first-call gates whose dealing differs from the real gates'
        f_first = F.logsigmoid(torch.randn(B, T, H) * 0.1 + shift[torch.randperm(H, generator=gen)])
        if _dealing(f_first, bound, log_eps, world) != _dealing(f, bound, log_eps, world):
            break
    do = torch.randn(B, T, H, D)
    torch.save({"q": q, "k": k, "v": v, "f": f, "f_first": f_first, "do": do}, tmp_path / "in.pt")
    launch("cp_a2a", world, {"inputs": str(tmp_path / "in.pt"), "out": str(tmp_path), "log_eps": log_eps,
                             "bound": bound, "memory": True, "interpret": os.environ.get("TRITON_INTERPRET", "0")})
    outs = [torch.load(tmp_path / f"cp_a2a_{r}.pt") for r in range(world)]
    want = _dealing(f_first, bound, log_eps, world)
    assert [o["first_heads"] for o in outs] == want
    assert [o["heads"] for o in outs] == want  # not _dealing(f, ...): the previous call's costs
    ins = [t.clone().requires_grad_() for t in (q, k, v, f)]
    same = forgetting_attention(*ins, log_eps=log_eps, logit_bound=bound)
    same_grads = torch.autograd.grad(same, ins, do)
    close(gather_from_context_parallel([o["o"] for o in outs], 1), same, "out", 2e-5)
    for i, name in enumerate("q k v log_fgate".split()):
        close(gather_from_context_parallel([o["grads"][i] for o in outs], 1), same_grads[i], f"d{name}", 2e-5)
