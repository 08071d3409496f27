"""DeepSpeed training engine (`--deepspeed`, Megatron-DeepSpeed's flag): ZeRO stage
`--zero-stage` (0-3) over the data-parallel ranks in place of Megatron's DDP and distributed
optimizer, the same model, data, loss and LR schedule as the other engines.

The model keeps its Megatron-Core tensor and context parallelism: DeepSpeed learns the
groups from `MegatronMpu` (model parallel = tensor parallel here; data parallel includes the
context-parallel ranks, which hold parts of the same samples, as in Megatron's gradient
reduce). Pipeline and sequence parallelism are refused at parse time (their gradients need
a schedule or a reduce DeepSpeed's engine does not make). Checkpoints are DeepSpeed's own
(`iter_NNNNNNN/` of `--save`, beside Megatron-LM's tracker file), not dist_checkpointing.
"""

from __future__ import annotations

import contextlib
import json
import os

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from ..checkpoint import iteration_dir, write_latest, write_run_args
from .step import (check_finite, model_forward, set_context_pruning_penalty, set_lr_and_wd, set_moe_aux_loss_scale,
                   update_router_expert_bias)
from .torch_engine import TorchEngine, _dp_cp


class MegatronMpu:
    """The model-parallel unit DeepSpeed asks for its groups, answered by megatron.core's
    parallel_state."""

    def get_model_parallel_group(self):
        return ps.get_tensor_model_parallel_group()

    def get_model_parallel_rank(self):
        return ps.get_tensor_model_parallel_rank()

    def get_model_parallel_world_size(self):
        return ps.get_tensor_model_parallel_world_size()

    get_tensor_model_parallel_group = get_model_parallel_group
    get_tensor_model_parallel_rank = get_model_parallel_rank
    get_tensor_model_parallel_world_size = get_model_parallel_world_size

    def get_tensor_model_parallel_src_rank(self):
        return ps.get_tensor_model_parallel_src_rank()

    def get_data_parallel_group(self):
        return _dp_cp()

    def get_data_parallel_rank(self):
        return ps.get_data_parallel_rank(with_context_parallel=True)

    def get_data_parallel_world_size(self):
        return ps.get_data_parallel_world_size(with_context_parallel=True)

    def get_data_parallel_group_ranks(self):
        return dist.get_process_group_ranks(_dp_cp())


def deepspeed_config(args) -> dict:
    """DeepSpeed's config from the run's flags, then --deepspeed-config's JSON over it.

    train_batch_size counts samples of the whole data-parallel group; with context
    parallelism its ranks split samples, so DeepSpeed's (data x context)-parallel world
    sees the same micro-batch on every rank of a sample's group, counted once per rank."""
    dp = ps.get_data_parallel_world_size(with_context_parallel=True)
    config = {
        "train_micro_batch_size_per_gpu": args.micro_batch_size,
        "gradient_accumulation_steps": args.num_microbatches,
        "train_batch_size": args.micro_batch_size * args.num_microbatches * dp,
        "gradient_clipping": args.clip_grad,
        "zero_optimization": {"stage": args.zero_stage},
        "bf16": {"enabled": bool(args.bf16)},
        "steps_per_print": 10 ** 9,  # the trainer logs
        "wall_clock_breakdown": False,
    }
    if args.deepspeed_config:
        with open(args.deepspeed_config) as f:
            _merge(config, json.load(f))
    return config


def _merge(base: dict, over: dict) -> None:
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = value


