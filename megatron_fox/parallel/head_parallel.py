"""Head-parallel ("a2a", DeepSpeed-Ulysses style) context parallelism for the FoX op.

Megatron's cp_comm_type "a2a": one all-to-all turns the sequence split (rank r holds chunks
r and 2P-1-r of every head) into a head split (rank r holds the whole sequence of some
heads), the single-GPU op runs on it, and a second all-to-all turns the output back. The
backward runs the same exchanges in reverse. Nothing is approximated: each rank computes
exactly the single-GPU op for its heads.

Why it suits ACP: pruning makes the work per head very unequal (a head with a short memory
costs ~L*W, a slow head ~L^2/2), and the load-balanced sequence layout evens out causal work,
not pruned work. Here heads are dealt to ranks by their estimated pruned cost (largest
first to the least loaded rank), so every rank gets about 1/P of the total. The estimate
uses the mean log forget gate of each head: with a constant gate g a query keeps about
W = delta / g keys (delta the ACP threshold), costing L*W - W^2/2 pairs.
Grouped-query attention: a kv head and its query heads always go to the same rank.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from ..ops import forgetting_attention
from ..ops.forgetting_attn.common import no_data_checks
from ..ops.forgetting_attn.plan import ZERO_LOG_WEIGHT, skips_zero_blocks
from .context_parallel import check_rank_inputs, global_pruning_threshold
from .exchange import index_on_device
from .layout import chunk_ids
from .skipping import AsyncToHost


def assign_heads(costs: list, size: int) -> list:
    """Deal items with the given costs to `size` bins, largest first to the lightest bin
    (ties to the lower index). Returns, per bin, the sorted item indices. Deterministic, so
    every rank computes the same assignment from the same costs."""
    if len(costs) < size:
        raise ValueError(f"cannot split {len(costs)} head groups over {size} ranks")
    order = sorted(range(len(costs)), key=lambda i: (-costs[i], i))
    bins, load = [[] for _ in range(size)], [0.0] * size
    for i in order:
        b = min(range(size), key=lambda j: (load[j], len(bins[j]), j))
        bins[b].append(i)
        load[b] += costs[i]
    return [sorted(b) for b in bins]


@functools.lru_cache(maxsize=256)
def _heads_index(heads: tuple, device: torch.device) -> torch.Tensor:
    return index_on_device(list(heads), device)


def seq_to_heads(x: torch.Tensor, heads_by_rank: list, group) -> torch.Tensor:
    """[B, T, N, D] this rank's two chunks of all N heads -> [B, P*T, n_r, D] the whole
    sequence (natural order) of this rank's heads heads_by_rank[r].

    One gather packs each destination's heads into a flat send buffer, one all-to-all moves
    them, and 2P contiguous copies put the received chunks in sequence order."""
    P, r = dist.get_world_size(group), dist.get_rank(group)
    B, T, N, D = x.shape
    c, sizes = T // 2, [len(h) for h in heads_by_rank]
    n, per = sizes[r], B * T * D  # elements per head of one rank's part
    send = x.new_empty(N * per)
    off = 0
    for hs in heads_by_rank:
        torch.index_select(x, 2, _heads_index(tuple(hs), x.device),
                           out=send[off:off + len(hs) * per].view(B, T, len(hs), D))
        off += len(hs) * per
    recv = x.new_empty(P * n * per)
    dist.all_to_all_single(recv, send, [n * per] * P, [m * per for m in sizes], group=group)
    src = recv.view(P, B, 2, c, n, D)
    out = x.new_empty(B, 2 * P, c, n, D)
    for s in range(P):
        for half, chunk in enumerate(chunk_ids(s, P)):
            out[:, chunk].copy_(src[s, :, half])
    return out.view(B, 2 * P * c, n, D)


def heads_to_seq(y: torch.Tensor, heads_by_rank: list, group) -> torch.Tensor:
    """Inverse of seq_to_heads: [B, P*T, n_r, D] -> [B, T, N, D]."""
    P = dist.get_world_size(group)
    B, L, n, D = y.shape
    c, sizes = L // (2 * P), [len(h) for h in heads_by_rank]
    T, N = 2 * c, sum(sizes)
    per = B * T * D
    chunks = y.view(B, 2 * P, c, n, D)
    send = y.new_empty(P, B, 2, c, n, D)
    for s in range(P):
        for half, chunk in enumerate(chunk_ids(s, P)):
            send[s, :, half].copy_(chunks[:, chunk])
    recv = y.new_empty(N * per)
    dist.all_to_all_single(recv, send.view(-1), [m * per for m in sizes], [n * per] * P, group=group)
    out = y.new_empty(B, T, N, D)
    off = 0
    for hs in heads_by_rank:
        out.index_copy_(2, _heads_index(tuple(hs), y.device), recv[off:off + len(hs) * per].view(B, T, len(hs), D))
        off += len(hs) * per
    return out


class _Exchange(torch.autograd.Function):
    """seq_to_heads (to_heads=True) or heads_to_seq; the backward runs the other one."""

    @staticmethod
    def forward(ctx, x, to_heads, heads_by_rank, group):
        ctx.to_heads, ctx.heads_by_rank, ctx.group = to_heads, heads_by_rank, group
        return (seq_to_heads if to_heads else heads_to_seq)(x, heads_by_rank, group)

    @staticmethod
    def backward(ctx, grad):
        inverse = heads_to_seq if ctx.to_heads else seq_to_heads
        return inverse(grad.contiguous(), ctx.heads_by_rank, ctx.group), None, None, None


def estimated_head_costs(q, k, log_fgate, *, group, sm_scale, log_eps, logit_bound) -> torch.Tensor:
    """Estimated pruned attention pairs per query head, summed over the batch ([H] float64 on
    the device, the same on every rank). One all-reduce of [B, H] gate sums (plus two of
    [B, H] norms when U comes from the data); no host wait."""
    P = dist.get_world_size(group)
    T = q.shape[1]
    L = T * P
    with torch.no_grad():
        mean_gate = log_fgate.float().sum(1)
        dist.all_reduce(mean_gate, group=group)
        mean_gate /= L
        delta = global_pruning_threshold(q, k, sm_scale, log_eps, logit_bound, L, group)
        return head_costs(mean_gate, delta, L)


def head_costs(mean_log_fgate: torch.Tensor, delta: torch.Tensor, L: int) -> torch.Tensor:
    """Estimated pruned pairs per head, [B, H] mean log f and ACP threshold -> [H] float64:
    with a constant gate g a query keeps W = delta / g keys (at most L), L*W - W^2/2 pairs."""
    window = (delta / mean_log_fgate.clamp(max=-1e-30)).clamp(1.0, float(L))
    return (L * window - 0.5 * window * window).sum(0).double()


class HeadCostMemory:
    """Head costs carried from one call of a layer to its next, so that dealing heads needs
    no host wait: each call starts copying its costs to pinned host memory and deals by the
    previous call's (already on the host). Any dealing is exact; only balance depends on it,
    and gates change little from one step to the next. The first call waits for its own."""

    def __init__(self):
        self._pending = None  # the last call's costs on their way to the host

    def costs_for_dealing(self, costs: torch.Tensor) -> list:
        previous, self._pending = self._pending, AsyncToHost([costs])
        # the previous call's copy is long done; only the first call waits for its own
        return (previous or self._pending).get()[0]


@dataclass
class HeadParallelStats:
    """What one call of the head-parallel op did on this rank.

    heads: the query heads this rank computed. skipped_fraction: this rank's share of the
    fraction of causal attention FLOPs ACP skipped (sum over its heads / H * P), so the mean
    over the group's ranks is the fraction over all heads. bytes_sent: bytes this rank sent
    in the forward's two all-to-alls (the backward sends as many).
    """

    heads: list
    skipped_fraction: torch.Tensor
    bytes_sent: int


def head_parallel_forgetting_attention(
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
    balance: bool = True,
    cost_memory: Optional[HeadCostMemory] = None,
    backward_pruning: str = "bound",
):
    """FoX attention over a sequence split across cp_group, computed head-parallel.

    Same tensors and meaning as `context_parallel_forgetting_attention`: q [B, 2c, H, D],
    k/v [B, 2c, Hkv, D], log_fgate [B, 2c, H] hold this rank's chunks r and 2P-1-r; cu_seqlens
    the global document offsets (of the batch's whole rows in batch-major order, each row
    starting a document; the op takes the rows with their documents, as on one GPU). Needs
    Hkv >= P. balance=False deals kv-head groups in equal contiguous runs (plain Ulysses)
    instead of by estimated ACP cost (exact FoX: by the blocks it keeps above float32's zero,
    see `set_zero_block_skipping`). cost_memory (one per layer) deals by the previous call's
    costs, so the call does not wait for the GPU. Returns this rank's output [B, 2c, H, D]
    and, with return_stats, a HeadParallelStats. backward_pruning
    as in `forgetting_attention` (each rank runs the op on whole sequences of its heads).
    """
    P = dist.get_world_size(cp_group)
    B, T2, H, D = q.shape
    sm_scale, logit_bound, L = check_rank_inputs(q, k, v, log_fgate, sm_scale, log_eps, logit_bound, cu_seqlens,
                                                 cp_group)
    Hkv = k.shape[2]
    if Hkv < P:
        raise ValueError(f"k: {Hkv} kv heads cannot be split over {P} context-parallel ranks "
                         "(cp_comm_type 'a2a' needs kv heads >= context_parallel_size; use 'p2p')")
    G = H // Hkv
    cost_eps = log_eps
    if skips_zero_blocks(log_eps):  # exact FoX skips blocks below float32's zero: ACP's model at delta = -2U - 110
        cost_eps = ZERO_LOG_WEIGHT + math.log(L)
    if balance and cost_eps is not None:
        costs = estimated_head_costs(q, k, log_fgate, group=cp_group, sm_scale=sm_scale, log_eps=cost_eps,
                                     logit_bound=logit_bound)
        per_head = costs.tolist() if cost_memory is None else cost_memory.costs_for_dealing(costs)
        groups = assign_heads([sum(per_head[g * G:(g + 1) * G]) for g in range(Hkv)], P)
    else:
        groups = [list(range(Hkv))[i * Hkv // P:(i + 1) * Hkv // P] for i in range(P)]
    q_heads = [[g * G + j for g in gs for j in range(G)] for gs in groups]
    r = dist.get_rank(cp_group)
    mine = q_heads[r]
    qh = _Exchange.apply(q, True, q_heads, cp_group)
    kh = _Exchange.apply(k, True, groups, cp_group)
    vh = _Exchange.apply(v, True, groups, cp_group)
    fh = _Exchange.apply(log_fgate.unsqueeze(-1), True, q_heads, cp_group).squeeze(-1)
    bound = logit_bound
    if isinstance(logit_bound, torch.Tensor):
        bound = logit_bound.to(q.device)[_heads_index(tuple(mine), q.device)]
    # checked above on every rank's part; rows of documents: cu_seqlens over the B * L
    # batch-major tokens, as the op takes them
    with no_data_checks():
        out = forgetting_attention(qh, kh, vh, fh, sm_scale=sm_scale, log_eps=log_eps, logit_bound=bound,
                                   cu_seqlens=cu_seqlens, return_stats=return_stats, backward_pruning=backward_pruning)
    if return_stats:
        out, op_stats = out
    o = _Exchange.apply(out, False, q_heads, cp_group)
    if not return_stats:
        return o
    # inputs of the other ranks' heads go out (q, k, v, one float of log f per head), and
    # the outputs of our heads at the other ranks' positions come back to them
    others_q, others_kv = H - len(mine), Hkv - len(groups[r])
    nbytes = B * T2 * (others_q * (D * q.element_size() + 4) + 2 * others_kv * D * k.element_size())
    nbytes += B * (L - T2) * len(mine) * D * out.element_size()
    fraction = op_stats.skipped_fraction_per_head.sum() * (P / H)
    return o, HeadParallelStats(heads=mine, skipped_fraction=fraction, bytes_sent=nbytes)
