"""Megatron-LM's --check-weight-hash-across-dp-replicas-interval: every N steps, each rank
hashes its weights and the ranks that should hold the same ones compare (a silent data
corruption or a missed gradient reduction shows up as a mismatch, and the run stops).

Dense weights are compared across the data- and context-parallel ranks, the experts split
over expert-parallel ranks across the ranks holding the same experts (expert data parallel).
"""

from __future__ import annotations

import hashlib

import torch
import torch.distributed as dist

from .step import is_split_expert


def weight_hashes(named_params) -> tuple[list[str], torch.Tensor]:
    """(names, SHA-256 of each parameter's bytes as uint8 [n, 32]) of (name, parameter) pairs,
    e.g. a module's named_parameters(), in their order."""
    names, rows = [], []
    for name, p in named_params:
        data = p.detach().contiguous().cpu().reshape(-1).view(torch.uint8)
        rows.append(torch.frombuffer(bytearray(hashlib.sha256(data.numpy().tobytes()).digest()), dtype=torch.uint8))
        names.append(name)
    return names, torch.stack(rows) if rows else torch.zeros(0, 32, dtype=torch.uint8)


def mismatches(names: list[str], hashes_by_rank: list[torch.Tensor]) -> list[str]:
    """The names whose hash differs between any two of the ranks' [n, 32] tables."""
    first = hashes_by_rank[0]
    return [name for i, name in enumerate(names) if any(not torch.equal(h[i], first[i]) for h in hashes_by_rank[1:])]


def check_weight_replicas(model: torch.nn.Module, step: int, device: torch.device) -> None:
    """Raise RuntimeError naming the parameters whose bytes differ between replicas."""
    from megatron.core import parallel_state as ps

    params = dict(model.named_parameters())
    bad = []
    for split, group in ((False, ps.get_data_parallel_group(with_context_parallel=True)),
                         (True, ps.get_expert_data_parallel_group() if any(map(is_split_expert, params.values()))
                          else None)):
        if group is None or dist.get_world_size(group) == 1:
            continue
        names, table = weight_hashes((n, p) for n, p in params.items() if is_split_expert(p) == split)
        table = table.to(device)
        gathered = [torch.empty_like(table) for _ in range(dist.get_world_size(group))]
        dist.all_gather(gathered, table, group=group)
        bad += mismatches(names, [g.cpu() for g in gathered])
    if bad:
        raise RuntimeError(f"step {step}: weights differ between data-parallel replicas "
                           f"(--check-weight-hash-across-dp-replicas-interval): {', '.join(bad[:6])}"
                           f"{' ...' if len(bad) > 6 else ''}")
