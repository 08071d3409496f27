"""One micro-batch forward (shared by both engines), batches by consumed samples, LR schedule."""

from __future__ import annotations

import functools
import math
from typing import Iterator, Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.packed_seq_params import PackedSeqParams

from .data import cu_seqlens_from_tokens
from .rampup import step_batch


def check_finite(iteration: int, args, loss: float, grad_norm: Optional[float] = None) -> None:
    """--check-for-nan-in-loss-and-grad: a FloatingPointError naming the step and the values
    when the loss or the gradient norm is not finite."""
    if not args.check_for_nan_in_loss_and_grad:
        return
    bad = [f"{name} {value}" for name, value in (("loss", loss), ("gradient norm", grad_norm))
           if value is not None and not math.isfinite(value)]
    if bad:
        raise FloatingPointError(f"step {iteration + 1}: {' and '.join(bad)}")


def _schedule_position(iteration: int, args) -> tuple[float, float]:
    """Where the schedules stand at the start and the end of a step, in steps of
    global_batch_size sequences (with a batch-size ramp-up: the consumed sequences)."""
    if not args.rampup_batch_size:
        return iteration, iteration + 1
    before, batch = step_batch(iteration, args.rampup_batch_size, args.global_batch_size)
    return before / args.global_batch_size, (before + batch) / args.global_batch_size


def lr_at(iteration: int, args, peak: Optional[float] = None, floor: Optional[float] = None) -> float:
    """Linear warmup from lr_warmup_init to args.lr over lr_warmup_iters, then down to min_lr
    by lr_decay_iters in lr_decay_style, as Megatron-LM's schedules: cosine, linear,
    constant, inverse-square-root (lr * sqrt(warmup / step), not below min_lr), WSD (lr until
    the last lr_wsd_decay_iters steps before lr_decay_iters, then lr_wsd_decay_style's
    decay). With a batch-size ramp-up the schedule runs on the consumed sequences, in steps
    of global_batch_size. peak / floor replace lr / min_lr (--decoupled-lr's schedule of the
    embedding and output layers)."""
    peak = args.lr if peak is None else peak
    floor = args.min_lr if floor is None else floor
    t_step, t_end = _schedule_position(iteration, args)
    if args.lr_warmup_iters > 0 and t_step < args.lr_warmup_iters:  # warmup by the sequences consumed at step end
        start = args.lr_warmup_init
        return start + (peak - start) * min(1.0, t_end / args.lr_warmup_iters)
    style = args.lr_decay_style
    if style == "constant":
        return peak
    if style == "inverse-square-root":
        return max(floor, peak * math.sqrt(max(args.lr_warmup_iters, 1) / max(t_step, 1)))
    if style == "WSD":
        anneal_start = args.lr_decay_iters - args.lr_wsd_decay_iters
        t = min(1.0, max(0.0, (t_step - anneal_start) / args.lr_wsd_decay_iters))
        style = args.lr_wsd_decay_style
    else:
        t = min(1.0, (t_step - args.lr_warmup_iters) / max(1, args.lr_decay_iters - args.lr_warmup_iters))
    return floor + (peak - floor) * _decay_coefficient(style, t)


def wd_at(iteration: int, args) -> float:
    """Megatron-LM's weight-decay schedule: from start_weight_decay to end_weight_decay over
    the train_iters steps' sequences, linearly or by a cosine rise
    (start + (end - start) * (1 - cos(pi r)) / 2 at the consumed fraction r), constant
    (weight_decay) otherwise."""
    if args.weight_decay_incr_style == "constant":
        return args.weight_decay
    r = min(1.0, _schedule_position(iteration, args)[0] / max(1, args.train_iters))
    coeff = r if args.weight_decay_incr_style == "linear" else 0.5 * (math.cos(math.pi * (1.0 - r)) + 1.0)
    return args.start_weight_decay + coeff * (args.end_weight_decay - args.start_weight_decay)


