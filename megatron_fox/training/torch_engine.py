"""Plain-PyTorch training engine: the CPU path (gloo), same model as the Megatron path.

Megatron's DDP, distributed optimizer, pipeline schedules and dist_checkpointing assume
CUDA. Here their nearest plain equivalents: gradients summed over data-parallel ranks with
all_reduce (an expert-parallel run's experts over their expert-data-parallel ranks, the
ranks that hold the same experts), sequence-parallel norm gradients summed over
tensor-parallel ranks, a GPipe schedule (all forwards, then all backwards) with blocking
send/recv between stages, torch.optim.AdamW, and one torch.save file per model-parallel
(and expert-parallel) rank.
"""

from __future__ import annotations

import os
from typing import Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from ..checkpoint import iteration_dir, stage_layers, write_latest, write_run_args
from .arguments import pipeline_stages, unsaved_state
from .step import (check_finite, is_split_expert, model_forward, set_context_pruning_penalty, set_lr_and_wd,
                   set_moe_aux_loss_scale, update_router_expert_bias)
from .timers import NO_TIMERS


def _no_decay(name: str, p: torch.nn.Parameter) -> bool:
    return p.dim() == 1 or name.endswith("bias") or "norm" in name


def _dp_cp():
    """Data-parallel group including context-parallel ranks (they split each sample)."""
    return ps.get_data_parallel_group(with_context_parallel=True)


def _is_tp_duplicate(p) -> bool:
    return not getattr(p, "tensor_model_parallel", False) and ps.get_tensor_model_parallel_rank() > 0


def _all_reduce_flat(grads: list, group) -> None:
    if grads and dist.get_world_size(group) > 1:
        flat = torch._utils._flatten_dense_tensors(grads)
        dist.all_reduce(flat, group=group)
        for g, synced in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads)):
            g.copy_(synced)


