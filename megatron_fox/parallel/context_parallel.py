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
where no rank needs anything cost nothing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.distributed as dist

from ..ops.forgetting_attn.block import block_backward, block_forward
from ..ops.forgetting_attn.common import check_inputs


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


class _AllGather(torch.autograd.Function):
    """[...] -> [P, ...] over the group; backward sums the gradient over ranks, keeps ours."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        size = dist.get_world_size(group)
        out = torch.empty(size * x.numel(), dtype=x.dtype, device=x.device)
        dist.all_gather_into_tensor(out, x.contiguous().view(-1), group=group)
        return out.view(size, *x.shape)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return grad[dist.get_rank(ctx.group)], None


def all_gather_autograd(x: torch.Tensor, group) -> torch.Tensor:
    """Differentiable all-gather: x [...] -> [P, ...]."""
    return _AllGather.apply(x, group)


def chunk_ids(rank: int, size: int) -> tuple[int, int]:
    """Global chunk indices (front, back) held by `rank` in the load-balanced layout."""
    return rank, 2 * size - 1 - rank


def chunk_owner(chunk: int, size: int) -> tuple[int, int]:
    """(rank, 0 for its front half / 1 for its back half) holding global `chunk`."""
    return (chunk, 0) if chunk < size else (2 * size - 1 - chunk, 1)


def split_for_context_parallel(x: torch.Tensor, dim: int, rank: int, size: int) -> torch.Tensor:
    """This rank's part of a full-sequence tensor: chunks rank and 2*size-1-rank along dim."""
    chunks = x.chunk(2 * size, dim=dim)
    a, b = chunk_ids(rank, size)
    return torch.cat([chunks[a], chunks[b]], dim=dim)


def gather_from_context_parallel(parts: list, dim: int) -> torch.Tensor:
    """Inverse of split_for_context_parallel given every rank's part (rank order)."""
    size = len(parts)
    chunks = [None] * (2 * size)
    for r, p in enumerate(parts):
        a, b = chunk_ids(r, size)
        chunks[a], chunks[b] = p.chunk(2, dim=dim)
    return torch.cat(chunks, dim=dim)


def _needed(q_rank: int, kv_rank: int, size: int, live) -> list:
    """(query half, key half, causal) blocks rank q_rank computes with kv_rank's chunks."""
    qa, qb = chunk_ids(q_rank, size)
    ka, kb = chunk_ids(kv_rank, size)
    out = []
    for qh, qc in ((0, qa), (1, qb)):
        for kh, kc in ((0, ka), (1, kb)):
            if kc <= qc and live[qc][kc]:
                out.append((qh, kh, kc == qc))
    return out


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
            kv = _exchange_kv(own, s, plan, stats, count=True)
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
            kv = _exchange_kv(own, s, plan, None, count=False)
            grads = run_blocks(_needed(r, (r - s) % P, P, plan["live"]), kv, (r - s) % P)
            back = _exchange_grads(grads, own, s, plan)
            for h, g in enumerate(back):
                if g is not None:
                    dk[:, sl[h]] += g[0]
                    dv[:, sl[h]] += g[1]
                    dc[..., sl[h]] += g[2]
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dc, None


def _block_docs(plan, q_rank, q_half, kv_rank, kv_half) -> dict:
    """doc_start / doc_end arguments of a block (relative to its key / query chunk), or {}."""
    docs = plan["docs"]
    if docs is None:
        return {}
    P, n = plan["size"], plan["chunk"]
    qc, kc = chunk_ids(q_rank, P)[q_half], chunk_ids(kv_rank, P)[kv_half]
    ds, de = docs
    return {"doc_start": (ds[qc * n:(qc + 1) * n] - kc * n).clamp(0, n).to(torch.int32).contiguous(),
            "doc_end": (de[kc * n:(kc + 1) * n] - qc * n).clamp(0, n).to(torch.int32).contiguous()}


def _halves_needed(q_rank, kv_rank, size, live) -> list:
    """Which of kv_rank's halves q_rank needs (sorted, unique)."""
    return sorted({kh for _, kh, _ in _needed(q_rank, kv_rank, size, live)})