def set_lr_and_wd(param_groups, iteration: int, args, wd_mults, decoupled=None) -> float:
    """Set each optimizer group's lr (`lr_at`; a group marked in `decoupled` follows
    decoupled_lr / decoupled_min_lr, Megatron-LM's --decoupled-lr for the embedding and output
    layers) and weight decay (`wd_at` times the group's multiplier: 0 for norms and biases);
    returns the lr of the other groups."""
    lr, wd = lr_at(iteration, args), wd_at(iteration, args)
    decoupled = decoupled or [False] * len(param_groups)
    own_lr = lr_at(iteration, args, args.decoupled_lr, decoupled_min_lr(args)) if any(decoupled) else None
    for group, mult, own in zip(param_groups, wd_mults, decoupled):
        group["lr"] = own_lr if own else lr
        group["weight_decay"] = wd * mult
    return lr


def decoupled_min_lr(args) -> float:
    """The floor of --decoupled-lr's schedule: decoupled_min_lr, else min_lr (Megatron-LM's)."""
    return args.min_lr if args.decoupled_min_lr is None else args.decoupled_min_lr


def _decay_coefficient(style: str, t: float) -> float:
    """The share of (lr - min_lr) left at fraction t in [0, 1] of a decay: 1 at t = 0, 0 at t = 1."""
    if style == "linear":
        return 1.0 - t
    if style == "exponential":  # 0.5^t rescaled from [0.5, 1] to [0, 1]
        return 2.0 * 0.5 ** t - 1.0
    if style == "minus_sqrt":
        return 1.0 - math.sqrt(t)
    return 0.5 * (1.0 + math.cos(math.pi * t))  # cosine


def context_pruning_alpha_at(iteration: int, args) -> float:
    """The sparse sigmoid's alpha at a step: a cosine rise from 1 to fox_context_pruning_alpha
    over fox_context_pruning_alpha_iters steps (default train_iters), then constant."""
    end = args.fox_context_pruning_alpha
    span = args.train_iters if args.fox_context_pruning_alpha_iters is None else args.fox_context_pruning_alpha_iters
    if iteration >= span:
        return end
    return end + (1.0 - end) * 0.5 * (1.0 + math.cos(math.pi * iteration / span))


def set_context_pruning_penalty(model, batch: dict, args, tokens_scale: float) -> None:
    """Before a micro-batch forward: the penalty weight of every layer, lambda / num_layers
    times this micro-batch's tokens times tokens_scale (1 / the global batch's tokens where
    the loss is divided by them before the backward; the loss scale where it is not)."""
    if not args.fox_context_pruning:
        return
    from ..layers.context_pruning import set_context_pruning_state

    tokens = float(batch["loss_mask"].sum())
    set_context_pruning_state(model, penalty_weight=args.fox_context_pruning_lambda / args.num_layers
                              * tokens * tokens_scale)


def set_moe_aux_loss_scale(args, tokens_scale: float, device) -> None:
    """Before a step's backward: the gradient scale of the MoE load-balancing and z-losses.
    Megatron-Core's router (per-token loss mode) weights each micro-batch's aux loss by its
    tokens and expects the gradients divided by the global batch's tokens afterwards, as its
    schedule does; these engines divide the loss instead, by tokens_scale's inverse. A router
    that counts only the tokens on its own TP x CP rank (megatron-core before Megatron-LM's
    PR 5047, e.g. 0.16) gets the missing factor of that group's size here, so the gradient is
    the same for every layout."""
    if args.num_experts is None:
        return
    from megatron.core.transformer.moe.router import MoEAuxLossAutoScaler

    if not _router_counts_tp_cp_tokens():
        tokens_scale *= (parallel_state.get_tensor_model_parallel_world_size()
                         * parallel_state.get_context_parallel_world_size())
    MoEAuxLossAutoScaler.set_loss_scale(torch.tensor(tokens_scale, dtype=torch.float32, device=device))