class TorchEngine:
    """Owns model, optimizer and the step of the CPU path."""

    timers = NO_TIMERS  # train.run sets its PhaseTimers (--timing-log-level)

    def __init__(self, model, args, eod: int):
        self.model, self.args, self.eod = model, args, eod
        # groups by (weight-decay multiplier, own --decoupled-lr schedule): decayed weights,
        # then norms and biases; the embedding and output layers apart with --decoupled-lr
        groups: dict[tuple[float, bool], list] = {}
        for name, p in model.named_parameters():
            own = args.decoupled_lr is not None and getattr(p, "is_embedding_or_output_parameter", False)
            groups.setdefault((0.0 if _no_decay(name, p) else 1.0, own), []).append(p)
        keys = sorted(groups, key=lambda k: (-k[0], k[1]))
        self.optimizer = torch.optim.AdamW(
            [{"params": groups[k], "weight_decay": args.weight_decay * k[0]} for k in keys],
            lr=args.lr, betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_eps)
        self.wd_mults = tuple(k[0] for k in keys)
        self.decoupled = [k[1] for k in keys]
        self.params = [p for p in model.parameters()]

    # --- one optimizer step -------------------------------------------------------------
    def train_step(self, batches: list[dict], iteration: int) -> dict:
        """Forward/backward over the micro-batches, gradient sync, clip, AdamW step."""
        self.model.train()
        with self.timers.phase("forward-backward"):
            loss_sum, tokens = self.gradients(batches)
        with self.timers.phase("optimizer"):
            zeros = self._count_zeros() if self.args.log_num_zeros_in_grad else None
            grad_norm = self._clip_grads()
            loss = self._reduce_loss(loss_sum, tokens)
            check_finite(iteration, self.args, loss, grad_norm)  # before the update: the weights stay finite
            lr = set_lr_and_wd(self.optimizer.param_groups, iteration, self.args, self.wd_mults, self.decoupled)
            self.optimizer.step()
        out = {"loss": loss, "grad_norm": grad_norm, "lr": lr}
        if zeros is not None:
            out["num_zeros_in_grad"] = zeros
        return out

    def gradients(self, batches: list[dict]):
        """Fresh gradients of the global batch, summed over data/context-parallel ranks.
        Returns (this rank's sum of masked token losses, tokens of the global batch)."""
        for p in self.params:
            p.grad = None
        tokens = self._global_tokens(batches)
        set_moe_aux_loss_scale(self.args, 1.0 / float(tokens), self.params[0].device)
        loss_sum = self._forward_backward(batches, tokens)
        self._sync_grads()
        update_router_expert_bias(self.model, self.args)
        return loss_sum, tokens

    @torch.no_grad()
    def eval_step(self, batches: list[dict]) -> float:
        self.model.eval()
        tokens = self._global_tokens(batches)
        loss_sum = self._forward_backward(batches, tokens, backward=False)
        return self._reduce_loss(loss_sum, tokens)

    @staticmethod
    def _global_tokens(batches: list[dict]) -> torch.Tensor:
        """Loss tokens of the global batch: this rank's micro-batches summed over the
        data- and context-parallel ranks."""
        tokens = torch.stack([b["loss_mask"].sum() for b in batches]).sum()
        dist.all_reduce(tokens, group=_dp_cp())
        return tokens

    def _forward_backward(self, batches, tokens, backward=True):
        """GPipe: all micro-batch forwards, then all backwards. Loss = sum(mask*loss) / tokens."""
        first, last = ps.is_pipeline_first_stage(), ps.is_pipeline_last_stage()
        inputs, outputs, loss_sum = [], [], torch.zeros(())
        for b in batches:
            x = None
            if not first:
                x = torch.empty(self._stage_shape(b), dtype=self._dtype())
                dist.recv(x, src=ps.get_pipeline_model_parallel_prev_rank())
                x.requires_grad_(backward)
                self.model.set_input_tensor(x)
            set_context_pruning_penalty(self.model, b, self.args, 1.0 / float(tokens))
            with torch.set_grad_enabled(backward):
                out = model_forward(self.model, b, self.args, self.eod)
            if last:
                loss = (out.float() * b["loss_mask"]).sum()
                loss_sum = loss_sum + loss.detach()
                out = loss / tokens
            else:
                dist.send(out.detach().contiguous(), dst=ps.get_pipeline_model_parallel_next_rank())
            inputs.append(x)
            outputs.append(out)
        if backward:
            for x, out in zip(inputs, outputs):
                if last:
                    out.backward()
                else:
                    g = torch.empty_like(out)
                    dist.recv(g, src=ps.get_pipeline_model_parallel_next_rank())
                    out.backward(g)
                if not first:
                    dist.send(x.grad.contiguous(), dst=ps.get_pipeline_model_parallel_prev_rank())
        return loss_sum

    def _stage_shape(self, b):
        bsz, s = b["tokens"].shape  # already this context-parallel rank's part
        if self.args.sequence_parallel:
            s //= self.args.tensor_model_parallel_size
        return (s, bsz, self.args.hidden_size)

    def _dtype(self):
        return torch.bfloat16 if self.args.bf16 else torch.float32

    def _sync_grads(self):
        with_grad = [p for p in self.params if p.grad is not None]
        _all_reduce_flat([p.grad for p in with_grad if not is_split_expert(p)], _dp_cp())
        _all_reduce_flat([p.grad for p in with_grad if is_split_expert(p)], ps.get_expert_data_parallel_group())
        if self.args.sequence_parallel:
            for p in self.params:
                if getattr(p, "sequence_parallel", False) and p.grad is not None:
                    dist.all_reduce(p.grad, group=ps.get_tensor_model_parallel_group())

    def _grad_sum(self, per_grad, dtype: torch.dtype) -> torch.Tensor:
        """sum of per_grad(grad) over the model's gradients, each tensor-parallel shard counted
        once, the experts of every expert-parallel rank (a parameter without a gradient adds
        nothing): a 0-dim tensor of dtype, the same on every rank."""
        total = torch.zeros(2, dtype=dtype, device=self.params[0].device)  # NCCL reduces device tensors
        for p in self.params:
            if p.grad is not None and not _is_tp_duplicate(p):
                total[int(is_split_expert(p))] += per_grad(p.grad)
        dist.all_reduce(total[0], group=ps.get_model_parallel_group())
        if self.args.expert_model_parallel_size > 1:  # the split experts: over TP x EP x PP
            dist.all_reduce(total[1], group=ps.get_expert_tensor_model_pipeline_parallel_group())
        return total.sum()

    def _grad_norm(self) -> float:
        """L2 norm of the model's gradients (see `_grad_sum` for what is counted)."""
        return self._grad_sum(lambda g: g.double().pow(2).sum(), torch.float64).sqrt().item()

    def _count_zeros(self) -> int:
        """Zero entries of the model's gradients (see `_grad_sum`), as Megatron's count_zeros_fp32."""
        return int(self._grad_sum(lambda g: g.numel() - torch.count_nonzero(g), torch.int64))

    def _clip_grads(self) -> float:
        norm = self._grad_norm()
        if self.args.clip_grad > 0 and norm > self.args.clip_grad:
            scale = self.args.clip_grad / (norm + 1e-6)
            for p in self.params:
                if p.grad is not None:
                    p.grad.mul_(scale)
        return norm

    def _reduce_loss(self, loss_sum, tokens) -> float:
        """Mean token loss of the global batch, known on every rank."""
        loss = loss_sum.double().clone()
        dist.all_reduce(loss, group=_dp_cp())
        if ps.get_pipeline_model_parallel_world_size() > 1:
            dist.all_reduce(loss, group=ps.get_pipeline_model_parallel_group())
        return (loss / tokens.double()).item()

    # --- checkpoints --------------------------------------------------------------------
    def _layout(self) -> dict:
        """TP, PP, EP sizes and each pipeline stage's [lo, hi) layers."""
        return {"tp": ps.get_tensor_model_parallel_world_size(), "pp": ps.get_pipeline_model_parallel_world_size(),
                "ep": self.args.expert_model_parallel_size, "stages": [list(b) for b in pipeline_stages(self.args)]}

    def _saved_layout(self, state: dict) -> Optional[dict]:
        """A rank file's layout in `_layout`'s form (files before EP or the stages were
        recorded: EP 1, an even split; before the layout itself: None)."""
        saved = state.get("layout")
        if saved is None:
            return None
        saved = {"ep": 1, **saved}
        if "stages" not in saved:
            saved["stages"] = [list(b) for b in stage_layers(self.args.num_layers, saved["pp"])]
        return saved

    def _rank_file(self, root, iteration):
        """mp_rank_TT_PPP.pt, with expert parallelism mp_rank_TT_PPP_EEE.pt (Megatron-LM's names)."""
        tp, pp = ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank()
        ep = f"_{ps.get_expert_model_parallel_rank():03d}" if self.args.expert_model_parallel_size > 1 else ""
        return os.path.join(iteration_dir(root, iteration), f"mp_rank_{tp:02d}_{pp:03d}{ep}.pt")

    def save(self, root: str, iteration: int) -> None:
        """Model, iteration, optimizer and RNG (unless --no-save-optim / --no-save-rng); of the
        ranks holding the same model shard and experts (an expert-data-parallel group: with
        EP = 1 the data- and context-parallel ranks), the first writes."""
        if ps.get_expert_data_parallel_rank() == 0:
            path = self._rank_file(root, iteration)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            layout = self._layout()
            state = {"model": self.model.state_dict(), "iteration": iteration, "layout": layout}
            if self.args.save_optim:
                state["optimizer"] = self.optimizer.state_dict()
            if self.args.save_rng:
                state["rng"] = torch.get_rng_state()
            torch.save(state, path + ".tmp")
            os.replace(path + ".tmp", path)
        write_run_args(iteration_dir(root, iteration), vars(self.args))
        write_latest(root, iteration)

    def load(self, root: str, iteration: int) -> int:
        """Resume from checkpoint `iteration` under root (`checkpoint.checkpoint_iteration`);
        returns the step to continue from (its saved iteration, or 0 with --finetune, which
        loads the weights only)."""
        path = self._rank_file(root, iteration)
        state = torch.load(path, map_location="cpu", weights_only=False) if os.path.isfile(path) else None
        saved = self._saved_layout(state) if state is not None else None
        if state is None or (saved is not None and saved != self._layout()):
            weights_only = self.args.finetune or not (self.args.load_optim or self.args.load_rng)
            if not weights_only:
                raise ValueError(f"{root} iteration {iteration} was saved with another TP/PP/EP layout than this "
                                 f"run's {self._layout()} (this rank's {os.path.basename(path)} "
                                 f"{'differs' if state else 'is missing'}): a resume keeps the layout; its weights "
                                 f"load into any layout with --finetune, or --no-load-optim --no-load-rng")
            return self._load_weights_of_other_layout(root, iteration)
        self.model.load_state_dict(state["model"])
        if self.args.finetune:
            return 0
        for key, flag in (("optimizer", "optim"), ("rng", "rng")):
            if getattr(self.args, f"load_{flag}") and key not in state:
                raise unsaved_state(path, key, flag)
        if self.args.load_optim:
            self.optimizer.load_state_dict(state["optimizer"])
        if self.args.load_rng:
            torch.set_rng_state(state["rng"])
        return state["iteration"]

    def _load_weights_of_other_layout(self, root: str, iteration: int) -> int:
        """The weights of a checkpoint saved with another TP/PP/EP layout: every rank file
        merged into the full model (as tools/convert_checkpoint.py exports it), this rank's
        part taken."""
        from ..checkpoint.export import merge_rank_files
        from .model import load_full_state_dict

        folder = iteration_dir(root, iteration)
        load_full_state_dict(self.model, folder, self.args, full=merge_rank_files(folder, self.args.num_layers))
        return 0 if self.args.finetune else iteration