def _heads_needed(q_rank, kv_rank, half, plan):
    """(kv heads, query heads) of kv_rank's `half` that q_rank's live blocks use, or None for all."""
    P, heads, group = plan["size"], plan["heads"], plan["group_size"]
    if heads is None:
        return None
    qc, kc = chunk_ids(q_rank, P), chunk_ids(kv_rank, P)
    q_heads = set()
    for qh, kh, _ in _needed(q_rank, kv_rank, P, plan["live"]):
        if kh == half:
            q_heads |= heads[(qc[qh], kc[kh])]
    if len(q_heads) == plan["num_heads"]:
        return None
    q_idx = sorted(q_heads)
    kv_idx = sorted({h // group for h in q_idx})
    return kv_idx, q_idx


def _select(tensors, sel, device):
    """The selected heads of (k, v, c) as contiguous tensors (k, v: dim 2; c: dim 1)."""
    if sel is None:
        return [t.contiguous() for t in tensors]
    kv_idx, q_idx = (torch.tensor(i, device=device) for i in sel)
    k, v, c = tensors
    return [k.index_select(2, kv_idx).contiguous(), v.index_select(2, kv_idx).contiguous(),
            c.index_select(1, q_idx).contiguous()]


def _wire_shapes(half, sel) -> list:
    """Shapes of (k, v, c) of a half as sent: all heads, or the selected ones."""
    k, v, c = half
    if sel is None:
        return [k.shape, v.shape, c.shape]
    return [(*k.shape[:2], len(sel[0]), k.shape[3]), (*v.shape[:2], len(sel[0]), v.shape[3]),
            (c.shape[0], len(sel[1]), c.shape[2])]


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _exchange_kv(own, s, plan, stats, count):
    """Step s: send our needed halves (needed heads only) to (r+s), receive (r-s)'s.
    Returns {half: (k, v, c)} at full head count; heads not sent get c = +1e30, so every
    pair of theirs is pruned (after centering, c_q - c_k = -1e30) and never read."""
    P, r, group, ranks = plan["size"], plan["rank"], plan["group"], plan["ranks"]
    dst, src = (r + s) % P, (r - s) % P
    dev = own[0][0].device
    reqs = []
    for h in _halves_needed(dst, r, P, plan["live"]):
        parts = _select(own[h], _heads_needed(dst, r, h, plan), dev)
        reqs += [dist.isend(t, ranks[dst], group=group) for t in parts]
        if count:
            stats.bytes_sent += _nbytes(parts)
    if count:
        full = _nbytes(own[0])
        stats.bytes_causal_ring += len(_halves_needed(dst, r, P, plan["causal"])) * full
    kv, pending = {}, []
    for h in _halves_needed(r, src, P, plan["live"]):
        sel = _heads_needed(r, src, h, plan)
        shapes = _wire_shapes(own[h], sel)
        bufs = [torch.empty(shp, dtype=t.dtype, device=dev) for shp, t in zip(shapes, own[h])]
        reqs += [dist.irecv(b, ranks[src], group=group) for b in bufs]
        pending.append((h, sel, bufs))
    for req in reqs:
        req.wait()
    for h, sel, bufs in pending:
        if sel is None:
            kv[h] = tuple(bufs)
            continue
        k, v, c = own[h]
        kv_idx, q_idx = (torch.tensor(i, device=dev) for i in sel)
        kf = torch.empty(k.shape, dtype=k.dtype, device=dev).index_copy_(2, kv_idx, bufs[0])
        vf = torch.empty(v.shape, dtype=v.dtype, device=dev).index_copy_(2, kv_idx, bufs[1])
        cf = torch.full(c.shape, 1e30, dtype=c.dtype, device=dev).index_copy_(1, q_idx, bufs[2])
        kv[h] = (kf, vf, cf)
    return kv


def _exchange_grads(grads, own, s, plan):
    """Send the key-side gradients of (r-s)'s halves back to it (needed heads only);
    receive ours from (r+s)."""
    P, r, group, ranks = plan["size"], plan["rank"], plan["group"], plan["ranks"]
    src, dst = (r - s) % P, (r + s) % P
    dev = own[0][0].device
    reqs = []
    for h in _halves_needed(r, src, P, plan["live"]):
        parts = _select(grads[h], _heads_needed(r, src, h, plan), dev)
        reqs += [dist.isend(t, ranks[src], group=group) for t in parts]
    back, pending = [None, None], []
    for h in _halves_needed(dst, r, P, plan["live"]):
        sel = _heads_needed(dst, r, h, plan)
        shapes = _wire_shapes(own[h], sel)
        bufs = [torch.empty(shp, dtype=torch.float32, device=dev) for shp in shapes]
        reqs += [dist.irecv(b, ranks[dst], group=group) for b in bufs]
        pending.append((h, sel, bufs))
    for req in reqs:
        req.wait()
    for h, sel, bufs in pending:
        if sel is None:
            back[h] = bufs
            continue
        k, v, c = own[h]
        kv_idx, q_idx = (torch.tensor(i, device=dev) for i in sel)
        back[h] = [torch.zeros(k.shape, dtype=torch.float32, device=dev).index_copy_(2, kv_idx, bufs[0]),
                   torch.zeros(v.shape, dtype=torch.float32, device=dev).index_copy_(2, kv_idx, bufs[1]),
                   torch.zeros(c.shape, dtype=torch.float32, device=dev).index_copy_(1, q_idx, bufs[2])]
    return back


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


def local_document_starts(cu_seqlens: torch.Tensor, seq_full: int, batch: int, group) -> torch.Tensor:
    """[s_local, b] bool: document starts at this rank's positions. cu_seqlens index the
    batch-major flattening of the full [b, seq_full] micro-batch."""
    mask = torch.zeros(batch * seq_full, dtype=torch.bool, device=cu_seqlens.device)
    mask[cu_seqlens[:-1].long()] = True
    part = split_for_context_parallel(mask.view(batch, seq_full), 1, dist.get_rank(group), dist.get_world_size(group))
    return part.t()


def sample_cu_seqlens(cu_seqlens: torch.Tensor, sample: int, seq_full: int) -> torch.Tensor:
    """Offsets of one sample's documents from the batch-major offsets of a micro-batch
    (every sample starts a document)."""
    lo, hi = sample * seq_full, (sample + 1) * seq_full
    inside = cu_seqlens[(cu_seqlens >= lo) & (cu_seqlens <= hi)]
    return (inside - lo).to(torch.int32)


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


def _global_documents(cu_seqlens, B, L, device):
    """Per-position document start / end (global, int64 [L]) of a packed row, or None."""
    if cu_seqlens is None:
        return None
    if B != 1:
        raise ValueError(f"cu_seqlens needs packed input with batch 1, got batch {B}")
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.dtype not in (torch.int32,
                                                                                                      torch.int64):
        raise ValueError("cu_seqlens must be a 1-D int32 tensor of document offsets [0, ..., seq]")
    cs = cu_seqlens.to(device=device, dtype=torch.int64)
    if cs[0].item() != 0 or cs[-1].item() != L or bool((cs[1:] <= cs[:-1]).any()):
        raise ValueError(f"cu_seqlens must start at 0, end at the global length {L} and be strictly increasing")
    pos = torch.arange(L, device=device)
    doc = torch.searchsorted(cs, pos, right=True) - 1
    return cs[doc], cs[doc + 1]


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
):
    """FoX attention over a sequence split across the ranks of cp_group.

    q [B, 2c, H, D], k/v [B, 2c, Hkv, D], log_fgate [B, 2c, H]: this rank's chunks r and
    2P-1-r (each c long) of a sequence of 2cP tokens, concatenated. Same meaning of sm_scale,
    log_eps and logit_bound as `megatron_fox.ops.forgetting_attention`, with U and L global.
    cu_seqlens: packed documents of the whole (global) row, batch 1, offsets [0, ..., 2cP]:
    attention and the forget gate restart at each document, across chunk borders too.
    Returns this rank's output [B, 2c, H, D] (differentiable in q, k, v, log_fgate) and, with
    return_stats, a ContextParallelStats.
    """
    sm_scale, logit_bound = check_inputs(q, k, v, log_fgate, sm_scale, log_eps, logit_bound, None)
    if q.shape[1] % 2:
        raise ValueError(f"q: this rank's sequence ({q.shape[1]}) must hold two equal chunks")
    P, r = dist.get_world_size(cp_group), dist.get_rank(cp_group)
    B, T2, H, D = q.shape
    L = T2 * P
    docs = _global_documents(cu_seqlens, B, L, q.device)
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
            live, heads = skip_table(offsets, chunk_sums, delta)
    if docs is not None:  # a chunk pair no document spans is dead
        n = T2 // 2
        de = docs[1]
        live = [[live[i][j] and (i == j or int(de[(j + 1) * n - 1]) > i * n) for j in range(2 * P)]
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
