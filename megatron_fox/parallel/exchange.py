"""Point-to-point exchange of the ring: which blocks, halves and heads each rank needs, and
the sends/receives of K, V, prefix sums and their gradients (only the live heads travel)."""

from __future__ import annotations

import torch
import torch.distributed as dist

from .layout import chunk_ids


def all_gather_tensor(x: torch.Tensor, group) -> torch.Tensor:
    """x [...] -> [P, ...]: every rank's x over the group, in rank order (no autograd)."""
    size = dist.get_world_size(group)
    out = torch.empty(size * x.numel(), dtype=x.dtype, device=x.device)
    dist.all_gather_into_tensor(out, x.contiguous().view(-1), group=group)
    return out.view(size, *x.shape)


class _AllGather(torch.autograd.Function):
    """[...] -> [P, ...] over the group; backward sums the gradient over ranks, keeps ours."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return all_gather_tensor(x, group)

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
    """doc_start / doc_end arguments of a block (relative to its key / query chunk), [B, n]
    each (a map per batch row), or {};
    made once per chunk pair and kept in the plan, so the backward reuses the forward's."""
    docs = plan["docs"]
    if docs is None:
        return {}
    P, n = plan["size"], plan["chunk"]
    qc, kc = chunk_ids(q_rank, P)[q_half], chunk_ids(kv_rank, P)[kv_half]
    made = plan.setdefault("block_docs", {})
    if (qc, kc) not in made:
        ds, de = docs
        made[qc, kc] = {"doc_start": (ds[:, qc * n:(qc + 1) * n] - kc * n).clamp(0, n).to(torch.int32).contiguous(),
                        "doc_end": (de[:, kc * n:(kc + 1) * n] - qc * n).clamp(0, n).to(torch.int32).contiguous()}
    return made[qc, kc]


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


def head_indices(plan, device) -> None:
    """Put every head selection this rank's ring uses on the device now, in plan["index"]
    (copies from pinned memory, queued without stalling the host)."""
    P, r = plan["size"], plan["rank"]
    for s in range(1, P):
        for q_rank, kv_rank in (((r + s) % P, r), (r, (r - s) % P)):
            for h in (0, 1):
                sel = _heads_needed(q_rank, kv_rank, h, plan)
                if sel is not None:
                    _index(plan, sel, device)


def index_on_device(values: list, device, read_on=None) -> torch.Tensor:
    """An index list on the device without a stream sync (a copy from pageable host memory
    waits for the stream; from pinned memory it is queued like a kernel). read_on: another
    stream that will read it (the allocator must not reuse it before that stream is done)."""
    t = torch.tensor(values, dtype=torch.long)
    if device.type != "cuda":
        return t
    out = t.pin_memory().to(device, non_blocking=True)
    if read_on is not None:
        out.record_stream(read_on)
    return out


def _index(plan, sel, device):
    key = (tuple(sel[0]), tuple(sel[1]))
    cache = plan.setdefault("index", {})
    if key not in cache:
        cache[key] = tuple(index_on_device(i, device, plan.get("compute_stream")) for i in sel)
    return cache[key]


def _select(tensors, sel, plan, device):
    """The selected heads of (k, v, c) as contiguous tensors (k, v: dim 2; c: dim 1)."""
    if sel is None:
        return [t.contiguous() for t in tensors]
    kv_idx, q_idx = _index(plan, sel, device)
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


class Transfer:
    """The point-to-point ops of one ring step, posted as one batch (NCCL groups the sends
    and receives, so a pair of ranks that both send and receive cannot deadlock); compute
    issued after posting overlaps the transfer. wait() returns what `finish` makes of the
    received buffers; the current stream waits for the transfer, the host does not (NCCL)."""

    def __init__(self, ops, finish, keep, received=()):
        self._reqs = dist.batch_isend_irecv(ops) if ops else []
        self._finish, self._keep = finish, keep  # keep: send buffers alive until done
        self._received = received

    def wait(self):
        for req in self._reqs:
            req.wait()
        for t in self._received:  # allocated on the stream that posted; read on this one
            if t.is_cuda:
                t.record_stream(torch.cuda.current_stream(t.device))
        # drop the finished works now: a gloo work still referenced at interpreter exit
        # frees its tensors after Python is gone (an abort at teardown)
        self._reqs = []
        self._keep = self._received = None
        return self._finish()


_COMM_STREAMS: dict = {}


