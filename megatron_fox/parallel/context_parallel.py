"""Context-parallel FoX attention: chunks of the sequence over ranks, skipping pruned chunks.

Layout (Megatron-Core's load-balanced split): the sequence is cut into 2P chunks; rank r
holds chunks r and 2P-1-r, concatenated along the sequence dim of its tensors.

Forget gate: one all-gather of per-chunk sums of log f gives every chunk's global prefix
offset (exclusive cumsum over chunks); gradients flow back to every earlier chunk through a
differentiable all-gather.

Schedule: step s = 0 computes this rank's own blocks; at step s >= 1 rank r gets the K, V
and prefix sums of rank (r - s) mod P and sends its own to (r + s) mod P (a permutation per
step, so every link carries one chunk pair). Each rank sends its own chunks directly (no
relay), so step s+1's transfer is posted before step s computes and overlaps it. Partial
outputs merge by log-sum-exp; the backward sends dK, dV and the key-side gradient of c back
to the owner while the next step computes.

Skipping: with the global threshold delta (U all-reduced with max), a (query chunk i, key
chunk j) pair is skipped when offset_i - (offset_j + sum_j) < delta for every (batch,
head): offset_i >= c at chunk i's first query and offset_j + sum_j = c at chunk j's last
key, so every pair of the two chunks is below the threshold. Every rank evaluates the same
table before any transfer: a chunk nobody needs is neither sent nor computed, and steps
where no rank needs anything cost nothing. The same test per head decides which heads of a
live pair travel (exchange.py); the table and the per-layer choice of waiting for it are in
skipping.py, layout helpers in layout.py.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.distributed as dist

from ..ops.forgetting_attn.block import block_backward, block_forward
from ..ops.forgetting_attn.common import (check_backward_pruning, check_inputs, logit_bound_per_head,
                                          pruning_threshold, row_document_maps)
from ..ops.forgetting_attn.plan import forward_diagonal, skips_zero_blocks
from ..ops.forgetting_attn.row_norm import max_row_norm
from ..ops.forgetting_attn.merge import merge_partial_
from .exchange import (_block_docs, _needed, all_gather_autograd, comm_stream, head_indices, start_grad_exchange,
                       start_kv_exchange)
from .layout import chunk_ids, chunk_owner
from .skipping import AsyncToHost, ChunkSkipMemory, live_from_dead, pruned_share, dead_heads


@dataclass
class ContextParallelStats:
    """What this rank skipped in one forward (the backward skips the same again).

    steps / steps_skipped: ring steps (s >= 1) and those where this rank computed nothing.
    blocks / blocks_skipped: causal (query chunk, key chunk) pairs of this rank's queries.
    bytes_sent / bytes_not_sent: K, V and prefix sums this rank sent, and the bytes a causal
    ring without skipping would have sent on top.
    """

    steps: int = 0
    steps_skipped: int = 0
    blocks: int = 0
    blocks_skipped: int = 0
    bytes_sent: int = 0
    bytes_not_sent: int = 0
    bytes_causal_ring: int = 0
    skipped_pairs: list = field(default_factory=list)
    # per ring step s = 1..P-1: K/V/prefix-sum bytes this rank received, and whether it computed
    bytes_received_by_step: list = field(default_factory=list)
    computed_by_step: list = field(default_factory=list)
    # of this rank's causal attention FLOPs, in whole chunk pairs ACP prunes (pairs skipped
    # because no document spans them count in blocks_skipped only; the kernels' own
    # block-level pruning inside live pairs is not counted here). A float, or a 0-dim device
    # tensor when the call did not wait for the skip table (see ChunkSkipMemory).
    skipped_fraction: float = 0.0
    # the call waited for the skip table and skipped what it says (False: every causal pair
    # sent and computed, as with skip_chunks=False)
    table_waited: bool = False


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, c, plan):
        P, r = plan["size"], plan["rank"]
        B, T2, H, D = q.shape
        half = T2 // 2
        qs = (q[:, :half], q[:, half:])
        ks, vs, cs = (k[:, :half], k[:, half:]), (v[:, :half], v[:, half:]), (c[..., :half], c[..., half:])
        o_acc = torch.zeros((B, T2, H, D), dtype=torch.float32, device=q.device)
        # base-2 row log-sum-exp, as the kernels keep it (no rescaling per block)
        lse_acc = torch.full((B, H, T2), float("-inf"), dtype=torch.float32, device=q.device)
        stats = plan["stats"]

        def run_blocks(blocks, kv, kv_rank):
            for qh, kh, causal in blocks:
                kk, vv, cc = kv[kh]
                diagonal = plan["diagonal"]
                o_b, lse_b, _ = block_forward(qs[qh], kk, vv, cs[qh], cc, sm_scale=plan["sm_scale"],
                                              causal=causal, delta=plan["delta"], bound=plan["bound"],
                                              diagonal=None if diagonal is None else diagonal[qh],
                                              lse_base2=True, **_block_docs(plan, r, qh, kv_rank, kh))
                rows = slice(qh * half, (qh + 1) * half)
                merge_partial_(o_acc[:, rows], lse_acc[..., rows], o_b, lse_b, base2=True)

        own = [(ks[h], vs[h], cs[h]) for h in (0, 1)]
        # K/V are posted from the comm stream, which waits only for what is queued now (our
        # K, V and prefix sums), so no transfer waits for compute. Our own blocks (all of them:
        # a chunk pair the table calls dead has every kernel block pruned) are queued before
        # the host waits for the skip table, so the GPU stays busy while it waits and plans;
        # step 1's K/V then travel while the own blocks compute, step s+1's while step s does.
        posting = _posting_context(plan)
        run_blocks(_needed(r, r, P, plan["causal"]), own, r)
        with posting():
            plan.pop("resolve")()  # popped: it refers to plan, and plan outlives the call in ctx
            nxt = start_kv_exchange(own, 1, plan, stats) if P > 1 else None
        for s in range(1, P):
            kv = nxt.wait()
            if s + 1 < P:
                with posting():
                    nxt = start_kv_exchange(own, s + 1, plan, stats)
            blocks = _needed(r, (r - s) % P, P, plan["live"])
            stats.steps += 1
            stats.computed_by_step.append(bool(blocks))
            if not blocks:
                stats.steps_skipped += 1
            run_blocks(blocks, kv, (r - s) % P)
        stats.bytes_not_sent = stats.bytes_causal_ring - stats.bytes_sent
        o = o_acc.to(q.dtype)
        ctx.save_for_backward(q, k, v, c, o, lse_acc)
        ctx.plan = plan
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, c, o, lse = ctx.saved_tensors
        plan = ctx.plan
        P, r = plan["size"], plan["rank"]
        half = q.shape[1] // 2
        sl = (slice(0, half), slice(half, 2 * half))
        qs, os_, dos = [q[:, s] for s in sl], [o[:, s] for s in sl], [do[:, s] for s in sl]
        cs, lses = [c[..., s] for s in sl], [lse[..., s] for s in sl]
        own = [(k[:, s], v[:, s], c[..., s]) for s in sl]
        dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        dc = torch.zeros(c.shape, dtype=torch.float32, device=q.device)
        dk = torch.zeros(k.shape, dtype=torch.float32, device=q.device)
        dv = torch.zeros(v.shape, dtype=torch.float32, device=q.device)
        thresholds = [{}, {}] if plan["bound"] is not None else [None, None]  # per query half, see block_backward

        def run_blocks(blocks, kv, kv_rank):
            grads = [None, None]
            for qh, kh, causal in blocks:
                kk, vv, cc = kv[kh]
                gq, gk, gv, gcq, gck = block_backward(qs[qh], kk, vv, os_[qh], dos[qh], lses[qh], cs[qh], cc,
                                                      sm_scale=plan["sm_scale"], causal=causal, delta=plan["delta"],
                                                      bound=plan["bound"], thresholds=thresholds[qh],
                                                      lse_base2=True, **_block_docs(plan, r, qh, kv_rank, kh))
                dq[:, sl[qh]] += gq  # in-place adds promote to float32: no cast kernel
                dc[..., sl[qh]] += gcq
                if grads[kh] is None:
                    grads[kh] = [gk.float(), gv.float(), gck]
                else:
                    for acc, g in zip(grads[kh], (gk, gv, gck)):
                        acc += g
            return grads

        def add_key_grads(per_half):
            for h, g in enumerate(per_half):
                if g is not None:
                    dk[:, sl[h]] += g[0]
                    dv[:, sl[h]] += g[1]
                    dc[..., sl[h]] += g[2]

        # K/V of step s+1 travel while step s computes (posted from the comm stream, as in
        # the forward); step s's key gradients travel back while step s+1 computes (posted
        # from this stream: they wait for their own compute). Our own blocks (the same as
        # the forward's) are split: the first diagonal block covers step 1's transfer, the
        # others the last gradients' trip back.
        posting = _posting_context(plan)
        with posting():
            nxt = start_kv_exchange(own, 1, plan) if P > 1 else None
        own_blocks = _needed(r, r, P, plan["causal"])
        add_key_grads(run_blocks(own_blocks[:1], own, r))
        back = None
        for s in range(1, P):
            kv = nxt.wait()
            if s + 1 < P:
                with posting():
                    nxt = start_kv_exchange(own, s + 1, plan)
            grads = run_blocks(_needed(r, (r - s) % P, P, plan["live"]), kv, (r - s) % P)
            if back is not None:
                add_key_grads(back.wait())
            back = start_grad_exchange(grads, own, s, plan)
        add_key_grads(run_blocks(own_blocks[1:], own, r))
        if back is not None:
            add_key_grads(back.wait())
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dc, None


def _posting_context(plan):
    """A context manager factory: code under it runs on the comm stream, which first waits
    for everything queued on the compute stream up to this call (nothing later). Off CUDA
    it does nothing."""
    stream = plan["comm"]
    if stream is None:
        return contextlib.nullcontext
    stream.wait_stream(torch.cuda.current_stream(stream.device))
    return functools.partial(torch.cuda.stream, stream)


def global_prefix_sums(log_fgate: torch.Tensor, group) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Global c = cumsum(log f) at this rank's positions, [B, H, 2*half] (differentiable),
    plus chunk offsets and chunk sums over all 2P chunks, [B, H, 2P] each (detached)."""
    P, r = dist.get_world_size(group), dist.get_rank(group)
    half = log_fgate.shape[1] // 2
    lf = log_fgate.float().transpose(1, 2)  # [B, H, 2*half]
    a, b = lf[..., :half], lf[..., half:]
    sums = torch.stack([a.sum(-1), b.sum(-1)], dim=-1)  # [B, H, 2]
    every = all_gather_autograd(sums, group)  # [P, B, H, 2]
    per_chunk = [every[chunk_owner(j, P)[0], ..., chunk_owner(j, P)[1]] for j in range(2 * P)]
    chunk_sums = torch.stack(per_chunk, dim=-1)  # [B, H, 2P]
    offsets = torch.cumsum(chunk_sums, dim=-1) - chunk_sums
    ca, cb = chunk_ids(r, P)
    c = torch.cat([offsets[..., ca:ca + 1] + torch.cumsum(a, -1), offsets[..., cb:cb + 1] + torch.cumsum(b, -1)], -1)
    return c, offsets.detach(), chunk_sums.detach()