@functools.cache
def _router_counts_tp_cp_tokens() -> bool:
    """Whether the installed router scales its aux losses by local tokens times the TP x CP
    group's size (the fix of Megatron-LM PR 5047: megatron-core 0.19 has it, 0.16 has not)."""
    import inspect

    import megatron.core
    from megatron.core.transformer.moe.router import TopKRouter
    from packaging.version import Version

    try:
        return "tp_cp_group.size()" in inspect.getsource(TopKRouter.attach_and_log_load_balancing_loss)
    except (OSError, TypeError):  # installed without sources: by the releases seen (0.16 without, 0.19 with)
        return Version(megatron.core.__version__) >= Version("0.19")


def is_split_expert(p: torch.nn.Parameter) -> bool:
    """An expert's weight split over expert-parallel ranks (Megatron-Core marks it
    allreduce=False: its gradient is summed over the ranks holding the same experts only)."""
    return not getattr(p, "allreduce", True)


@torch.no_grad()
def update_router_expert_bias(model, args) -> None:
    """Aux-loss-free load balancing (Wang et al. 2024, DeepSeek-V3), once per global batch:
    each router's expert bias b_e += rate * sign(mean_e' c_e' - c_e), c_e the tokens the
    router sent to expert e in this step's forwards (Megatron-Core counts them in
    local_tokens_per_expert) summed over the TP x CP x DP ranks; the counts restart at 0.
    The Megatron engine gets this from Megatron-Core's finalize_model_grads; the CPU and
    DeepSpeed engines call it after their backward passes."""
    if not args.moe_router_enable_expert_bias:
        return
    routers = [m for m in model.modules() if getattr(m, "expert_bias", None) is not None]
    if not routers:  # a pipeline stage without MoE layers (its whole TP x CP x DP group alike)
        return
    counts = torch.stack([r.local_tokens_per_expert for r in routers])
    dist.all_reduce(counts, group=parallel_state.get_tensor_and_data_parallel_group(with_context_parallel=True))
    offsets = counts.mean(dim=-1, keepdim=True) - counts
    for router, offset in zip(routers, offsets):
        router.expert_bias += torch.sign(offset) * args.moe_router_bias_update_rate
        router.local_tokens_per_expert.zero_()


def moe_load_balancing_losses(args, micro_batches: int):
    """The last step's MoE load-balancing loss before its coefficient (1.0 at perfect balance:
    E * sum_e f_e P_e of Switch Transformer) of each MoE layer {layer number from 1: value},
    mean over the micro-batches, from Megatron-Core's aux-loss tracker, which is then
    cleared: each layer's TP x CP parts summed, the pipeline stages' layers gathered, the
    data-parallel ranks averaged. Three all-reduces every rank makes, also a stage without
    MoE layers (whose tracker has no entry: Megatron's own reduce would skip them there and
    hang the others). None without MoE or without a balancing loss."""
    if args.num_experts is None or args.moe_router_load_balancing_type == "none" or args.moe_aux_loss_coeff == 0:
        return None
    from megatron.core.transformer.moe.moe_utils import clear_aux_losses_tracker, get_moe_layer_wise_logging_tracker

    name = "seq_load_balancing_loss" if args.moe_router_load_balancing_type == "seq_aux_loss" else "load_balancing_loss"
    entry = get_moe_layer_wise_logging_tracker().get(name)
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    values = entry["values"].to(device, torch.float32, copy=True) if entry else torch.zeros(args.num_layers, device=device)
    dist.all_reduce(values, group=parallel_state.get_tensor_and_context_parallel_group())
    dist.all_reduce(values, group=parallel_state.get_pipeline_model_parallel_group())
    dist.all_reduce(values, group=parallel_state.get_data_parallel_group())
    values /= parallel_state.get_data_parallel_world_size()
    clear_aux_losses_tracker()
    return {i + 1: float(v) / micro_batches for i, v in enumerate(values.tolist()) if v != 0} or None


