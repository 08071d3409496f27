"""Context-parallel FoX attention: chunks of the sequence over ranks, skipping pruned chunks.

Layout (Megatron-Core's load-balanced split): the sequence is cut into 2P chunks; rank r
holds chunks r and 2P-1-r, concatenated along the sequence dim of its tensors.

Forget gate: one all-gather of per-chunk sums of log f gives every chunk's global prefix
offset (exclusive cumsum over chunks); gradients flow back to every earlier chunk through a
differentiable all-gather.

Schedule: step s = 0 computes this rank's own blocks; at step s >= 1 rank r gets the K, V
and prefix sums of rank (r - s) mod P and sends its own to (r + s) mod P (a permutation per
step, so every link carries one chunk pair). Partial outputs merge by log-sum-exp; the
backward sends dK, dV and the key-side gradient of c back to the owner.

Skipping: with the global threshold delta (U all-reduced with max), a (query chunk i, key
chunk j) pair is skipped when offset_i - (offset_j + sum_j) < delta for every (batch,
head): offset_i >= c at chunk i's first query and offset_j + sum_j = c at chunk j's last
key, so every pair of the two chunks is below the threshold. Every rank evaluates the same
table before any transfer: a chunk nobody needs is neither sent nor computed, and steps
where no rank needs anything cost nothing. The same test per head decides which heads of a
live pair travel (exchange.py); layout helpers are in layout.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.distributed as dist

from ..ops.forgetting_attn.block import block_backward, block_forward
from ..ops.forgetting_attn.common import check_inputs, document_maps
from .exchange import _block_docs, _exchange_grads, _exchange_kv, _needed, all_gather_autograd
from .layout import chunk_ids, chunk_owner


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
    skipped_fraction: float = 0.0  # of this rank's causal attention FLOPs, at chunk granularity


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, c, plan):
        P, r = plan["size"], plan["rank"]
        B, T2, H, D = q.shape
        half = T2 // 2
        qs = (q[:, :half], q[:, half:])
        ks, vs, cs = (k[:, :half], k[:, half:]), (v[:, :half], v[:, half:]), (c[..., :half], c[..., half:])
        o_acc = torch.zeros((B, T2, H, D), dtype=torch.float32, device=q.device)
        lse_acc = torch.full((B, H, T2), float("-inf"), dtype=torch.float32, device=q.device)
        stats = plan["stats"]

        def run_blocks(blocks, kv, kv_rank):
            for qh, kh, causal in blocks:
                kk, vv, cc = kv[kh]
                o_b, lse_b, _ = block_forward(qs[qh], kk, vv, cs[qh], cc, sm_scale=plan["sm_scale"],
                                              causal=causal, delta=plan["delta"],
                                              **_block_docs(plan, r, qh, kv_rank, kh))
                rows = slice(qh * half, (qh + 1) * half)
                lse_old = lse_acc[..., rows]
                lse_new = torch.logaddexp(lse_old, lse_b)
                w_old = torch.exp(lse_old - lse_new).nan_to_num(0.0).transpose(1, 2)[..., None]
                w_new = torch.exp(lse_b - lse_new).nan_to_num(0.0).transpose(1, 2)[..., None]
                o_acc[:, rows] = o_acc[:, rows] * w_old + o_b.float() * w_new
                lse_acc[..., rows] = lse_new

        own = [(ks[h], vs[h], cs[h]) for h in (0, 1)]
        run_blocks(_needed(r, r, P, plan["live"]), own, r)
        for s in range(1, P):
            kv = _exchange_kv(own, s, plan, stats)
            blocks = _needed(r, (r - s) % P, P, plan["live"])
            stats.steps += 1
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

        def run_blocks(blocks, kv, kv_rank):
            grads = [None, None]
            for qh, kh, causal in blocks:
                kk, vv, cc = kv[kh]
                gq, gk, gv, gcq, gck = block_backward(qs[qh], kk, vv, os_[qh], dos[qh], lses[qh], cs[qh], cc,
                                                      sm_scale=plan["sm_scale"], causal=causal, delta=plan["delta"],
                                                      **_block_docs(plan, r, qh, kv_rank, kh))
                dq[:, sl[qh]] += gq.float()
                dc[..., sl[qh]] += gcq
                if grads[kh] is None:
                    grads[kh] = [gk.float(), gv.float(), gck]
                else:
                    for acc, g in zip(grads[kh], (gk, gv, gck)):
                        acc += g.float()
            return grads

        for h, g in enumerate(run_blocks(_needed(r, r, P, plan["live"]), own, r)):
            if g is not None:
                dk[:, sl[h]] += g[0]
                dv[:, sl[h]] += g[1]
                dc[..., sl[h]] += g[2]
        for s in range(1, P):
            kv = _exchange_kv(own, s, plan)
            grads = run_blocks(_needed(r, (r - s) % P, P, plan["live"]), kv, (r - s) % P)
            back = _exchange_grads(grads, own, s, plan)
            for h, g in enumerate(back):
                if g is not None:
                    dk[:, sl[h]] += g[0]
                    dv[:, sl[h]] += g[1]
                    dc[..., sl[h]] += g[2]
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dc, None


def shift_across_chunks(x: torch.Tensor, alpha_logit: torch.Tensor, group,
                        doc_start: Optional[torch.Tensor] = None) -> torch.Tensor:
    """FoX-Pro token shift of this rank's two chunks, [s, b, h, d] (Megatron layout), with the
    token before each chunk taken from the rank that holds the previous chunk. doc_start
    [s, b] bool marks document starts (no shift across them)."""
    from ..ops.token_shift import token_shift

    P, r = dist.get_world_size(group), dist.get_rank(group)
    half = x.shape[0] // 2
    lasts = torch.stack([x[half - 1], x[-1]])  # [2, b, h, d]: last token of our front, back chunk
    every = all_gather_autograd(lasts, group)  # [P, 2, b, h, d]
    out = []
    for i, chunk in enumerate(chunk_ids(r, P)):
        rows = slice(i * half, (i + 1) * half)
        prev0 = None
        if chunk > 0:
            owner, part = chunk_owner(chunk - 1, P)
            prev0 = every[owner, part][None]
        out.append(token_shift(x[rows], alpha_logit[rows], None if doc_start is None else doc_start[rows], prev0))
    return torch.cat(out, dim=0)


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


def skip_table(offsets: torch.Tensor, chunk_sums: torch.Tensor, delta: torch.Tensor):
    """Which (query chunk i, key chunk j <= i) pairs and which of their heads are live.

    offsets, chunk_sums [B, H, 2P] (c before each chunk, sum of log f in it), delta [B, H].
    Pair (i, j) is dead for a head when offset_i - (offset_j + sum_j) < delta for every batch
    row (every pair of positions is then below the threshold). Returns (live [2P][2P] bools:
    some head live, diagonal always; heads {(i, j): set of live heads} for live j < i).
    """
    n = offsets.shape[-1]
    ends = offsets + chunk_sums
    gap = offsets[..., :, None] - ends[..., None, :] - delta[..., None, None]  # [B, H, 2P, 2P]
    dead = (gap < 0).all(dim=0)  # [H, 2P, 2P]
    skip = dead.all(dim=0).tolist()
    live = [[j <= i and (j == i or not skip[i][j]) for j in range(n)] for i in range(n)]
    alive = (~dead).tolist()
    heads = {(i, j): {h for h in range(len(alive)) if alive[h][i][j]}
             for i in range(n) for j in range(i) if live[i][j]}
    return live, heads


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
):
    """FoX attention over a sequence split across the ranks of cp_group.

    q [B, 2c, H, D], k/v [B, 2c, Hkv, D], log_fgate [B, 2c, H]: this rank's chunks r and
    2P-1-r (each c long) of a sequence of 2cP tokens, concatenated. Same meaning of sm_scale,
    log_eps and logit_bound as `megatron_fox.ops.forgetting_attention`, with U and L global.
    cu_seqlens: packed documents of the whole (global) row, batch 1, offsets [0, ..., 2cP]:
    attention and the forget gate restart at each document, across chunk borders too.
    Returns this rank's output [B, 2c, H, D] (differentiable in q, k, v, log_fgate) and, with
    return_stats, a ContextParallelStats. skip_chunks=False computes and sends every causal
    chunk pair even where ACP prunes all of it (the kernels still skip blocks): the baseline
    the chunk skipping is measured against.
    """
    P, r = dist.get_world_size(cp_group), dist.get_rank(cp_group)
    B, T2, H, D = q.shape
    L = T2 * P
    sm_scale, logit_bound = check_inputs(q, k, v, log_fgate, sm_scale, log_eps, logit_bound, cu_seqlens,
                                         cu_seqlens_total=L)
    if T2 % 2:
        raise ValueError(f"q: this rank's sequence ({T2}) must hold two equal chunks")
    docs = None if cu_seqlens is None else document_maps(cu_seqlens, L, q.device)  # global start, end [L]
    c, offsets, chunk_sums = global_prefix_sums(log_fgate, cp_group)
    delta = None
    causal = [[j <= i for j in range(2 * P)] for i in range(2 * P)]
    live, heads = causal, None
    if log_eps is not None:
        with torch.no_grad():
            if logit_bound is None:
                qn = torch.linalg.vector_norm(q.float(), dim=-1).amax(1)
                kn = torch.linalg.vector_norm(k.float(), dim=-1).amax(1)
                dist.all_reduce(qn, op=dist.ReduceOp.MAX, group=cp_group)
                dist.all_reduce(kn, op=dist.ReduceOp.MAX, group=cp_group)
                U = sm_scale * qn * kn.repeat_interleave(H // k.shape[2], dim=1)
            elif isinstance(logit_bound, torch.Tensor):
                U = logit_bound.float().view(1, H).expand(B, H)
            else:
                U = torch.full((B, H), logit_bound, device=q.device)
            delta = -(2.0 * U + math.log(L)) + log_eps
            if skip_chunks:
                live, heads = skip_table(offsets, chunk_sums, delta)
    if docs is not None:  # a chunk pair no document spans is dead
        n = T2 // 2
        last_doc_end = docs[1][n - 1::n].tolist()  # end of the document of each chunk's last key
        live = [[live[i][j] and (i == j or last_doc_end[j] > i * n) for j in range(2 * P)]
                for i in range(2 * P)]
    stats = ContextParallelStats()
    flops = 0.0
    for qc in chunk_ids(r, P):
        for j in range(qc + 1):
            stats.blocks += 1
            flops += 0.5 if j == qc else 1.0  # a diagonal block is half a full one
            if not live[qc][j]:
                stats.blocks_skipped += 1
                stats.skipped_pairs.append((qc, j))
    stats.skipped_fraction = stats.blocks_skipped / flops
    plan = {"size": P, "rank": r, "group": cp_group, "ranks": dist.get_process_group_ranks(cp_group),
            "sm_scale": sm_scale, "delta": delta, "live": live, "causal": causal, "stats": stats,
            "heads": heads, "num_heads": H, "group_size": H // k.shape[2], "docs": docs, "chunk": T2 // 2}
    o = _RingAttention.apply(q, k, v, c, plan)
    return (o, stats) if return_stats else o