def global_logit_bound(q, k, sm_scale, logit_bound, group) -> torch.Tensor:
    """U [B, H] of the whole sequence from this rank's part: logit_bound (float or [H]) or,
    when None, from the data (sm_scale * max||q|| * max||k|| all-reduced with max over the group)."""
    with torch.no_grad():
        return logit_bound_per_head(q, k, sm_scale, logit_bound,
                                    reduce_max=lambda t: dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group),
                                    max_norm=max_row_norm if q.is_cuda else None)


def global_pruning_threshold(q, k, sm_scale, log_eps, logit_bound, L, group) -> torch.Tensor:
    """ACP threshold delta = -(2U + log L) + log_eps [B, H] of the whole sequence (L tokens),
    U from `global_logit_bound`."""
    return pruning_threshold(global_logit_bound(q, k, sm_scale, logit_bound, group), L, log_eps)


def check_rank_inputs(q, k, v, log_fgate, sm_scale, log_eps, logit_bound, cu_seqlens, group):
    """The op's input checks for this rank's two chunks of each of B sequences split over
    `group` (cu_seqlens then spans the B whole sequences, batch-major, each starting a
    document) -> (sm_scale, logit_bound, L the global length)."""
    T2 = q.shape[1]
    L = T2 * dist.get_world_size(group)
    sm_scale, logit_bound = check_inputs(q, k, v, log_fgate, sm_scale, log_eps, logit_bound, cu_seqlens,
                                         cu_seqlens_total=q.shape[0] * L, per_sample=True)
    if T2 % 2:
        raise ValueError(f"q: this rank's sequence ({T2}) must hold two equal chunks")
    return sm_scale, logit_bound, L


