"""Training entry point: ``python -m megatron_fox.train --config configs/X.yaml [--flag value ...]``.

With no data flags it trains on the embedded default corpus (the Python standard
library's source, tokenizer trained on the fly and cached). CUDA: Megatron-Core's DDP,
distributed optimizer, pipeline schedules and dist_checkpointing. CPU: the plain-PyTorch
engine (gloo). Launch several processes with torchrun (see launch/).
"""

from __future__ import annotations

import contextlib
import datetime
import math
import os
import signal
import socket
import statistics
import sys
import time
from typing import Optional

import torch
import torch.distributed as dist

from .training.arguments import ConfigError, parse_or_exit, resume_schedule


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(args) -> torch.device:
    """Process group (NCCL on CUDA, gloo on CPU), model-parallel groups, seeds."""
    from megatron.core import parallel_state as ps

    use_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    if args.device == "cuda" and not torch.cuda.is_available():
        print("megatron_fox.train: error: config key 'device': cuda asked for but not available", file=sys.stderr)
        sys.exit(2)
    if not use_cuda and args.num_experts and args.moe_token_dispatcher_type == "alltoall":
        print("megatron_fox.train: error: config key 'moe_token_dispatcher_type': alltoall needs CUDA (Megatron-Core's "
              "dispatcher makes CUDA streams); use allgather on the CPU", file=sys.stderr)
        sys.exit(2)
    if "RANK" not in os.environ:  # plain `python -m`: a world of one, on a port of its own
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(_free_port()))
    if args.deterministic_mode:
        deterministic_mode(use_cuda)
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    else:
        from .training.cpu_compat import route_megatron_buffers_to_cpu

        route_megatron_buffers_to_cpu(force=True)  # sequence-parallel collectives on gloo, also beside a GPU
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo",
                                timeout=datetime.timedelta(minutes=args.distributed_timeout_minutes))
    if not ps.model_parallel_is_initialized():
        ps.initialize_model_parallel(
            tensor_model_parallel_size=args.tensor_model_parallel_size,
            pipeline_model_parallel_size=args.pipeline_model_parallel_size,
            context_parallel_size=args.context_parallel_size,
            expert_model_parallel_size=args.expert_model_parallel_size,
        )
    torch.manual_seed(args.seed)
    if use_cuda:
        from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

        model_parallel_cuda_manual_seed(args.seed)
    return torch.device("cuda", torch.cuda.current_device()) if use_cuda else torch.device("cpu")


def deterministic_mode(use_cuda: bool) -> None:
    """Megatron-LM's --deterministic-mode: torch's deterministic algorithms (an op without one
    raises), cuBLAS's fixed-size workspace, one NCCL algorithm (Ring unless NCCL_ALGO is
    set; NVLS reduces in no fixed order) and Inductor's deterministic mode (the compiled
    FoX-Pro extras: no kernel config picked by timing it, which differs run to run). FoX's
    kernels need nothing: they sum without atomics. Before the first CUDA call and the
    process group."""
    if use_cuda:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        algo = os.environ.setdefault("NCCL_ALGO", "Ring")
        if "nvls" in algo.lower():
            print(f"megatron_fox.train: error: config key 'deterministic_mode': NCCL_ALGO={algo} includes NVLS, "
                  f"which reduces in no fixed order (use Ring or Tree)", file=sys.stderr)
            sys.exit(2)
    torch.use_deterministic_algorithms(True)
    import torch._inductor.config as inductor_config

    inductor_config.deterministic = True


def data_paths(args) -> tuple[dict, str]:
    """(blends, SentencePiece model): blends {"all": (prefixes, weights)} split by --split, or
    {"train": ..., "valid": ...} from --train-data-path / --valid-data-path; with no data
    flags the embedded default corpus (built once and cached, under a file lock)."""
    from .training.data import default_cache_dir, prepare_default_corpus

    if args.data_blends:
        return args.data_blends, args.tokenizer_model
    cache = os.environ.get("MEGATRON_FOX_CACHE") or default_cache_dir()
    prefix, tok = prepare_default_corpus(cache, vocab_size=args.default_vocab_size, max_bytes=args.default_corpus_bytes)
    return {"all": ([prefix], None)}, tok