def comm_stream(device: torch.device):
    """The side stream K/V transfers are posted from (one per device), or None off CUDA. NCCL
    makes a transfer wait for the work queued on the stream it is posted from; posted from
    here, after an event of the compute stream, it waits only for what that event covers."""
    if device.type != "cuda":
        return None
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _COMM_STREAMS:
        _COMM_STREAMS[idx] = torch.cuda.Stream(device=idx)
    return _COMM_STREAMS[idx]


def _post(sends, wanted, src_rank, plan):
    """P2P ops sending `sends` [(tensor, dst_rank)] and receiving, from src_rank, each wanted
    half's selected heads: wanted [(half, sel, like, dtypes)] -> (ops, [(half, sel, buffers)])."""
    ops = [dist.P2POp(dist.isend, t, plan["ranks"][dst], group=plan["group"]) for t, dst in sends]
    pending = []
    for h, sel, like, dtypes in wanted:
        bufs = [torch.empty(shp, dtype=dt, device=like[0].device) for shp, dt in zip(_wire_shapes(like, sel), dtypes)]
        ops += [dist.P2POp(dist.irecv, b, plan["ranks"][src_rank], group=plan["group"]) for b in bufs]
        pending.append((h, sel, bufs))
    return ops, pending


def _full_heads(bufs, like, sel, plan, dtypes, fills):
    """Received head subsets back at full head count (other heads set to `fills`)."""
    if sel is None:
        return list(bufs)
    kv_idx, q_idx = _index(plan, sel, like[0].device)
    dims, idx = (2, 2, 1), (kv_idx, kv_idx, q_idx)
    return [torch.full(t.shape, fill, dtype=dt, device=t.device).index_copy_(d, i, b)
            for t, b, dt, fill, d, i in zip(like, bufs, dtypes, fills, dims, idx)]


def start_kv_exchange(own, s, plan, stats=None) -> Transfer:
    """Step s: send our needed halves (needed heads only) to (r+s), receive (r-s)'s.
    wait() gives {half: (k, v, c)} at full head count; heads not sent get c = +1e30, so
    every pair of theirs is pruned (after centering, c_q - c_k = -1e30) and never read.
    With stats, counts the bytes sent and those a causal ring would send."""
    P, r = plan["size"], plan["rank"]
    dst, src = (r + s) % P, (r - s) % P
    dev = own[0][0].device
    sends = []
    for h in _halves_needed(dst, r, P, plan["live"]):
        parts = _select(own[h], _heads_needed(dst, r, h, plan), plan, dev)
        sends += [(t, dst) for t in parts]
        if stats is not None:
            stats.bytes_sent += _nbytes(parts)
    if stats is not None:
        stats.bytes_causal_ring += len(_halves_needed(dst, r, P, plan["causal"])) * _nbytes(own[0])
    wanted = [(h, _heads_needed(r, src, h, plan), own[h], [t.dtype for t in own[h]])
              for h in _halves_needed(r, src, P, plan["live"])]
    ops, pending = _post(sends, wanted, src, plan)
    if stats is not None:
        stats.bytes_received_by_step.append(sum(_nbytes(bufs) for _, _, bufs in pending))

    def finish():
        return {h: tuple(_full_heads(bufs, own[h], sel, plan, [t.dtype for t in own[h]], (0.0, 0.0, 1e30)))
                for h, sel, bufs in pending}
    return Transfer(ops, finish, sends, [b for _, _, bufs in pending for b in bufs])


def start_grad_exchange(grads, own, s, plan) -> Transfer:
    """Send the key-side gradients of (r-s)'s halves back to it (needed heads only);
    wait() gives ours from (r+s) [half 0, half 1], zero for heads not sent, None for a
    half nobody used. dK and dV travel in K's and V's dtype (half the bytes of float32
    under bf16; the owner sums the partials in float32), the prefix-sum gradient in float32."""
    P, r = plan["size"], plan["rank"]
    src, dst = (r - s) % P, (r + s) % P
    dev = own[0][0].device
    wire = [own[0][0].dtype, own[0][1].dtype, torch.float32]
    sends = []
    for h in _halves_needed(r, src, P, plan["live"]):
        parts = _select(grads[h], _heads_needed(r, src, h, plan), plan, dev)
        sends += [(t.to(dt), src) for t, dt in zip(parts, wire)]
    wanted = [(h, _heads_needed(dst, r, h, plan), own[h], wire) for h in _halves_needed(dst, r, P, plan["live"])]
    ops, pending = _post(sends, wanted, dst, plan)

    def finish():
        back = [None, None]
        for h, sel, bufs in pending:
            back[h] = _full_heads(bufs, own[h], sel, plan, wire, (0.0, 0.0, 0.0))
        return back
    return Transfer(ops, finish, sends)
