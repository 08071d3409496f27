"""Megatron-Core training engine (the CUDA path).

Float16Module (bf16), Megatron DistributedDataParallel with the distributed optimizer,
`get_megatron_optimizer` (Adam), the forward-backward schedule of the pipeline size
(no pipelining or 1F1B), `finalize_model_grads`, and `dist_checkpointing` save/load.
--overlap-grad-reduce / --overlap-param-gather as in Megatron-LM: gradient buckets reduce
during the backward; updated parameters are all-gathered bucket by bucket by forward
pre-hooks in the next step, so the hooks are off for the first step and the parameters
are synchronised (hooks off) before a validation pass or a checkpoint.
Losses are per token: each micro-batch returns (sum of masked token losses, tokens) and
the gradients are divided by the tokens of the whole global batch
(config.calculate_per_token_loss), so any TP/PP/DP/micro-batch split gives one gradient.
"""

from __future__ import annotations

import contextlib
import os
from functools import partial

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing
from megatron.core import parallel_state as ps
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.transformer.module import Float16Module

from ..checkpoint import iteration_dir, write_latest, write_run_args
from . import multi_tensor
from .arguments import unsaved_state
from .step import (check_finite, empty_unused_memory, micro_batch_iterator, model_forward,
                   set_context_pruning_penalty, set_lr_and_wd)
from .timers import NO_TIMERS


def _loss_func(loss_mask: torch.Tensor, output_tensor: torch.Tensor):
    """(sum of masked token losses, number of tokens, report) for the schedule."""
    loss_sum = (output_tensor.float() * loss_mask).sum()
    tokens = loss_mask.sum().to(torch.int)
    report = torch.stack([loss_sum.detach(), tokens.float()])
    return loss_sum, tokens, {"lm loss": report}


def _init_empty_adam_states(optimizer) -> None:
    """Give a fresh torch Adam (used when neither Apex nor TE is installed) zero states and a
    step, which the distributed optimizer's state_dict() needs before a checkpoint load
    overwrites them."""
    for sub in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = sub.optimizer
        for group in inner.param_groups:
            on_device = group.get("fused") or group.get("capturable")
            for p in group["params"]:
                state = inner.state[p]
                if not state:
                    state["step"] = torch.tensor(0.0, device=p.device if on_device else "cpu")
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)


class _MissingIsNone(dict):
    def __missing__(self, key):
        return None