def tokenizer_for(args):
    """The run's tokenizer: --tokenizer-type GPT2BPETokenizer's files, HuggingFaceTokenizer's
    --tokenizer-model, else the SentencePiece model of --tokenizer-model or of the embedded
    corpus."""
    from .training.tokenizer import SENTENCEPIECE_TYPES

    model = (data_paths(args)[1] if args.tokenizer_type in SENTENCEPIECE_TYPES
             else args.tokenizer_model if args.tokenizer_type == "HuggingFaceTokenizer" else None)
    return tokenizer_or_exit(args, model)


def tokenizer_or_exit(args, model):
    """build_tokenizer of args' --tokenizer-type with this model file / directory; a
    tokenizer that cannot be built (its messages start with the key: "tokenizer_model: ...")
    stops with one line naming that config key and exit code 2."""
    from .training.tokenizer import build_tokenizer

    try:
        return build_tokenizer(args.tokenizer_type, model, args.vocab_file, args.merge_file, args.vocab_size)
    except ValueError as e:
        key, _, message = str(e).partition(": ")
        print(f"megatron_fox.train: error: config key '{key}': {message}", file=sys.stderr)
        sys.exit(2)


def build_data(args):
    """(train dataset, valid dataset or None, test dataset or None, tokenizer). Every rank
    calls this together: the corpus cache is built under a file lock, Megatron's dataset
    builder has its own barriers."""
    from .training.data import build_gpt_datasets
    from .training.tokenizer import SENTENCEPIECE_TYPES

    if not args.data_blends and not args.mock_data and args.tokenizer_type not in SENTENCEPIECE_TYPES:
        print(f"megatron_fox.train: error: config key 'tokenizer_type': {args.tokenizer_type} needs data tokenized "
              f"with it (data_path); the embedded corpus has its own SentencePiece model", file=sys.stderr)
        sys.exit(2)
    blends, sp_model = ({}, None) if args.mock_data else data_paths(args)  # may build the embedded corpus
    tokenizer = tokenizer_or_exit(args, sp_model)
    evaluating = bool(args.eval_iters) and bool(args.eval_interval or args.skip_train)
    passes = 1 if args.skip_train else (args.train_iters // args.eval_interval + 1 if args.eval_interval else 0)
    gbs = args.global_batch_size
    n_train = 0 if args.skip_train else max(1, args.train_iters) * gbs
    n_eval, n_test = passes * args.eval_iters * gbs, (args.eval_iters * gbs if evaluating else 0)

    if args.mock_data:
        from .training.data import MockGPTDataset

        def mock(samples, split):
            return (MockGPTDataset(samples, args.seq_length, tokenizer.eod, args.seed, split,
                                   eod_mask_loss=args.eod_mask_loss) if samples else None)
        return mock(max(n_train, 1), 0), mock(n_eval, 1), mock(n_test, 2), tokenizer

    def build(blend, samples, split):
        prefixes, weights = blend
        return build_gpt_datasets(prefixes, tokenizer, args.seq_length, samples, seed=args.seed, split=split,
                                  cache_path=args.data_cache_path, weights=weights, eod_mask_loss=args.eod_mask_loss,
                                  mmap_bin_files=args.mmap_bin_files,
                                  num_dataset_builder_threads=args.num_dataset_builder_threads)

    if "all" in blends:
        try:
            train, valid, test = build(blends["all"], (max(n_train, 1), n_eval, n_test), args.split)
        except ValueError as e:
            if not n_test or "the test split" not in str(e):
                raise
            if dist.get_rank() == 0:  # a corpus too small for its test share: train and validate without
                print(f"megatron_fox: no test evaluation ({e})", flush=True)
            n_test = 0
            train, valid, test = build(blends["all"], (max(n_train, 1), n_eval, 0), args.split)
    else:  # each split is the whole of its own files
        train = build(blends["train"], (max(n_train, 1), 0, 0), "100,0,0")[0]
        valid = build(blends["valid"], (n_eval, 0, 0), "100,0,0")[0] if "valid" in blends and n_eval else None
        test = build(blends["test"], (n_test, 0, 0), "100,0,0")[0] if "test" in blends and n_test else None
    return train, valid, (test if n_test else None), tokenizer


def _make_engine(model, args, eod, device):
    if args.deepspeed:
        from .training.deepspeed_engine import DeepSpeedEngine

        return DeepSpeedEngine(model, args, eod)
    if device.type == "cuda":
        from .training.megatron_engine import MegatronEngine

        return MegatronEngine(model, args, eod)
    from .training.torch_engine import TorchEngine

    return TorchEngine(model, args, eod)


def build_model_and_engine(args, device, tokenizer):
    """(this rank's model, its engine, the step resumed by --load or 0, the directory it was
    resumed from: --load or its non-persistent one). The model starts from
    --pretrained-checkpoint when given (a bad file exits 2 naming the key)."""
    from .training.model import build_model, embedding_ids, load_full_state_dict, padded_vocab_size, transformer_config

    args.vocab_size = args.vocab_size or tokenizer.vocab_size  # saved with checkpoints (--use-checkpoint-args)
    vocab = padded_vocab_size(embedding_ids(args, tokenizer.vocab_size), args)
    model = build_model(args, transformer_config(args, device), vocab)
    if args.pretrained_checkpoint:
        try:
            load_full_state_dict(model, args.pretrained_checkpoint, args)
        except (ValueError, KeyError) as e:
            print(f"megatron_fox: error: config key 'pretrained_checkpoint': {e}", file=sys.stderr)
            sys.exit(2)
    engine = _make_engine(model, args, tokenizer.eod, device)
    return (model, engine, *_load(engine, args))


def for_inference(args) -> None:
    """Tools that read a trained model (generation, evaluation): --load takes the weights only
    (a checkpoint's optimizer state, saved with other --lr/--weight-decay flags, would not fit
    this run's parameter groups: the distributed optimizer refuses it) and must find a
    checkpoint (never evaluate a random model by mistake)."""
    args.load_optim = args.load_rng = False
    args.exit_on_missing_checkpoint = True
    if args.deepspeed and args.zero_stage == 3:
        print("megatron_fox: error: config key 'zero_stage': the tools use the weights whole; gather a ZeRO-3 "
              "checkpoint's with tools/convert_checkpoint.py from-megatron, then --pretrained-checkpoint",
              file=sys.stderr)
        sys.exit(2)


def _saved_args(root: str, iteration: int) -> dict:
    """The flags saved with checkpoint `iteration` under root ({} if it has none)."""
    from .checkpoint import read_run_args

    try:
        return read_run_args(root, iteration)
    except FileNotFoundError:
        return {}


def _load(engine, args) -> tuple[int, Optional[str]]:
    """(the step --load resumes from, the directory of that checkpoint): Megatron-LM's rule
    for a directory without a checkpoint (a first launch with --save and --load the same):
    start from scratch, saying so, unless --exit-on-missing-checkpoint or --finetune (which
    needs weights) ask for one."""
    from .checkpoint import checkpoint_iteration, has_checkpoint

    if not args.load:
        return 0, None
    root = _newer_non_persistent(args) or args.load
    if has_checkpoint(root) or args.ckpt_step is not None:
        try:
            iteration = checkpoint_iteration(root, args.ckpt_step)
        except (OSError, ValueError) as e:
            key = "ckpt_step" if args.ckpt_step is not None else "load"
            print(f"megatron_fox: error: config key '{key}': {e}", file=sys.stderr)
            sys.exit(2)
        try:
            step = engine.load(root, iteration)
            if not (args.finetune or args.skip_train) and args.load_optim:  # as Megatron-LM: with the optimizer
                resume_schedule(args, _saved_args(root, iteration))
            return step, root
        except ValueError as e:  # a checkpoint that does not fit this run (layout, buckets, tensors, state)
            print(f"megatron_fox: error: {e}" if isinstance(e, ConfigError) else
                  f"megatron_fox: error: config key 'load': {e}", file=sys.stderr)
            sys.exit(2)
    if args.exit_on_missing_checkpoint or args.finetune:
        print(f"megatron_fox: error: config key 'load': no checkpoint in {args.load} (no "
              f"latest_checkpointed_iteration.txt)", file=sys.stderr)
        sys.exit(2)
    if dist.get_rank() == 0:
        print(f"megatron_fox: no checkpoint in {args.load} yet: starting from scratch", flush=True)
    return 0, None


def _newer_non_persistent(args) -> Optional[str]:
    """With --non-persistent-ckpt-type global and no --ckpt-step: the non-persistent
    checkpoints' directory where its latest is at least as new as --load's (Megatron-LM's
    rule), else None."""
    from .checkpoint import newer_non_persistent

    try:
        found = newer_non_persistent(args.load, args.ckpt_step, args.non_persistent_ckpt_type,
                                     args.non_persistent_global_ckpt_dir)
    except ValueError as e:
        print(f"megatron_fox: error: config key 'load': {e}", file=sys.stderr)
        sys.exit(2)
    if found is None:
        return None
    root, newest, persistent = found
    if dist.get_rank() == 0:
        print(f"megatron_fox: resuming from the non-persistent checkpoint of iteration {newest} in {root} "
              f"({args.load}'s latest: {persistent if persistent >= 0 else 'none'})", flush=True)
    return root


class _ExitRequest:
    """--exit-signal-handler / --exit-duration-in-mins: whether to save and stop after this
    step. Every rank must agree (a checkpoint needs them all), so the local answer goes
    through one all-reduce (MAX) a step; without either option nothing is asked."""

    def __init__(self, args, device):
        self.device, self.signalled = device, False
        self.deadline = None if args.exit_duration_in_mins is None else time.time() + 60 * args.exit_duration_in_mins
        self.active = bool(args.exit_signal_handler) or self.deadline is not None
        if args.exit_signal_handler:
            signal.signal(signal.SIGTERM, self._on_signal)

    def _on_signal(self, signum, frame):
        self.signalled = True

    def __call__(self) -> Optional[str]:
        """None to go on, else the reason to stop ("signal" or "duration")."""
        if not self.active:
            return None
        local = 2.0 if self.signalled else 1.0 if (self.deadline and time.time() > self.deadline) else 0.0
        flag = torch.tensor([local], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return {0.0: None, 1.0: "duration", 2.0: "signal"}[flag.item()]


def _layer_stats(model) -> tuple[dict[int, float], dict[int, float], dict[int, float], dict[int, float]]:
    """Per layer, over all ranks (one gather): the fraction of attention FLOPs skipped in its
    last forward and in its backward, (learned context pruning) the fraction of prunable
    pairs kept, and the median over heads of the forget gate's half-life in tokens,
    ln 0.5 / (mean log f of the head), from the last forward (each rank's heads and tokens)."""
    from .layers.context_pruning import context_pruning_modules
    from .training.model import attention_layers

    local, gates = {}, {}
    for m in attention_layers(model):
        if m.skipped_fraction is not None:
            local[m.layer_number] = (float(m.skipped_fraction), float(m.backward_skipped_fraction), None)
        if m.mean_log_fgate is not None:
            gates[m.layer_number] = m.mean_log_fgate.tolist()
    for m in context_pruning_modules(model):
        if m.last_kept_fraction is not None and m.layer_number in local:
            local[m.layer_number] = local[m.layer_number][:2] + (float(m.last_kept_fraction),)
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, (local, gates))
    merged: dict[int, list] = {}
    heads: dict[int, list] = {}
    for part, part_gates in gathered:
        for layer, fracs in part.items():
            merged.setdefault(layer, []).append(fracs)
        for layer, means in part_gates.items():
            heads.setdefault(layer, []).extend(means)
    half_lives = {layer: statistics.median(math.log(0.5) / min(m, -1e-30) for m in means)
                  for layer, means in sorted(heads.items())}

    def mean(i):
        out = {}
        for layer, v in sorted(merged.items()):
            vals = [f[i] for f in v if f[i] is not None]
            if vals:
                out[layer] = sum(vals) / len(vals)
        return out

    return mean(0), mean(1), mean(2), half_lives


def run(args, on_step=None) -> list[dict]:
    """Train with parsed arguments; returns the per-step history (loss, lr, tokens/s, ...).
    on_step(step, record), if given, is called after every training step (profilers)."""
    from .training.manual_gc import ManualGC

    collector = ManualGC(args)
    with collector.running():
        return _run(args, on_step, collector)


def _run(args, on_step, collector) -> list[dict]:
    from tqdm import tqdm

    from .training.flops import matmul_weight_elements, params_l2_norm, step_flops
    from .training.scalars import ScalarLog
    from .training.profiling import StepProfiler
    from .training.replica_check import check_weight_replicas
    from .training.timers import PhaseTimers, format_phases
    from .training.progress import ProgressLog
    from .checkpoint import non_persistent_root, remove_other_iterations
    from .layers.context_pruning import set_context_pruning_state
    from .training.rampup import step_batch
    from .training.step import context_pruning_alpha_at, empty_unused_memory, global_batch, moe_load_balancing_losses

    device = init_distributed(args)
    rank0 = dist.get_rank() == 0
    train_ds, valid_ds, test_ds, tokenizer = build_data(args)
    model, engine, start, loaded_from = build_model_and_engine(args, device, tokenizer)
    vocab = model.vocab_size
    experts = args.moe_router_topk / args.num_experts if args.num_experts else 1.0
    flops_per_step = step_flops(args, matmul_weight_elements(model, experts))
    scalars = ScalarLog(args, rank0)  # TensorBoard and/or Weights & Biases; false when neither
    if rank0:
        n_params = sum(p.numel() for p in model.parameters())
        print(f"megatron_fox: {device.type} world {dist.get_world_size()} (TP {args.tensor_model_parallel_size}, "
              f"PP {args.pipeline_model_parallel_size}, CP {args.context_parallel_size}, DP "
              f"{args.data_parallel_size}{', EP %d' % args.expert_model_parallel_size if args.num_experts else ''}); "
              f"params on rank 0: {n_params / 1e6:.2f}M; vocab {vocab}; "
              f"ACP {'log_eps=%g' % args.acp_log_eps if args.acp else 'off'}; model {flops_per_step / 1e12:.3g} TFLOP a "
              f"step; start step {start}", flush=True)
    history, saved_at, stopped = [], None, False
    progress = ProgressLog(args.save, loaded_from, start, dist.get_world_size()) if args.log_progress else None
    exit_request = _ExitRequest(args, device)
    bar = tqdm(total=args.train_iters, initial=start, disable=not (rank0 and args.progress_bar), dynamic_ncols=True)

    def evaluate(ds, name: str, step: int, record: dict) -> None:
        """eval_iters batches of ds: record[name + '_loss'], the log line, TensorBoard."""
        with collector.evaluation():
            losses = [engine.eval_step(global_batch(ds, e, args, tokenizer.eod, ramp=False))
                      for e in range(args.eval_iters)]
        empty_unused_memory(args, device, 1)
        loss = record[f"{name}_loss"] = sum(losses) / len(losses)
        if rank0:
            label = "validation" if name == "valid" else name
            bar.write(f"step {step:6d} | {label} loss {loss:.4f} | {label} ppl {math.exp(min(loss, 700.0)):.2f}")
            if scalars:
                scalars.add_scalar(f"{name}/loss", loss, step)
                scalars.add_scalar(f"{name}/ppl", math.exp(min(loss, 700.0)), step)

    timers = PhaseTimers(args.timing_log_level >= 1, device)
    engine.timers = timers
    profiler = StepProfiler(args, dist.get_rank(), device)
    snapshot_rank = dist.get_world_size() - 1  # Megatron-LM's: the last rank writes the memory snapshot
    if args.record_memory_history:
        torch.cuda.memory._record_memory_history(max_entries=100_000)
    for it in range(start, start if args.skip_train else args.train_iters):
        profiler.step_begin(it)
        with timers.phase("batch-generator"):
            batches = global_batch(train_ds, it, args, tokenizer.eod)
        batch_size = step_batch(it, args.rampup_batch_size, args.global_batch_size)[1]  # ramp-up: < global
        step_share = batch_size / args.global_batch_size
        t0 = time.perf_counter()
        if args.fox_context_pruning:
            set_context_pruning_state(model, alpha=context_pruning_alpha_at(it, args))
        try:
            out = engine.train_step(batches, it)
        except FloatingPointError as e:  # --check-for-nan-in-loss-and-grad
            if rank0:
                bar.close()
                print(f"megatron_fox: error: {e}; stopped (config key 'check_for_nan_in_loss_and_grad'; last "
                      f"checkpoint: {f'step {saved_at}' if saved_at else 'none this run'})", file=sys.stderr)
            sys.exit(1)
        dt = time.perf_counter() - t0
        profiler.step_end(it)
        timers.step_done()
        empty_unused_memory(args, device, 1)
        balance = moe_load_balancing_losses(args, len(batches))
        if balance is not None:
            out["moe_load_balancing_loss"] = sum(balance.values()) / len(balance)
            if args.moe_per_layer_logging:
                out["moe_load_balancing_loss_by_layer"] = balance
        out.update(step=it + 1, global_batch_size=batch_size, tokens_per_s=batch_size * args.seq_length / dt,
                   tflops_per_gpu=flops_per_step * step_share / dt / dist.get_world_size() / 1e12,
                   model_flops=flops_per_step * step_share)
        history.append(out)
        if progress:
            progress.step(batch_size * args.seq_length, out["model_flops"], dt)
        if on_step is not None:
            on_step(it + 1, out)
        bar.update(1)
        bar.set_postfix(loss=f"{out['loss']:.3f}", tok_s=f"{out['tokens_per_s']:.0f}")
        if scalars and (it + 1) % args.tensorboard_log_interval == 0:
            for key in ("loss",) + (("lr",) if args.log_learning_rate_to_tensorboard else ()) + (
                    "grad_norm", "tokens_per_s", "tflops_per_gpu"):
                scalars.add_scalar(f"train/{key}", out[key], it + 1)
        if (it + 1) % args.log_interval == 0 or it + 1 == args.train_iters:
            skipped, bwd, kept, half_lives = _layer_stats(model)
            overall = sum(skipped.values()) / len(skipped) if skipped else 0.0
            out["acp_skipped"], out["acp_skipped_by_layer"] = overall, skipped
            if half_lives:
                out["gate_half_life_by_layer"] = half_lives
            out["acp_bwd_skipped"] = sum(bwd.values()) / len(bwd) if bwd else 0.0
            extra = f"global batch size {batch_size} | " if args.rampup_batch_size else ""
            if kept:
                out["dcp_kept"], out["dcp_kept_by_layer"] = sum(kept.values()) / len(kept), kept
                out["dcp_alpha"] = context_pruning_alpha_at(it, args)
                extra = (f"context kept {out['dcp_kept']:.3f} (by layer: {' '.join(f'{v:.2f}' for v in kept.values())}"
                         f", alpha {out['dcp_alpha']:.2f}) | ")
            if "moe_load_balancing_loss" in out:
                extra += f"load balancing loss {out['moe_load_balancing_loss']:.3f} | "
            if args.log_params_norm:
                out["params_norm"] = params_l2_norm(model)
                extra += f"params norm {out['params_norm']:.3f} | "
            if "num_zeros_in_grad" in out:
                extra += f"num zeros {out['num_zeros_in_grad']} | "
            phase_ms = timers.report()  # per phase, every rank's
            if phase_ms:
                out["timers_ms"] = {name: max(v) for name, v in phase_ms.items()}
                out["timers_ms_by_rank"] = phase_ms
                extra += format_phases(phase_ms, args.timing_log_option)
            if args.record_memory_history and dist.get_rank() == snapshot_rank:
                torch.cuda.memory._dump_snapshot(args.memory_snapshot_path)
            if device.type == "cuda":  # this rank's peak so far: what --micro-batch-size / recompute trade
                out["max_mem_gb"] = torch.cuda.max_memory_allocated() / 2**30
                extra += f"mem {out['max_mem_gb']:.1f} GB | "
            if rank0:
                bar.write(f"step {it + 1:6d} | loss {out['loss']:.4f} | lr {out['lr']:.3e} | grad norm "
                          f"{out['grad_norm']:.3f} | tokens/s {out['tokens_per_s']:.0f} | "
                          f"TFLOP/s/GPU {out['tflops_per_gpu']:.3g} | {extra}"
                          f"attention skipped fwd {overall:.3f} bwd {out['acp_bwd_skipped']:.3f} "
                          f"(by layer: {' '.join(f'{v:.2f}' for v in skipped.values())})")
                if scalars:
                    for key in ("max_mem_gb", "params_norm", "num_zeros_in_grad", "dcp_kept", "dcp_alpha",
                                "moe_load_balancing_loss") + (
                            ("global_batch_size",) if args.rampup_batch_size or args.log_batch_size_to_tensorboard
                            else ()):
                        if key in out:
                            scalars.add_scalar(f"train/{key}", out[key], it + 1)
                    if args.log_world_size_to_tensorboard:
                        scalars.add_scalar("train/world_size", dist.get_world_size(), it + 1)
                    scalars.add_scalar("acp/skipped_fraction", overall, it + 1)
                    scalars.add_scalar("acp/backward_skipped_fraction", out["acp_bwd_skipped"], it + 1)
                    for layer, frac in skipped.items():
                        scalars.add_scalar(f"acp/skipped_fraction_layer_{layer:02d}", frac, it + 1)
                    if args.log_timers_to_tensorboard:
                        for name, ms in out["timers_ms"].items():
                            scalars.add_scalar(f"timers/{name}", ms, it + 1)
                    for layer, value in half_lives.items():
                        scalars.add_scalar(f"fox/gate_half_life_layer_{layer:02d}", value, it + 1)
                    for layer, value in out.get("moe_load_balancing_loss_by_layer", {}).items():
                        scalars.add_scalar(f"moe/load_balancing_loss_layer_{layer:02d}", value, it + 1)
        if args.check_weight_hash_across_dp_replicas_interval and \
                (it + 1) % args.check_weight_hash_across_dp_replicas_interval == 0:
            with getattr(engine, "params_synced", contextlib.nullcontext)():
                check_weight_replicas(model, it + 1, device)
        collector.after_step(it + 1)
        # validation every eval_interval steps and after the last one (as Megatron-LM at the end)
        last = it + 1 == args.train_iters
        if args.eval_interval and args.eval_iters and ((it + 1) % args.eval_interval == 0 or last):
            evaluate(valid_ds, "valid", it + 1, out)
        stop = args.exit_interval is not None and it + 1 >= args.exit_interval
        why = exit_request()
        if why is not None:
            stop = True
            if rank0:
                bar.write(f"step {it + 1:6d} | exit requested ({'SIGTERM' if why == 'signal' else 'exit_duration_in_mins'}):"
                          f" saving to {args.save}")
        if args.save and ((args.save_interval and (it + 1) % args.save_interval == 0) or stop):
            engine.save(args.save, it + 1)
            saved_at = it + 1
            if progress:
                progress.saved(args.save, it + 1)
        elif args.non_persistent_save_interval and (it + 1) % args.non_persistent_save_interval == 0:
            root = non_persistent_root(args.non_persistent_global_ckpt_dir, args.save)
            engine.save(root, it + 1)
            remove_other_iterations(root, it + 1)  # the tracker names the new one already
            if progress:
                progress.saved(root, it + 1)
        if stop:
            stopped = it + 1 < args.train_iters  # cut short: no test pass (as Megatron-LM on exit)
            break
    profiler.stop()  # training ended inside the window
    bar.close()
    if args.skip_train:  # the loaded model, evaluated at its step
        history.append({"step": start})
        if valid_ds is not None and args.eval_iters:
            evaluate(valid_ds, "valid", start, history[-1])
    elif args.save and history and saved_at != history[-1]["step"]:  # the final state, unless just saved
        engine.save(args.save, history[-1]["step"])
        if progress:
            progress.saved(args.save, history[-1]["step"])
    if test_ds is not None and history and not stopped:  # as Megatron-LM: the test data once, after training
        evaluate(test_ds, "test", history[-1]["step"], history[-1])
    scalars.close()
    return history


def main(argv=None) -> None:
    args = parse_or_exit(argv)
    run(args)
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