def context_parallel_forgetting_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_fgate: torch.Tensor,
    *,
    cp_group,
    sm_scale: Optional[float] = None,
    log_eps: Optional[float] = None,
    logit_bound=None,
    cu_seqlens: Optional[torch.Tensor] = None,
    return_stats: bool = False,
    skip_chunks: bool = True,
    skip_memory: Optional[ChunkSkipMemory] = None,
    backward_pruning: str = "bound",
):
    """FoX attention over a sequence split across the ranks of cp_group.

    q [B, 2c, H, D], k/v [B, 2c, Hkv, D], log_fgate [B, 2c, H]: this rank's chunks r and
    2P-1-r (each c long) of a sequence of 2cP tokens, concatenated. Same meaning of sm_scale,
    log_eps and logit_bound as `megatron_fox.ops.forgetting_attention`, with U and L global.
    cu_seqlens: packed documents of the whole (global) rows, offsets [0, ..., 2cP] for batch 1,
    or over the B * 2cP tokens of the batch's whole rows in batch-major order, each row
    starting a document (as Megatron packs a micro-batch): attention and the forget gate
    restart at each document, across chunk borders too.
    Returns this rank's output [B, 2c, H, D] (differentiable in q, k, v, log_fgate) and, with
    return_stats, a ContextParallelStats. skip_chunks=False computes and sends every causal
    chunk pair even where ACP prunes all of it (the kernels still skip blocks): the baseline
    the chunk skipping is measured against. skip_memory (one per layer): skip only when the
    previous call of the layer had a dead chunk pair, see ChunkSkipMemory. backward_pruning
    as in the op: with "lse" the kernels of the backward also prune by the merged rows' lse
    (which chunk pairs are computed and sent stays the forward's decision). Exact FoX
    (log_eps=None) skips, as the op does, the kernel blocks whose weights are zero in float32
    (`set_zero_block_skipping`); no chunk pair is skipped or left unsent for it.
    """
    P, r = dist.get_world_size(cp_group), dist.get_rank(cp_group)
    B, T2, H, D = q.shape
    sm_scale, logit_bound, L = check_rank_inputs(q, k, v, log_fgate, sm_scale, log_eps, logit_bound, cu_seqlens,
                                                 cp_group)
    check_backward_pruning(backward_pruning)
    docs = None if cu_seqlens is None else row_document_maps(cu_seqlens, B, L, q.device)  # global start, end [B, L]
    c, offsets, chunk_sums = global_prefix_sums(log_fgate, cp_group)
    delta, dead, U, diagonal = None, None, None, None
    causal = [[j <= i for j in range(2 * P)] for i in range(2 * P)]
    exact_zero = skips_zero_blocks(log_eps)  # exact FoX: the kernels skip blocks zero in float32
    if log_eps is not None or exact_zero:
        U = global_logit_bound(q, k, sm_scale, logit_bound, cp_group)
    n = T2 // 2
    if exact_zero:  # by the diagonal logits below each row's lse in the forward, by lse in the backward
        diagonal = [forward_diagonal(q[:, h * n:(h + 1) * n], k[:, h * n:(h + 1) * n], sm_scale) for h in (0, 1)]
    if log_eps is not None:
        delta = pruning_threshold(U, L, log_eps)
        if skip_chunks:
            dead = dead_heads(offsets, chunk_sums, delta)
    # the table is data-dependent: its copy to the host starts now and is waited for only
    # once our own blocks are queued (the ring's first step needs it; own blocks do not)
    # with documents: how far the document of each chunk's last key reaches, in the row it reaches furthest
    reach = None if docs is None else docs[1][:, n - 1::n].amax(0)
    table = AsyncToHost([t for t in (dead, reach) if t is not None])
    stats = ContextParallelStats()
    plan = {"size": P, "rank": r, "group": cp_group, "ranks": dist.get_process_group_ranks(cp_group),
            "sm_scale": sm_scale, "delta": delta, "live": None, "causal": causal, "stats": stats,
            "bound": U if backward_pruning == "lse" or exact_zero else None, "diagonal": diagonal,
            "heads": None, "num_heads": H, "group_size": H // k.shape[2], "docs": docs, "chunk": n,
            "comm": comm_stream(q.device),
            "compute_stream": torch.cuda.current_stream(q.device) if q.is_cuda else None}

    def table_live(host):
        """Host table -> (live [2P][2P] with documents, live by ACP alone, heads)."""
        host = list(host)
        live, heads = live_from_dead(host.pop(0)) if dead is not None else (causal, None)
        by_acp = live
        if docs is not None:  # a chunk pair no document spans is dead
            last_doc_end = host.pop(0)  # end of the document of each chunk's last key
            live = [[live[i][j] and (i == j or last_doc_end[j] > i * n) for j in range(2 * P)]
                    for i in range(2 * P)]
        return live, by_acp, heads

    wait = skip_memory is None or (dead is None and docs is None) or skip_memory.skip_this_call()
    device = q.device  # not q itself: the closure must not keep this call's inputs alive

    def resolve():
        if wait:
            live, by_acp, heads = table_live(table.get())
            if skip_memory is not None:
                skip_memory.remember(live)
        else:  # every causal pair, as skip_chunks=False; the table waits for the next call
            skip_memory.defer(table, lambda host: table_live(host)[0])
            live, by_acp, heads = causal, causal, None
        ca, cb = chunk_ids(r, P)
        live = [row[:] for row in live]
        live[cb][ca] = True  # our own pair goes to the kernels anyway (they prune inside it)
        flops = pruned = 0.0
        for qc in chunk_ids(r, P):
            for j in range(qc + 1):
                stats.blocks += 1
                flops += 0.5 if j == qc else 1.0  # a diagonal block is half a full one
                pruned += 0.0 if by_acp[qc][j] else 1.0
                if not live[qc][j]:
                    stats.blocks_skipped += 1
                    stats.skipped_pairs.append((qc, j))
        # without the table on the host, ACP's whole-pair share comes from the device
        stats.skipped_fraction = pruned / flops if wait or dead is None else pruned_share(dead, r, P)
        stats.table_waited = wait
        plan.update(live=live, heads=heads)
        head_indices(plan, device)

    plan["resolve"] = resolve
    o = _RingAttention.apply(q, k, v, c, plan)
    return (o, stats) if return_stats else o