def empty_unused_memory(args, device: torch.device, level: int) -> None:
    """torch.cuda.empty_cache() where --empty-unused-memory-level is `level` or more (CUDA)."""
    if device.type == "cuda" and args.empty_unused_memory_level >= level:
        torch.cuda.empty_cache()


def collate(samples: list[dict]) -> dict:
    """Stack dataset samples into [b, s] tensors: tokens, labels, loss_mask, position_ids."""
    out = {}
    for key in ("tokens", "labels", "loss_mask", "position_ids"):
        out[key] = torch.stack([torch.as_tensor(s[key]) for s in samples])
    out["tokens"], out["labels"] = out["tokens"].long(), out["labels"].long()
    out["loss_mask"] = out["loss_mask"].float()
    return out


def with_documents(batch: dict, eod: int) -> dict:
    """Add `cu_seqlens` (int32, CPU) of the batch-major packing of its [b, s] tokens."""
    cu, _ = cu_seqlens_from_tokens(batch["tokens"], eod)
    batch["cu_seqlens"] = cu.to(torch.int32)
    return batch


def global_batch(dataset, iteration: int, args, eod: Optional[int] = None, ramp: bool = True) -> list[dict]:
    """This data-parallel rank's micro-batches of step `iteration` (deterministic in it).

    Step i takes the G samples after those of the steps before it (G = its global batch:
    global_batch_size, or the ramp-up's size with ramp; wrapping around the dataset);
    data-parallel rank r takes the r-th contiguous slice of micro_batch_size * M of them.
    """
    mbs = args.micro_batch_size
    consumed, G = step_batch(iteration, args.rampup_batch_size if ramp else None, args.global_batch_size)
    M = G // (mbs * args.data_parallel_size)
    dp_rank = parallel_state.get_data_parallel_rank()
    first = consumed + dp_rank * mbs * M
    n = len(dataset)
    batches = [collate([dataset[(first + m * mbs + j) % n] for j in range(mbs)]) for m in range(M)]
    if args.reset_attention_mask and eod is not None:
        batches = [with_documents(b, eod) for b in batches]
    if args.context_parallel_size > 1:
        batches = [context_parallel_part(b) for b in batches]
    return batches


def context_parallel_part(batch: dict) -> dict:
    """This context-parallel rank's chunks (r and 2*CP-1-r) of every [b, s] tensor."""
    from ..parallel import split_for_context_parallel

    r, size = parallel_state.get_context_parallel_rank(), parallel_state.get_context_parallel_world_size()
    return {k: split_for_context_parallel(v, 1, r, size) if k != "cu_seqlens" else v for k, v in batch.items()}


def micro_batch_iterator(batches: list[dict], device) -> Iterator[dict]:
    for b in batches:
        yield {k: v.to(device, non_blocking=True) for k, v in b.items()}


def packed_seq_params(batch: dict, eod: int) -> PackedSeqParams:
    """Document offsets of a [b, s] micro-batch in its batch-major flattening, for the FoX op."""
    tokens = batch["tokens"]
    cu = batch.get("cu_seqlens")
    if cu is None:  # computed here only if the batch came without it (a host sync on GPU)
        if parallel_state.get_context_parallel_world_size() > 1:
            raise ValueError("batch: with context parallelism, cu_seqlens must come from the full sequence "
                             "(global_batch / with_documents before the split)")
        cu = cu_seqlens_from_tokens(tokens, eod)[0]
    cu = cu.to(device=tokens.device, dtype=torch.int32)
    # a bound on the documents' length: a sample's whole sequence (before the context-parallel
    # split), which is also the length GPTModel builds the rotary embedding for
    n = tokens.shape[1] * parallel_state.get_context_parallel_world_size()
    return PackedSeqParams(qkv_format="sbhd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=n, max_seqlen_kv=n)


def model_forward(model, batch: dict, args, eod: int):
    """GPTModel forward of one micro-batch: per-token loss [b, s] on the last stage, else hidden."""
    psp = packed_seq_params(batch, eod) if args.reset_attention_mask else None
    return model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"], packed_seq_params=psp)
