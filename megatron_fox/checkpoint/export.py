"""A training checkpoint of any TP/PP/EP layout as one full (TP = PP = EP = 1) state dict,
the form `--pretrained-checkpoint` and `tools/convert_checkpoint.py to-public` take.

Three formats, as `megatron_fox.train --save` writes them: on CUDA Megatron-Core's
`dist_checkpointing` (resharded by its own loader into a TP = PP = 1 model: see
`tools/convert_checkpoint.py from-megatron`); on CPU one `mp_rank_TT_PPP.pt` file per
model-parallel rank (`mp_rank_TT_PPP_EEE.pt` with expert parallelism); with `--deepspeed`
DeepSpeed's `mp_rank_TT_model_states.pt` per tensor-parallel rank (its "module"), or under
ZeRO-3, which keeps no whole weights there, `zero_pp_rank_D_mp_rank_TT_*_states.pt` per
data- and tensor-parallel rank (gathered over the data-parallel partitions by DeepSpeed's
own zero_to_fp32). The last two are merged here by the layout rules of `partition.py`.
"""

from __future__ import annotations

import os
import re
import tempfile

import torch

from .partition import merge_expert_shards, merge_state_dicts

_RANK_FILE = re.compile(r"^mp_rank_(\d+)_(\d+)(?:_(\d+))?\.pt$")
_DEEPSPEED_FILE = re.compile(r"^mp_rank_(\d+)_model_states\.pt$")  # no pipeline stages with --deepspeed
_ZERO3_FILE = re.compile(r"^zero_pp_rank_0_mp_rank_(\d+)_model_states\.pt$")  # data-parallel rank 0's


def rank_files(path: str) -> dict:
    """{(tp_rank, pp_rank): file} of the per-rank files in a checkpoint iteration folder ({}
    for a dist_checkpointing folder); with expert parallelism {(tp_rank, pp_rank, ep_rank): file}."""
    out = {}
    for name in os.listdir(path):
        m, ds = _RANK_FILE.match(name), _DEEPSPEED_FILE.match(name) or _ZERO3_FILE.match(name)
        if m:
            ep = () if m.group(3) is None else (int(m.group(3)),)
            out[(int(m.group(1)), int(m.group(2)), *ep)] = os.path.join(path, name)
        elif ds:
            out[(int(ds.group(1)), 0)] = os.path.join(path, name)
    return out


def gather_zero3(path: str, tp_ranks: list) -> dict:
    """{(tp_rank, 0): float32 state dict of that tensor-parallel shard} of a ZeRO-3
    checkpoint folder, each gathered over its data-parallel partitions by DeepSpeed's
    zero_to_fp32, which reads tensor-parallel rank 00 only: each rank's files are linked
    into a folder of their own under that rank's name."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    out = {}
    with tempfile.TemporaryDirectory(prefix="zero3_") as tmp:
        for tp in tp_ranks:
            # with --bf16 DeepSpeed names the optimizer files bf16_zero_pp_rank_...
            own = re.compile(rf"^((?:bf16_)?zero_pp_rank_\d+_mp_rank_){tp:02d}(_(model|optim)_states\.pt)$")
            folder = os.path.join(tmp, f"tp{tp}", "tag")
            os.makedirs(folder)
            for name in os.listdir(path):
                m = own.match(name)
                if m:
                    os.symlink(os.path.join(path, name), os.path.join(folder, f"{m.group(1)}00{m.group(2)}"))
            out[(tp, 0)] = get_fp32_state_dict_from_zero_checkpoint(os.path.dirname(folder), tag="tag")
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
    num_layers: the model's layers (to renumber the pipeline stages' layers, by the split
    the files record)."""
    files = rank_files(path)
    if not files:
        raise FileNotFoundError(f"input: no mp_rank_*.pt files in {path}")
    if any(_ZERO3_FILE.match(os.path.basename(f)) for f in files.values()):
        tp_ranks = sorted(tp for tp, _ in files)
        if tp_ranks != list(range(len(tp_ranks))):
            raise ValueError(f"input: {path} holds the ZeRO-3 files of tensor-parallel ranks {tp_ranks} only")
        return merge_state_dicts(gather_zero3(path, tp_ranks), num_layers, len(tp_ranks), 1)
    saved = {rank: torch.load(f, map_location="cpu", weights_only=False) for rank, f in files.items()}
    # the layout each file records (older files do not: then the highest ranks present)
    layout = next(iter(saved.values())).get("layout") or {"tp": 1 + max(r[0] for r in files),
                                                          "pp": 1 + max(r[1] for r in files)}
    tp_size, pp_size, ep_size = layout["tp"], layout["pp"], layout.get("ep", 1)
    ep_ranks = [(e,) for e in range(ep_size)] if ep_size > 1 else [()]
    want = [(tp, pp, *e) for tp in range(tp_size) for pp in range(pp_size) for e in ep_ranks]
    missing = [r for r in want if r not in files]
    if missing or len(files) != len(want):
        raise ValueError(f"input: {path} holds the files of model-parallel ranks (tp, pp{', ep' * (ep_size > 1)}) "
                         f"{sorted(files)}, its layout TP={tp_size} x PP={pp_size} x EP={ep_size} needs also {missing}")
    stages = layout.get("stages")  # files before the uneven split was built: an even one
    if stages is None and num_layers % pp_size:
        raise ValueError(f"num_layers: {num_layers} not divisible by the checkpoint's {pp_size} pipeline stages")
    if stages is not None and stages[-1][1] != num_layers:
        raise ValueError(f"num_layers: {num_layers}, but the checkpoint's pipeline stages hold {stages[-1][1]} layers")
    shards = {(tp, pp): merge_expert_shards([_model_state(saved[(tp, pp, *e)], path) for e in ep_ranks])
              for tp in range(tp_size) for pp in range(pp_size)}
    return merge_state_dicts(shards, num_layers, tp_size, pp_size, stages)