def _tolerate_step_in_optimizer_state() -> None:
    """megatron-core's distributed optimizer, on its torch-Adam fallback (no Apex, no TE),
    keeps a 'step' tensor in each parameter's state but checkpoints hold only exp_avg and
    exp_avg_sq; loading then looks the step up and fails (KeyError, seen with 0.19.2). Let
    the lookup skip it; `_restore_adam_step` sets the step afterwards."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    original = DistributedOptimizer._set_main_param_and_optimizer_states
    if getattr(original, "_megatron_fox_patched", False):
        return

    def lenient(self, model_param, tensors):
        return original(self, model_param, _MissingIsNone(tensors))

    lenient._megatron_fox_patched = True
    DistributedOptimizer._set_main_param_and_optimizer_states = lenient


def _restore_adam_step(optimizer, steps: int) -> None:
    """Give each parameter of torch Adam its own step tensor (its bias correction), set to
    the optimizer steps taken. Without Apex/TE, megatron-core 0.19.2's load hands one step
    tensor to every parameter's state; torch Adam increments each parameter's step in place,
    so a shared tensor advanced by the number of parameters per update and the bias
    correction was wrong after a resume (a loss drift of ~0.3% over 15 steps, GPU test).
    Every training step is an optimizer step here (a failed one raises)."""
    for sub in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = sub.optimizer
        for group in inner.param_groups:
            for p in group["params"]:
                state = inner.state.get(p, {})
                step = state.get("step")
                if isinstance(step, torch.Tensor):
                    state["step"] = torch.full_like(step, float(steps))


class MegatronEngine:
    """Owns the wrapped model, the Megatron optimizer and the step of the CUDA path."""

    timers = NO_TIMERS  # train.run sets its PhaseTimers (--timing-log-level)

    def __init__(self, model, args, eod: int):
        self.args, self.eod = args, eod
        self._fully_parallel_save = None  # the save strategy of --ckpt-fully-parallel-save, made at the first save
        multi_tensor.install()  # sync-free grad norm without Apex / TE
        config = model.config
        self.inner = model  # the GPTModel itself: checkpoints use its sharded state dict
        if args.bf16:
            model = Float16Module(config, model)
        ddp_config = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True, overlap_grad_reduce=args.overlap_grad_reduce,
            overlap_param_gather=args.overlap_param_gather, bucket_size=args.ddp_bucket_size,
            use_distributed_optimizer=args.use_distributed_optimizer,
            check_for_nan_in_grad=args.check_for_nan_in_loss_and_grad)
        self.model = DistributedDataParallel(config=config, ddp_config=ddp_config, module=model)
        opt_config = OptimizerConfig(
            optimizer="adam", lr=args.lr, min_lr=args.min_lr, weight_decay=args.weight_decay, bf16=args.bf16,
            params_dtype=torch.bfloat16 if args.bf16 else torch.float32, adam_beta1=args.adam_beta1,
            adam_beta2=args.adam_beta2, adam_eps=args.adam_eps, use_distributed_optimizer=args.use_distributed_optimizer,
            clip_grad=args.clip_grad, overlap_param_gather=args.overlap_param_gather,
            log_num_zeros_in_grad=args.log_num_zeros_in_grad, decoupled_lr=args.decoupled_lr,
            decoupled_min_lr=args.decoupled_min_lr)
        self.optimizer = get_megatron_optimizer(opt_config, [self.model])
        # Megatron-Core gives --decoupled-lr's group (embedding and output layers) its own
        # max_lr / min_lr; the schedule here follows that mark
        self.decoupled = [args.decoupled_lr is not None and (group.get("max_lr", args.lr) != args.lr or
                                                             group.get("min_lr", args.min_lr) != args.min_lr)
                          for group in self.optimizer.param_groups]
        config.finalize_model_grads_func = finalize_model_grads
        config.no_sync_func = self.model.no_sync
        if args.overlap_grad_reduce:  # pipeline schedules start each stage's reduce when its last backward ends
            config.grad_sync_func = self.model.start_grad_sync
        # The parameters are in step with the optimizer at start: the gather hooks wait for
        # the first update (Megatron-LM's order)
        self._hooks_on = False
        if args.overlap_param_gather:
            self.model.disable_forward_pre_hook(param_sync=False)
        config.grad_scale_func = self.optimizer.scale_loss
        self.config = config
        self.schedule = get_forward_backward_func()

    def _forward_step(self, data_iterator, model):
        batch = next(data_iterator)
        # the schedule backpropagates the loss sum times the loss scale; the gradients are
        # divided by the batch's tokens afterwards (calculate_per_token_loss)
        if self.args.fox_context_pruning:  # reading the loss scale waits for the device: only when needed
            set_context_pruning_penalty(model, batch, self.args, float(self.optimizer.get_loss_scale()))
        out = model_forward(model, batch, self.args, self.eod)
        return out, partial(_loss_func, batch["loss_mask"])

    def _run(self, batches, forward_only):
        device = torch.device("cuda", torch.cuda.current_device())
        reports = self.schedule(
            forward_step_func=self._forward_step, data_iterator=micro_batch_iterator(batches, device),
            model=[self.model], num_microbatches=len(batches), seq_length=self.args.seq_length,
            micro_batch_size=self.args.micro_batch_size, forward_only=forward_only)
        total = torch.zeros(2, device=device, dtype=torch.float64)
        for r in reports:  # only the last pipeline stage holds reports
            total += r["lm loss"].double()
        dist.all_reduce(total, group=ps.get_data_parallel_group(with_context_parallel=True))
        if ps.get_pipeline_model_parallel_world_size() > 1:
            dist.all_reduce(total, group=ps.get_pipeline_model_parallel_group())
        return (total[0] / total[1]).item()

    def train_step(self, batches: list[dict], iteration: int) -> dict:
        self.model.train()
        self.model.zero_grad_buffer()
        self.optimizer.zero_grad()
        # Megatron's groups carry wd_mult (0 for norms and biases), as its scheduler reads them
        lr = set_lr_and_wd(self.optimizer.param_groups, iteration, self.args,
                           [group.get("wd_mult", 1.0) for group in self.optimizer.param_groups], self.decoupled)
        with self.timers.phase("forward-backward"):
            loss = self._run(batches, forward_only=False)
        check_finite(iteration, self.args, loss)  # before the update (DDP checks the gradients' NaNs)
        empty_unused_memory(self.args, torch.device("cuda"), 2)
        with self.timers.phase("optimizer"):
            ok, grad_norm, num_zeros = self.optimizer.step()
        if not ok:
            raise RuntimeError(f"optimizer step {iteration + 1} failed (non-finite gradients)")
        if self.args.overlap_param_gather and not self._hooks_on:
            self.model.enable_forward_pre_hook()  # the next forward gathers this update
            self._hooks_on = True
        out = {"loss": loss, "grad_norm": float(grad_norm or 0.0), "lr": lr}
        if self.args.log_num_zeros_in_grad and num_zeros is not None:
            out["num_zeros_in_grad"] = int(num_zeros)
        return out

    @contextlib.contextmanager
    def params_synced(self):
        """With overlap_param_gather the last update is gathered only by the next training
        forward: finish the gather now and keep the hooks off until the block ends."""
        if not self._hooks_on:
            yield
            return
        self.model.disable_forward_pre_hook(param_sync=True)
        try:
            yield
        finally:
            self.model.enable_forward_pre_hook()

    @torch.no_grad()
    def eval_step(self, batches: list[dict]) -> float:
        self.model.eval()
        with self.params_synced():
            return self._run(batches, forward_only=True)

    # --- checkpoints (dist_checkpointing, torch_dist format) ------------------------------
    def _bucket_layout(self) -> list[int]:
        """Parameters in each gradient bucket of the DDP buffers."""
        buffers = list(self.model.buffers) + list(getattr(self.model, "expert_parallel_buffers", []))
        return [len(bucket.params) for buffer in buffers for bucket in buffer.buckets]

    def _optimizer_sharding(self, layout: list[int]) -> str:
        """Optimizer-state layout in checkpoints (Megatron's distrib_optim_sharding_type).
        fully_reshardable (any TP/PP/DP on resume) where the gradients sit in one bucket:
        with several buckets (--overlap-grad-reduce), megatron-core 0.19.2's
        fully_reshardable state resumes wrongly (2 x H100, DP=2: the first step after the
        load jumps from loss 5.53 to 7.16), so those runs save dp_reshardable, Megatron-LM's
        own default (resume with the same buckets and TP/PP; DP may change).
        MEGATRON_FOX_OPTIM_SHARDING overrides; megatron-core 0.19.2 refuses the flattened
        ranges of fully_sharded_model_space. layout: `_bucket_layout()`."""
        forced = os.environ.get("MEGATRON_FOX_OPTIM_SHARDING")
        if forced:
            return forced
        return "fully_reshardable" if len(layout) <= 1 else "dp_reshardable"

    def save(self, root: str, iteration: int) -> None:
        with self.params_synced():
            self._save(root, iteration)

    def _save(self, root: str, iteration: int) -> None:
        path = iteration_dir(root, iteration)
        if dist.get_rank() == 0:
            os.makedirs(path, exist_ok=True)
        dist.barrier()
        model_sd = self.inner.sharded_state_dict()
        state = {"model": model_sd, "iteration": iteration, "optimizer_saved": self.args.save_optim}
        if self.args.save_optim:
            layout = self._bucket_layout()
            sharding = self._optimizer_sharding(layout)
            meta = {"distrib_optim_sharding_type": sharding}
            state.update(optimizer=self.optimizer.sharded_state_dict(model_sd, metadata=meta),
                         optimizer_sharding=sharding, optimizer_buckets=layout)
        dist_checkpointing.save(state, path, self._save_strategy())
        write_run_args(iteration_dir(root, iteration), vars(self.args))
        write_latest(root, iteration)

    def _save_strategy(self):
        """dist_checkpointing's default torch_dist writer, or with --ckpt-fully-parallel-save
        that writer behind Megatron-Core's fully parallel wrapper: each weight the
        data-parallel (and context-parallel) ranks share is written by one of them, spread
        evenly, instead of all by the first. Kept across saves with
        --ckpt-assume-constant-structure (the plan is then made once)."""
        if not self.args.ckpt_fully_parallel_save:
            return None
        if self._fully_parallel_save is None:
            from megatron.core.dist_checkpointing.serialization import get_default_save_sharded_strategy
            from megatron.core.dist_checkpointing.strategies.fully_parallel import FullyParallelSaveStrategyWrapper

            self._fully_parallel_save = FullyParallelSaveStrategyWrapper(
                get_default_save_sharded_strategy(), ps.get_data_parallel_group(with_context_parallel=True),
                self.args.ckpt_assume_constant_structure)
        return self._fully_parallel_save

    def _load(self, sharded_state: dict, path: str) -> dict:
        """dist_checkpointing.load, with --ckpt-fully-parallel-load through Megatron-Core's
        fully parallel wrapper (each data-parallel rank reads a share of the shared weights,
        then they exchange them)."""
        if not self.args.ckpt_fully_parallel_load:
            return dist_checkpointing.load(sharded_state, path)
        from megatron.core.dist_checkpointing.serialization import get_default_load_sharded_strategy
        from megatron.core.dist_checkpointing.strategies.fully_parallel import FullyParallelLoadStrategyWrapper

        strategy = FullyParallelLoadStrategyWrapper(get_default_load_sharded_strategy(path),
                                                    ps.get_data_parallel_group(with_context_parallel=True))
        return dist_checkpointing.load(sharded_state, path, strategy)

    def load(self, root: str, iteration: int) -> int:
        """Resume from checkpoint `iteration` under root (`checkpoint.checkpoint_iteration`);
        returns the step to continue from (that iteration, or 0 with --finetune, which loads
        the weights only; --no-load-optim keeps the fresh optimizer)."""
        path = iteration_dir(root, iteration)
        model_state = self._load({"model": self.inner.sharded_state_dict()}, path)
        self.inner.load_state_dict(model_state["model"])
        if self.args.finetune or not self.args.load_optim:
            # the optimizer's float32 main copies were taken from the initial weights
            self.optimizer.reload_model_params()
            return 0 if self.args.finetune else iteration
        common = dist_checkpointing.load_common_state_dict(path)
        if not common.get("optimizer_saved", True):
            raise unsaved_state(path, "optimizer", "optim")
        sharding = common.get("optimizer_sharding", "fully_reshardable")  # what checkpoints before it held
        saved, layout = common.get("optimizer_buckets"), self._bucket_layout()
        if sharding == "dp_reshardable" and saved != layout:
            raise ValueError(f"--load {root}: the optimizer state was saved by gradient bucket (dp_reshardable) "
                             f"with {len(saved or [])} buckets; this run has {len(layout)}: resume with the "
                             f"same --overlap-grad-reduce, --ddp-bucket-size and TP/PP")
        _init_empty_adam_states(self.optimizer)
        _tolerate_step_in_optimizer_state()
        opt_sd = self.optimizer.sharded_state_dict(self.inner.sharded_state_dict(), is_loading=True,
                                                   metadata={"distrib_optim_sharding_type": sharding})
        self.optimizer.load_state_dict(self._load({"optimizer": opt_sd}, path)["optimizer"])
        _restore_adam_step(self.optimizer, iteration)
        return iteration