class DeepSpeedEngine(TorchEngine):
    """The model in a DeepSpeed engine around the AdamW of the CPU path (its parameter
    groups: no weight decay on norms and biases)."""

    def __init__(self, model, args, eod: int):
        import deepspeed

        super().__init__(model, args, eod)
        self.ds, self.optimizer, _, _ = deepspeed.initialize(
            model=model, optimizer=self.optimizer, config=deepspeed_config(args), mpu=MegatronMpu(),
            dist_init_required=False)
        self.dp_size = ps.get_data_parallel_world_size(with_context_parallel=True)
        self.device = next(model.parameters()).device

    def train_step(self, batches: list[dict], iteration: int) -> dict:
        """One optimizer step over the micro-batches: DeepSpeed averages gradients over its
        data-parallel ranks and accumulation steps; the loss given to it is scaled so that
        the update is that of the global batch's mean token loss, as in the other engines."""
        self.ds.train()
        lr = set_lr_and_wd(self.optimizer.param_groups, iteration, self.args, self.wd_mults, self.decoupled)
        batches = self._on_device(batches)
        if len(batches) != self.ds.gradient_accumulation_steps():  # --rampup-batch-size: this step's batch
            self.ds.set_train_batch_size(len(batches) * self.args.micro_batch_size * self.dp_size)
        tokens = self._global_tokens(batches)
        set_moe_aux_loss_scale(self.args, self.dp_size / float(tokens), self.device)
        loss_sum, norm = torch.zeros((), device=tokens.device), None
        for i, b in enumerate(batches):
            with self.timers.phase("forward-backward"):
                # the penalty's gradient scaled as the loss's (DeepSpeed then averages both over its ranks)
                set_context_pruning_penalty(self.model, b, self.args, self.dp_size / float(tokens))
                out = model_forward(self.ds, b, self.args, self.eod)
                loss = (out.float() * b["loss_mask"]).sum()
                loss_sum = loss_sum + loss.detach()
                # the sum over micro-batches and ranks of loss / tokens is the global mean
                self.ds.backward(loss * (self.dp_size / float(tokens)), scale_wrt_gas=False)
            if i == len(batches) - 1:  # before the update
                mean_loss = self._reduce_loss(loss_sum, tokens)
                check_finite(iteration, self.args, mean_loss)
                if self.args.zero_stage == 0:
                    norm = self._grad_norm()  # averaged gradients, before the step clips and clears them
            with self.timers.phase("optimizer" if i == len(batches) - 1 else "forward-backward"):
                self.ds.step()  # the update at the last micro-batch (the accumulation boundary)
        update_router_expert_bias(self.model, self.args)
        norm = self.ds.get_global_grad_norm() if norm is None else norm
        norm = None if norm is None else float(norm)
        check_finite(iteration, self.args, mean_loss, norm)  # ZeRO knows the norm after its update only
        return {"loss": mean_loss, "lr": lr, "grad_norm": float("nan") if norm is None else norm}

    @torch.no_grad()
    def eval_step(self, batches: list[dict]) -> float:
        self.ds.eval()
        batches = self._on_device(batches)
        tokens = self._global_tokens(batches)
        loss_sum = torch.zeros((), device=tokens.device)
        for b in batches:
            out = model_forward(self.ds, b, self.args, self.eod)
            loss_sum = loss_sum + (out.float() * b["loss_mask"]).sum()
        return self._reduce_loss(loss_sum, tokens)

    def _on_device(self, batches: list[dict]) -> list[dict]:
        """The micro-batches on the model's device (NCCL reduces device tensors only)."""
        return [{k: v.to(self.device, non_blocking=True) for k, v in b.items()} for b in batches]

    def save(self, root: str, iteration: int) -> None:
        """DeepSpeed's checkpoint (model, ZeRO optimizer partitions) in iter_NNNNNNN/ of root."""
        path = iteration_dir(root, iteration)
        self.ds.save_checkpoint(root, tag=os.path.basename(path), client_state={"iteration": iteration},
                                save_latest=False)
        write_run_args(path, vars(self.args))
        write_latest(root, iteration)

    def load(self, root: str, iteration: int) -> int:
        """Resume from checkpoint `iteration` under root (`checkpoint.checkpoint_iteration`);
        --finetune takes the weights only and starts at step 0, --no-load-optim keeps the
        fresh optimizer."""
        weights_only = self.args.finetune or not self.args.load_optim
        path = iteration_dir(root, iteration)
        with self._zero3_weights_from(path, weights_only):
            loaded, _ = self.ds.load_checkpoint(root, tag=os.path.basename(path), load_optimizer_states=not weights_only,
                                                load_lr_scheduler_states=False, load_module_only=weights_only)
        if loaded is None:
            raise FileNotFoundError(f"load: no DeepSpeed checkpoint in {path}")
        return 0 if self.args.finetune else iteration

    @contextlib.contextmanager
    def _zero3_weights_from(self, path: str, weights_only: bool):
        """ZeRO-3 keeps its weights only in the optimizer files; a weights-only load has
        DeepSpeed 0.19 gather them with zero_to_fp32 from the folder its 'latest' file names
        (which these checkpoints do not write) and from every tensor-parallel rank's files at
        once. During the load that call gets this rank's float32 weights of checkpoint `path`."""
        if not (weights_only and self.args.zero_stage == 3):
            yield
            return
        import deepspeed.runtime.engine as ds_engine

        from ..checkpoint.export import gather_zero3

        tp = ps.get_tensor_model_parallel_rank()
        saved = ds_engine.get_fp32_state_dict_from_zero_checkpoint
        ds_engine.get_fp32_state_dict_from_zero_checkpoint = lambda *a, **k: gather_zero3(path, [tp])[(tp, 0)]
        try:
            yield
        finally:
            ds_engine.get_fp32_state_dict_from_zero_checkpoint = saved
