"""A training checkpoint of any TP/PP layout as one full (TP = PP = 1) state dict, the form
`--pretrained-checkpoint` and `tools/convert_checkpoint.py to-public` take.

Three formats, as `megatron_fox.train --save` writes them: on CUDA Megatron-Core's
`dist_checkpointing` (resharded by its own loader into a TP = PP = 1 model: see
`tools/convert_checkpoint.py from-megatron`); on CPU one `mp_rank_TT_PPP.pt` file per
model-parallel rank; with `--deepspeed` DeepSpeed's `mp_rank_TT_model_states.pt` per
tensor-parallel rank (its "module"; ZeRO-3 keeps none there). The last two are merged here
by the layout rules of `partition.py`.
"""

from __future__ import annotations

import os
import re

import torch

from .partition import merge_state_dicts

_RANK_FILE = re.compile(r"^mp_rank_(\d+)_(\d+)\.pt$")
_DEEPSPEED_FILE = re.compile(r"^mp_rank_(\d+)_model_states\.pt$")  # no pipeline stages with --deepspeed


def rank_files(path: str) -> dict:
    """{(tp_rank, pp_rank): file} of the per-rank files in a checkpoint iteration folder ({}
    for a dist_checkpointing folder)."""
    out = {}
    for name in os.listdir(path):
        m, ds = _RANK_FILE.match(name), _DEEPSPEED_FILE.match(name)
        if m:
            out[(int(m.group(1)), int(m.group(2)))] = os.path.join(path, name)
        elif ds:
            out[(int(ds.group(1)), 0)] = os.path.join(path, name)
    return out


def _model_state(saved: dict, path: str) -> dict:
    """The model's state dict in one rank file: ours ("model") or DeepSpeed's ("module")."""
    state = saved.get("model", saved.get("module"))
    if state is None or any(t.numel() == 0 for t in state.values() if torch.is_tensor(t)):
        raise ValueError(f"input: {path} holds no whole weights (a ZeRO-3 checkpoint keeps them partitioned: "
                         f"gather them with DeepSpeed's zero_to_fp32.py)")
    return state


def merge_rank_files(path: str, num_layers: int) -> dict:
    """The full state dict of the per-rank files in `path` (an `iter_NNNNNNN` folder);
    num_layers: the model's layers (to renumber the pipeline stages')."""
    files = rank_files(path)
    if not files:
        raise FileNotFoundError(f"input: no mp_rank_*.pt files in {path}")
    saved = {rank: torch.load(f, map_location="cpu", weights_only=False) for rank, f in files.items()}
    # the layout each file records (older files do not: then the highest ranks present)
    layout = next(iter(saved.values())).get("layout") or {"tp": 1 + max(tp for tp, _ in files),
                                                          "pp": 1 + max(pp for _, pp in files)}
    tp_size, pp_size = layout["tp"], layout["pp"]
    missing = [(tp, pp) for tp in range(tp_size) for pp in range(pp_size) if (tp, pp) not in files]
    if missing or len(files) != tp_size * pp_size:
        raise ValueError(f"input: {path} holds the files of model-parallel ranks (tp, pp) {sorted(files)}, "
                         f"its layout TP={tp_size} x PP={pp_size} needs also {missing}")
    if num_layers % pp_size:
        raise ValueError(f"num_layers: {num_layers} not divisible by the checkpoint's {pp_size} pipeline stages")
    return merge_state_dicts({rank: _model_state(s, path) for rank, s in saved.items()}, num_layers, tp_size, pp_size)
