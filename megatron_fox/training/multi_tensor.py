"""Stand-ins for Apex's multi-tensor kernels built on torch's `_foreach` ops.

Without Apex or Transformer Engine, megatron-core falls back to `local_multi_tensor_l2_norm`,
which turns every gradient's norm into a Python float (one device sync per parameter tensor:
123 a step for the 125M model, measured on an H200), and to `local_multi_tensor_scale`, one
multiply and one copy kernel per tensor. The versions here keep the norm on the device and
scale all tensors in a few fused launches; `install()` swaps them in only where megatron-core
took its local fallback, so Apex or TE, when present, stay in charge.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch


def foreach_l2_norm(chunk_size: int, noop_flag: torch.Tensor, tensor_lists: List[List[torch.Tensor]],
                    per_tensor: bool, *args) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """amp_C.multi_tensor_l2norm's contract: (total L2 norm [1] float32 on the tensors' device,
    per-tensor norms [n] float32 if `per_tensor` else None) of tensor_lists[0]. No host sync."""
    tensors = tensor_lists[0]
    if not tensors:
        raise ValueError("tensor_lists[0] is empty: nothing to take the norm of")
    norms = torch.stack([n.float() for n in torch._foreach_norm(tensors, 2.0)])
    total = torch.linalg.vector_norm(norms).reshape(1)
    return total, (norms if per_tensor else None)


def foreach_scale(chunk_size: int, noop_flag: torch.Tensor, tensor_lists: List[List[torch.Tensor]],
                  scale: float) -> None:
    """amp_C.multi_tensor_scale's contract: tensor_lists[1][i] = tensor_lists[0][i] * scale
    (in place when the two lists hold the same tensors)."""
    src, dst = tensor_lists[0], tensor_lists[1]
    if len(src) != len(dst):
        raise ValueError(f"tensor_lists: {len(src)} sources for {len(dst)} destinations")
    if all(s is d for s, d in zip(src, dst)):
        torch._foreach_mul_(dst, scale)
    else:
        torch._foreach_copy_(dst, torch._foreach_mul(src, scale) if scale != 1.0 else src)


def install() -> List[str]:
    """Replace megatron-core's local fallbacks (clip_grads.l2_norm_impl and the
    multi_tensor_scale_impl of clip_grads and optimizer) by the versions above. Returns the
    names replaced: none when Apex or TE provided the kernels."""
    from megatron.core import utils
    from megatron.core.optimizer import clip_grads, optimizer

    swaps = [(clip_grads, "l2_norm_impl", getattr(utils, "local_multi_tensor_l2_norm", None), foreach_l2_norm),
             (clip_grads, "multi_tensor_scale_impl", getattr(utils, "local_multi_tensor_scale", None), foreach_scale),
             (optimizer, "multi_tensor_scale_impl", getattr(utils, "local_multi_tensor_scale", None), foreach_scale)]
    done = []
    for module, name, fallback, ours in swaps:
        if fallback is not None and getattr(module, name, None) is fallback:
            setattr(module, name, ours)
            done.append(f"{module.__name__}.{name}")
    return done
