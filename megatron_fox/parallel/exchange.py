"""Point-to-point exchange of the ring: which blocks, halves and heads each rank needs, and
the sends/receives of K, V, prefix sums and their gradients (only the live heads travel)."""

from __future__ import annotations

import torch
import torch.distributed as dist

from .layout import chunk_ids


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


def _receive(bufs_for, src_rank, plan):
    """Post receives from src_rank of each needed half's selected heads.
    bufs_for: [(half, sel, dtypes)] -> (requests, [(half, sel, buffers)])."""
    reqs, pending = [], []
    for h, sel, like, dtypes in bufs_for:
        bufs = [torch.empty(shp, dtype=dt, device=like[0].device) for shp, dt in zip(_wire_shapes(like, sel), dtypes)]
        reqs += [dist.irecv(b, plan["ranks"][src_rank], group=plan["group"]) for b in bufs]
        pending.append((h, sel, bufs))
    return reqs, pending


def _full_heads(bufs, like, sel, dtypes, fills):
    """Received head subsets back at full head count (other heads set to `fills`)."""
    if sel is None:
        return list(bufs)
    kv_idx, q_idx = (torch.tensor(i, device=like[0].device) for i in sel)
    dims, idx = (2, 2, 1), (kv_idx, kv_idx, q_idx)
    return [torch.full(t.shape, fill, dtype=dt, device=t.device).index_copy_(d, i, b)
            for t, b, dt, fill, d, i in zip(like, bufs, dtypes, fills, dims, idx)]


def _exchange_kv(own, s, plan, stats=None):
    """Step s: send our needed halves (needed heads only) to (r+s), receive (r-s)'s.
    Returns {half: (k, v, c)} at full head count; heads not sent get c = +1e30, so every
    pair of theirs is pruned (after centering, c_q - c_k = -1e30) and never read.
    With stats, counts the bytes sent and those a causal ring would send."""
    P, r = plan["size"], plan["rank"]
    dst, src = (r + s) % P, (r - s) % P
    dev = own[0][0].device
    reqs = []
    for h in _halves_needed(dst, r, P, plan["live"]):
        parts = _select(own[h], _heads_needed(dst, r, h, plan), dev)
        reqs += [dist.isend(t, plan["ranks"][dst], group=plan["group"]) for t in parts]
        if stats is not None:
            stats.bytes_sent += _nbytes(parts)
    if stats is not None:
        stats.bytes_causal_ring += len(_halves_needed(dst, r, P, plan["causal"])) * _nbytes(own[0])
    wanted = [(h, _heads_needed(r, src, h, plan), own[h], [t.dtype for t in own[h]])
              for h in _halves_needed(r, src, P, plan["live"])]
    more, pending = _receive(wanted, src, plan)
    for req in reqs + more:
        req.wait()
    return {h: tuple(_full_heads(bufs, own[h], sel, [t.dtype for t in own[h]], (0.0, 0.0, 1e30)))
            for h, sel, bufs in pending}


def _exchange_grads(grads, own, s, plan):
    """Send the key-side gradients of (r-s)'s halves back to it (needed heads only);
    receive ours from (r+s) as float32, zero for heads not sent."""
    P, r = plan["size"], plan["rank"]
    src, dst = (r - s) % P, (r + s) % P
    dev = own[0][0].device
    reqs = []
    for h in _halves_needed(r, src, P, plan["live"]):
        parts = _select(grads[h], _heads_needed(r, src, h, plan), dev)
        reqs += [dist.isend(t, plan["ranks"][src], group=plan["group"]) for t in parts]
    fp32 = [torch.float32] * 3
    wanted = [(h, _heads_needed(dst, r, h, plan), own[h], fp32) for h in _halves_needed(dst, r, P, plan["live"])]
    more, pending = _receive(wanted, dst, plan)
    for req in reqs + more:
        req.wait()
    back = [None, None]
    for h, sel, bufs in pending:
        back[h] = _full_heads(bufs, own[h], sel, fp32, (0.0, 0.0, 0.0))
    return back
