"""Kernel tiles per head_dim and device, and how tiles are read (TMA descriptors or pointers)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import torch


@dataclass(frozen=True)
class Tile:
    """A kernel's tile shape and launch parameters; tma: load q/k/v/dO tiles through TMA
    descriptors on GPUs that have them (Hopper and newer)."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    tma: bool = False


@dataclass(frozen=True)
class KernelConfig:
    """Tiles of the three kernels: forward, key-major backward (dK/dV), query-major backward (dQ).
    Every gradient is deterministic (no atomics)."""

    fwd: Tile
    dkdv: Tile
    dq: Tile


# Tuned on an H100 (tools/bench_attention.py --sweep); see docs/benchmarks.md and docs/kernel_notes.md
# (step 18: the dK/dV tile at head_dim 128). 16-bit inputs.
# TMA loads pay off in the forward and dQ kernels; the dK/dV kernel is faster without.
_GPU_CONFIGS = {
    64: KernelConfig(fwd=Tile(128, 64, 4, 3, tma=True), dkdv=Tile(64, 64, 4, 2), dq=Tile(64, 64, 4, 3, tma=True)),
    128: KernelConfig(fwd=Tile(128, 128, 8, 3, tma=True), dkdv=Tile(64, 64, 4, 2), dq=Tile(128, 64, 8, 3, tma=True)),
}
# float32 tiles take twice the shared memory: smaller tiles, two stages (fits 227 KB at d = 128).
_GPU_FP32_CONFIG = KernelConfig(fwd=Tile(64, 64, 4, 2), dkdv=Tile(32, 64, 4, 2), dq=Tile(64, 32, 4, 2))
# Small tiles for the Triton interpreter (CPU tests): several blocks at tiny lengths.
_INTERPRET_CONFIG = KernelConfig(fwd=Tile(16, 16, 1, 1), dkdv=Tile(16, 32, 1, 1), dq=Tile(32, 16, 1, 1))
_override: Optional[KernelConfig] = None


def set_kernel_config(config: Optional[KernelConfig]) -> None:
    """Force the tiles of every kernel (None: back to the per-head_dim defaults)."""
    global _override
    _override = config


def kernel_config(head_dim: int, device: torch.device, dtype: torch.dtype = torch.bfloat16) -> KernelConfig:
    """Tiles used for this head_dim and input dtype on this device."""
    if _override is not None:
        return _override
    if device.type != "cuda":
        return _INTERPRET_CONFIG
    if dtype == torch.float32:
        return _GPU_FP32_CONFIG
    return _GPU_CONFIGS[64 if head_dim <= 64 else 128]


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# TMA (tensor-memory-accelerator) loads of the q/k/v/dO tiles: where the kernel's Tile asks
# for them, on Hopper and newer GPUs; MEGATRON_FOX_TMA=0 turns them off everywhere, =1 forces
# them for every kernel (also under the interpreter).
_TMA_ENV = os.environ.get("MEGATRON_FOX_TMA", "")
_tma_override: Optional[bool] = None if _TMA_ENV == "" else _TMA_ENV == "1"


def set_tma(enabled: Optional[bool]) -> None:
    """Force TMA tile loads on (True) or off (False) in every kernel; None: as the tiles say."""
    global _tma_override
    _tma_override = enabled


def _tma_possible(*tensors) -> bool:
    """A 4-d descriptor needs a 16-byte aligned base and 16-byte multiples as strides."""
    for t in tensors:
        size = t.element_size()
        if t.data_ptr() % 16 or any((st * size) % 16 for st in t.stride()[:-1]) or t.stride(-1) != 1:
            return False
    return True


def _use_tma(tile: Tile, *tensors) -> bool:
    if _tma_override is not None:
        return _tma_override and _tma_possible(*tensors)
    if not tile.tma or _interpreting() or not tensors[0].is_cuda:
        return False
    return torch.cuda.get_device_capability(tensors[0].device)[0] >= 9 and _tma_possible(*tensors)


def _tiles(tma: bool, *pairs):
    """(tensor, rows per tile) -> the kernel argument: a [1, rows, 1, D] descriptor or the tensor."""
    if not tma:
        return [t for t, _ in pairs]
    from triton.tools.tensor_descriptor import TensorDescriptor

    return [TensorDescriptor(t, list(t.shape), list(t.stride()), [1, rows, 1, t.shape[-1]]) for t, rows in pairs]


def _prefix_source(tma: bool, c, block: int):
    """Prefix sums [B, H, T] (contiguous float32) as the kernels read them: with TMA a
    [B*H, T] descriptor with [1, block] blocks, else the tensor. TMA wants a 16-byte
    aligned base and row stride: where T is not a multiple of 4 (or the view is
    misaligned) the rows go to a padded copy (B*H*T floats, negligible next to attention)."""
    if not tma:
        return c
    from triton.tools.tensor_descriptor import TensorDescriptor

    rows = _prefix_rows(c)
    return TensorDescriptor(rows, list(rows.shape), [rows.stride(0), 1], [1, block])


def _prefix_rows(c):
    """[B, H, T] -> [B*H, T] view with a 16-byte aligned base and row stride (TMA's terms)."""
    rows = c.reshape(-1, c.shape[-1])
    T = rows.shape[1]
    if T % 4 or rows.data_ptr() % 16:
        padded = torch.zeros(rows.shape[0], -(-T // 4) * 4, dtype=rows.dtype, device=rows.device)
        padded[:, :T] = rows
        rows = padded[:, :T]
    return rows


def _strides(t):
    return t.stride(0), t.stride(1), t.stride(2)


def _last_dim_contiguous(t):
    return t if t.stride(-1) == 1 else t.contiguous()
