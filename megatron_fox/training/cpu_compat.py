"""CPU stand-in for the CUDA device that some Megatron-Core collectives allocate on.

Megatron-Core's sequence-parallel all-gather / reduce-scatter (tensor_parallel.mappings,
tensor_parallel.layers) and its global memory buffer allocate their outputs with
``device=torch.cuda.current_device()``. gloo runs these collectives on CPU tensors, so on
a process without CUDA we answer that call with the CPU device. Megatron's model-parallel
RNG tracker (used around dropout in sequence-parallel regions) stores CUDA generator
states; on CPU its fork() becomes a no-op, so dropout there draws from the CPU generator
(our configs use no dropout), and activation recomputation saves and restores only the
CPU generator. A process with CUDA is left alone unless its run chose the CPU (`--device cpu`
on a GPU machine, where Megatron would otherwise reach for CUDA buffers and an unseeded CUDA
RNG tracker). The rotary embedding's context-parallel slice, which stages two indices in
pinned memory, gets a plain-PyTorch twin.
"""

from __future__ import annotations

import contextlib

import torch


def route_megatron_buffers_to_cpu(force: bool = False) -> bool:
    """On a CUDA-less process, or with force (a run that keeps to the CPU although CUDA is
    there), make torch.cuda.current_device() return the CPU device; beside a GPU also
    torch.cuda.is_available() False and torch.compile off (compiled functions run eagerly).

    Returns True when the stand-in is (now) active.
    """
    beside_gpu = torch.cuda.is_available()
    if beside_gpu and not force:
        return False
    torch.cuda.current_device = lambda: torch.device("cpu")  # type: ignore[assignment]
    if beside_gpu:
        # Beside a GPU the run must look CUDA-less too. torch.compile (megatron-core 0.19's
        # compiled router functions) asked for the properties of the "current" CUDA device,
        # indexed by the CPU device (a TypeError in dynamo, H200; with is_available() false,
        # a ValueError in inductor's cache key, H100): those functions run eagerly here
        torch.cuda.is_available = lambda: False  # type: ignore[assignment]
        import torch._dynamo as dynamo

        dynamo.config.disable = True
    from megatron.core.tensor_parallel import random as mp_random

    tracker = mp_random.get_cuda_rng_tracker()
    tracker.fork = lambda *args, **kwargs: contextlib.nullcontext()
    # activation recomputation (tensor_parallel.checkpoint) saves and restores the CUDA
    # generator's state around the recomputed forward: there is none; the CPU one it keeps
    mp_random._get_cuda_rng_state = lambda *args, **kwargs: None
    mp_random._set_cuda_rng_state = lambda *args, **kwargs: None
    # the rotary embedding's context-parallel slice stages its indices in pinned memory
    from megatron.core.models.common.embeddings import rope_utils, rotary_pos_embedding

    for module in (rope_utils, rotary_pos_embedding):
        if hasattr(module, "get_pos_emb_on_this_cp_rank"):
            module.get_pos_emb_on_this_cp_rank = _pos_emb_on_this_cp_rank
    return True


def _pos_emb_on_this_cp_rank(pos_emb: torch.Tensor, seq_dim: int, cp_group) -> torch.Tensor:
    """This rank's rows of a position embedding in the load-balanced layout: of 2 * CP
    chunks along seq_dim, chunk r and chunk 2 * CP - 1 - r."""
    size, rank = cp_group.size(), cp_group.rank()
    chunks = pos_emb.chunk(2 * size, dim=seq_dim)
    return torch.cat([chunks[rank], chunks[2 * size - 1 - rank]], dim=seq_dim)
