"""Command line and YAML configuration with Megatron-LM flag names.

Precedence: built-in defaults < YAML file (--config) < command-line flags. YAML keys are
the flag names with underscores (``tensor_model_parallel_size: 2``). Any bad value ends
the program with one line naming the key and exit code 2.
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import importlib.util
import json
import os
import re
import sys
from typing import Any, Optional

import yaml

from .rampup import ramp_sizes, steps_for_samples


class ConfigError(ValueError):
    """A bad configuration value; str() is the one-line message naming the key."""

    def __init__(self, key: str, message: str):
        super().__init__(f"config key '{key}': {message}")
        self.key = key


def unsaved_state(path: str, what: str, flag: str) -> ConfigError:
    """The error for a --load that asks a checkpoint (path) for the `what` state it was saved
    without (--no-save-<flag>): it names load_<flag> and the flags that load it."""
    return ConfigError(f"load_{flag}", f"{path} holds no {what} state (saved with --no-save-{flag}): add "
                                       f"--no-load-{flag}, or --finetune for the weights only")


# name: (type, default, help). Booleans become --flag / --no-flag.
OPTIONS: dict[str, tuple[Any, Any, str]] = {
    # model
    "num_layers": (int, 2, "transformer layers"),
    "hidden_size": (int, 128, "model width"),
    "ffn_hidden_size": (int, None, "MLP width (default 4 * hidden_size * 2/3 rounded to 256)"),
    "num_attention_heads": (int, 4, "query heads"),
    "num_query_groups": (int, None, "key/value heads (grouped-query attention); default = heads"),
    "kv_channels": (int, None, "head dim; default hidden_size / heads"),
    "norm_epsilon": (float, 1e-6, "RMSNorm epsilon"),
    "init_method_std": (float, 0.02, "std of the normal init"),
    "vocab_size": (int, None, "vocabulary size; default from the tokenizer"),
    "make_vocab_size_divisible_by": (int, 128, "pad the vocabulary to a multiple of this"),
    "untie_embeddings_and_output_weights": (bool, True, "separate input and output embeddings"),
    "transformer_impl": (str, "auto", "auto | local | transformer_engine"),
    "hybrid_layer_pattern": (str, None, "build Megatron-Core's HybridModel from this pattern instead of GPTModel: "
                                        "'*' a FoX attention layer, '-' an MLP layer, one symbol a layer "
                                        "('*-' * N is the N-layer FoX GPTModel); megatron-core >= 0.17"),
    # FoX / ACP
    "fox_forget_gate": (bool, True, "the forget gate (FoX); --no-fox-forget-gate with --position-embedding-type "
                                    "rope: the Transformer baseline (softmax attention, torch SDPA on CUDA, no ACP)"),
    "fox_output_gate": (bool, True, "FoX-Pro output gate"),
    "fox_output_norm": (bool, True, "FoX-Pro per-head output RMS norm"),
    "fox_qk_norm": (bool, True, "FoX-Pro QK-norm"),
    "fox_qk_norm_eps": (float, 1e-5, "epsilon of the QK-norm (the public FoX code's 1e-5)"),
    "fox_kv_shift": (bool, True, "FoX-Pro data-dependent k/v token shift"),
    "fox_fgate_bias_init": (float, 0.0, "initial forget-gate bias"),
    "fox_forget_gate_type": (str, "data_dependent", "data_dependent (FoX) | data_independent (a learned log f per "
                                                    "head, from ALiBi's slopes) | alibi (fixed: ALiBi's bias); the "
                                                    "FoX paper's ablations"),
    "fox_fuse_extras": (bool, True, "torch.compile the FoX-Pro shift/norm/gate work and SwiGLU (CUDA only)"),
    "acp": (bool, True, "Adaptive Computation Pruning on (off without the forget gate: nothing to prune)"),
    "acp_log_eps": (float, -10.0, "ACP tolerance log(eps)"),
    "acp_logit_bound": (str, "qk_norm", "qk_norm | data"),
    "acp_backward_pruning": (str, "lse", "lse (the backward also prunes by the rows' log-sum-exp) | bound"),
    "fox_context_pruning": (bool, False, "learned dynamic context pruning (Anagnostidis et al. 2023): per layer "
                                         "interaction projections learn which tokens later ones drop; "
                                         "materialised attention, for fine-tuning at short seq_length"),
    "fox_context_pruning_dim": (int, 64, "width r of the interaction queries and keys"),
    "fox_context_pruning_beta_init": (float, 2.0, "initial bias of the keep score"),
    "fox_context_pruning_lambda": (float, 0.3, "weight of the sparsity penalty (mean kept fraction of the "
                                               "prunable pairs, averaged over layers)"),
    "fox_context_pruning_alpha": (float, 8.0, "the sparse sigmoid's final alpha (1: sigmoid; larger: hard 0/1 "
                                              "decisions sooner)"),
    "fox_context_pruning_alpha_iters": (int, None, "steps of the cosine rise of alpha from 1 to its final "
                                                   "value (default: train_iters; 0: final alpha at once)"),
    # parallelism
    "tensor_model_parallel_size": (int, 1, "tensor-parallel ranks"),
    "pipeline_model_parallel_size": (int, 1, "pipeline stages"),
    "decoder_first_pipeline_num_layers": (int, None, "uneven pipeline split: layers on the first stage (the "
                                                     "others share the rest evenly), as Megatron-LM"),
    "decoder_last_pipeline_num_layers": (int, None, "uneven pipeline split: layers on the last stage"),
    "account_for_embedding_in_pipeline_split": (bool, False, "count the embedding as a layer of an even pipeline "
                                                             "split (the first stage builds one layer less)"),
    "account_for_loss_in_pipeline_split": (bool, False, "count the loss as a layer of an even pipeline split (the "
                                                        "last stage builds one layer less)"),
    "context_parallel_size": (int, 1, "context-parallel ranks"),
    "cp_comm_type": (str, "p2p", "context-parallel communication: p2p (ring, skips pruned chunks) | a2a "
                                 "(heads over ranks, dealt by estimated ACP cost)"),
    "fox_cp_skip_chunks": (bool, True, "p2p ring: skip the transfers and blocks ACP prunes wholly"),
    "sequence_parallel": (bool, False, "sequence parallel (needs TP > 1)"),
    "use_distributed_optimizer": (bool, True, "Megatron distributed optimizer (CUDA path)"),
    "deepspeed": (bool, False, "train with DeepSpeed's ZeRO (pip install deepspeed) instead of Megatron's DDP and "
                               "distributed optimizer, as Megatron-DeepSpeed's flag; TP and CP kept, no PP or SP"),
    "zero_stage": (int, 1, "with deepspeed: the ZeRO stage, 0-3"),
    "deepspeed_config": (str, None, "with deepspeed: a JSON file merged over the config the flags give"),
    "overlap_grad_reduce": (bool, False, "start each gradient bucket's data-parallel reduce while the backward "
                                         "still runs (Megatron DDP; CUDA path)"),
    "overlap_param_gather": (bool, False, "all-gather the updated parameters bucket by bucket during the next "
                                          "forward (needs the distributed optimizer and --overlap-grad-reduce; "
                                          "CUDA path)"),
    "ddp_bucket_size": (int, None, "elements per gradient bucket (default: Megatron's, max(4e7, 1e6 * DP))"),
    "recompute_granularity": (str, None, "full: keep only layer inputs and recompute the layers in the backward "
                                         "(Megatron's activation checkpointing; FoX attention keeps no [s, s] "
                                         "tensor, so 'selective' has nothing to save)"),
    "recompute_method": (str, "uniform", "with recompute_granularity full: uniform | block"),
    "recompute_num_layers": (int, 1, "uniform: layers per recomputed chunk; block: layers recomputed per stage"),
    # training
    "seq_length": (int, 256, "tokens per sample"),
    "micro_batch_size": (int, 4, "samples per micro-batch"),
    "global_batch_size": (int, 8, "samples per step over all data-parallel ranks"),
    "train_iters": (int, 200, "optimizer steps"),
    "train_samples": (int, None, "train on this many sequences instead: train_iters = ceil(samples / "
                                 "global_batch_size), counting the ramp-up's smaller batches if any"),
    "rampup_batch_size": (list, None, "START INCREMENT SAMPLES: the global batch ramps from START sequences by "
                                      "INCREMENT to global_batch_size over SAMPLES consumed sequences, as "
                                      "Megatron-LM's (the LR schedule follows the consumed sequences)"),
    "lr": (float, 2e-3, "peak learning rate"),
    "min_lr": (float, 0.0, "final learning rate"),
    "decoupled_lr": (float, None, "peak learning rate of the embedding and output layers (their own schedule, "
                                  "same shape; default: lr)"),
    "decoupled_min_lr": (float, None, "final learning rate of the embedding and output layers (default: min_lr)"),
    "lr_warmup_iters": (int, 20, "linear warmup steps"),
    "lr_warmup_init": (float, 0.0, "the learning rate the warmup starts from (it rises linearly to lr), as "
                                   "Megatron-LM's"),
    "lr_warmup_samples": (int, None, "warmup in sequences (instead of lr_warmup_iters)"),
    "lr_warmup_fraction": (float, None, "warmup as a fraction of the decay length (instead of lr_warmup_iters)"),
    "lr_decay_iters": (int, None, "decay length; default train_iters"),
    "lr_decay_samples": (int, None, "decay length in sequences (instead of lr_decay_iters)"),
    "lr_decay_style": (str, "cosine", "cosine | linear | constant | inverse-square-root | WSD (warmup, then "
                                      "stable at lr, then the last lr_wsd_decay_iters steps before lr_decay_iters "
                                      "down to min_lr)"),
    "lr_wsd_decay_style": (str, "exponential", "WSD's final decay: exponential | linear | cosine | minus_sqrt"),
    "lr_wsd_decay_iters": (int, None, "WSD: steps of the final decay"),
    "lr_wsd_decay_samples": (int, None, "WSD: the final decay in sequences (instead of lr_wsd_decay_iters)"),
    "weight_decay": (float, 0.1, "AdamW weight decay (not on norms and biases)"),
    "start_weight_decay": (float, None, "weight decay at the start of an increasing schedule "
                                        "(weight_decay_incr_style linear or cosine)"),
    "end_weight_decay": (float, None, "weight decay at the end of training (train_iters) of that schedule"),
    "weight_decay_incr_style": (str, "constant", "constant (weight_decay throughout) | linear | cosine (from "
                                                 "start_weight_decay to end_weight_decay over train_iters)"),
    "adam_beta1": (float, 0.9, "AdamW beta1"),
    "adam_beta2": (float, 0.95, "AdamW beta2"),
    "adam_eps": (float, 1e-8, "AdamW epsilon"),
    "clip_grad": (float, 1.0, "gradient-norm clip"),
    "bf16": (bool, False, "bf16 parameters and compute (CUDA path)"),
    "fp16": (bool, None, "refused: fp16 with loss scaling is not built here; use bf16"),
    "seed": (int, 1234, "random seed"),
    "device": (str, "auto", "auto | cpu | cuda"),
    # Mixture of Experts (Megatron-Core's MoELayer in place of the dense MLP)
    "num_experts": (int, None, "Mixture-of-Experts: experts per layer (SwiGLU each) in place of the dense MLP"),
    "moe_ffn_hidden_size": (int, None, "an expert's hidden size (default ffn_hidden_size)"),
    "moe_router_topk": (int, 2, "experts each token goes to"),
    "moe_router_load_balancing_type": (str, "aux_loss", "aux_loss (Switch/GShard, per micro-batch) | seq_aux_loss "
                                                        "(per sequence) | none"),
    "moe_aux_loss_coeff": (float, 1e-2, "weight of the load-balancing loss"),
    "moe_z_loss_coeff": (float, None, "weight of the router's z-loss (ST-MoE); none: off"),
    "moe_token_dispatcher_type": (str, "allgather", "allgather | alltoall (alltoall: CUDA)"),
    "moe_router_pre_softmax": (bool, False, "softmax over all experts before the top-k (else over the top-k)"),
    "moe_router_score_function": (str, "softmax", "softmax | sigmoid (DeepSeek-V3's scores; the top-k weights "
                                                  "normalised to sum 1 where topk > 1)"),
    "moe_router_enable_expert_bias": (bool, False, "aux-loss-free balancing (DeepSeek-V3): a per-expert bias "
                                                   "added to the scores for the top-k choice only, moved each "
                                                   "step by moe_router_bias_update_rate toward equal loads; "
                                                   "needs the sigmoid score function"),
    "moe_router_bias_update_rate": (float, 1e-3, "the expert bias's step per global batch"),
    "moe_router_topk_scaling_factor": (float, None, "multiplies the routing weights (DeepSeek-V3: 2.5)"),
    "moe_router_num_groups": (int, None, "group-limited routing (DeepSeek-V2/V3): the experts in this many equal "
                                         "groups (e.g. the EP ranks or nodes), each token's experts from "
                                         "moe_router_group_topk of them"),
    "moe_router_group_topk": (int, None, "groups a token's experts come from (the groups of highest sum of "
                                         "their top moe_router_topk / moe_router_group_topk scores)"),
    "moe_layer_freq": (str, "1", "which layers get experts, as Megatron-LM: N (layers 0, N, 2N, ...) or a Python "
                                 "list expression of 0/1 per layer, e.g. '([1]*3+[0])*2'"),
    "moe_shared_expert_intermediate_size": (int, None, "a shared expert of this hidden size every token runs "
                                                       "through beside its routed ones (none: no shared expert)"),
    "moe_per_layer_logging": (bool, False, "also each MoE layer's load-balancing loss (record and TensorBoard "
                                           "moe/load_balancing_loss_layer_NN)"),
    "moe_expert_capacity_factor": (float, None, "token dropping: each expert takes at most ceil(factor x tokens x "
                                                "topk / num_experts) of a router call's tokens (a micro-batch's, or "
                                                "its TP/CP part); none: dropless"),
    "moe_token_drop_policy": (str, "probs", "with a capacity factor, which tokens an expert keeps: probs (the "
                                            "highest router weights) | position (Megatron-Core's topk over the "
                                            "routing map)"),
    "moe_pad_expert_input_to_capacity": (bool, False, "with a capacity factor, every expert gets exactly its "
                                                      "capacity of rows (zero-weighted padding)"),
    "moe_grouped_gemm": (bool, False, "the experts as two grouped GEMMs (torch._grouped_mm: bf16 on Hopper or "
                                      "newer, or CPU; elsewhere one after another) instead of SequentialMLP's loop"),
    "expert_model_parallel_size": (int, 1, "experts split over this many data/context-parallel ranks (tokens "
                                           "dispatched to their experts' rank); must divide num_experts"),
    "expert_tensor_parallel_size": (int, None, "Megatron-LM's expert tensor parallelism; the experts are split "
                                               "like the dense layers here, so only tensor_model_parallel_size "
                                               "(the default) is available"),
    # data
    "data_path": (list, None, "Megatron indexed dataset prefix, or a blend as in Megatron-LM: 'W1 PREFIX1 W2 "
                              "PREFIX2 ...' (weights) or 'PREFIX1 PREFIX2 ...' (weighted by tokens); "
                              "none: the embedded default corpus"),
    "train_data_path": (list, None, "training data of its own (a prefix or blend as data_path), with "
                                    "valid_data_path: each split from its own files, split ignored"),
    "valid_data_path": (list, None, "validation data of its own (with train_data_path)"),
    "test_data_path": (list, None, "test data of its own (with train_data_path), evaluated after training"),
    "data_args_path": (str, None, "a file holding what data_path would (the blend as whitespace-separated "
                                  "words): for blends too long for a command line"),
    "per_split_data_args_path": (str, None, "a JSON file {\"train\": [...], \"valid\": [...], \"test\": [...]} "
                                            "holding what train/valid/test_data_path would"),
    "tokenizer_type": (str, "SentencePieceTokenizer", "SentencePieceTokenizer (tokenizer_model; "
                                                      "GPTSentencePieceTokenizer and Llama2Tokenizer the same) | "
                                                      "GPT2BPETokenizer (vocab_file, merge_file) | "
                                                      "NullTokenizer (vocab_size ids; end of document = vocab_size) | "
                                                      "HuggingFaceTokenizer (tokenizer_model: a directory or hub "
                                                      "name; needs transformers)"),
    "mock_data": (bool, False, "Megatron-LM's synthetic data: random documents of random ids, no corpus or "
                               "tokenizer to build (with tokenizer_type NullTokenizer and vocab_size), for "
                               "throughput runs"),
    "tokenizer_model": (str, None, "SentencePiece model; needed with data_path"),
    "vocab_file": (str, None, "GPT-2 vocab.json (GPT2BPETokenizer)"),
    "merge_file": (str, None, "GPT-2 merges.txt (GPT2BPETokenizer)"),
    "split": (str, "98,1,1", "train,valid,test weights"),
    "data_cache_path": (str, None, "dataset index cache (default: next to the data)"),
    "num_dataset_builder_threads": (int, 1, "threads building a blend's datasets (Megatron-Core's "
                                            "BlendedMegatronDatasetBuilder)"),
    "reset_attention_mask": (bool, True, "restart attention and the forget gate at each document"),
    "reset_position_ids": (bool, False, "accepted with reset_attention_mask (or without position embeddings): "
                                        "rope's attention within a document is the same whichever position it "
                                        "starts from"),
    "eod_mask_loss": (bool, False, "no loss where the input token is the end of a document (its target, the "
                                   "next document's first token, is not predictable), as Megatron-LM's"),
    "default_corpus_bytes": (int, 4_000_000, "bytes of the embedded corpus (Python stdlib source)"),
    "default_vocab_size": (int, 2048, "vocabulary of the tokenizer trained on the embedded corpus"),
    # logging and checkpoints
    "log_interval": (int, 10, "steps between log lines"),
    "check_for_nan_in_loss_and_grad": (bool, True, "stop the run at a non-finite loss or gradient norm, before "
                                                   "that step's update where the engine allows, as Megatron-LM's"),
    "log_params_norm": (bool, False, "the parameters' L2 norm in each log line (one reduction over TP x PP)"),
    "tensorboard_dir": (str, None, "TensorBoard event directory"),
    "tensorboard_log_interval": (int, 1, "steps between TensorBoard's loss, lr, grad norm and throughput "
                                         "scalars (the per-layer ACP figures come with each log line)"),
    "wandb_project": (str, None, "Weights & Biases project: the TensorBoard scalars also go there (rank 0; needs "
                                 "the wandb package)"),
    "wandb_exp_name": (str, None, "with wandb_project: the run's name"),
    "wandb_entity": (str, None, "with wandb_project: the team or user it belongs to (default: wandb's)"),
    "wandb_save_dir": (str, None, "with wandb_project: where wandb keeps the run's files (default: wandb's)"),
    "distributed_timeout_minutes": (int, 30, "timeout of the process group's collectives"),
    "save": (str, None, "checkpoint directory to save to"),
    "load": (str, None, "checkpoint directory to resume from; one without a checkpoint yet (a first launch with "
                        "--save and --load the same) starts from scratch, saying so"),
    "finetune": (bool, False, "with load: the model weights only, from step 0 with a fresh optimizer and "
                              "schedule (e.g. continued training at a longer seq_length)"),
    "load_optim": (bool, True, "with load: also the optimizer state (--no-load-optim: a fresh one)"),
    "load_rng": (bool, True, "with load: also the RNG state (CPU path; the CUDA path saves none)"),
    "exit_on_missing_checkpoint": (bool, False, "with load: stop (exit 2) when it holds no checkpoint instead of "
                                                "starting from scratch, as Megatron-LM's"),
    "ckpt_step": (int, None, "with load: the iteration to load instead of the latest, as Megatron-LM's"),
    "use_checkpoint_args": (bool, False, "with load: the model's shape and tokenizer flags from the checkpoint's "
                                         "args.json (flags given here still win), as Megatron-LM's"),
    "pretrained_checkpoint": (str, None, "initial weights: a full (TP=PP=1) state dict file, e.g. from "
                              "tools/convert_checkpoint.py (sharded to this run's TP/PP; --load wins)"),
    "save_interval": (int, None, "steps between checkpoints"),
    "non_persistent_save_interval": (int, None, "steps between non-persistent checkpoints, as Megatron-LM's: only "
                                                "the newest is kept, and a resume takes it where it is at least as "
                                                "new as load's (a step that also saves persistently does not)"),
    "non_persistent_ckpt_type": (str, None, "global: non-persistent checkpoints in non_persistent_global_ckpt_dir "
                                            "(local and in_memory are not built)"),
    "non_persistent_global_ckpt_dir": (str, None, "where global non-persistent checkpoints go and are resumed from "
                                                  "(default: <save>/non_persistent, resumed from <load>/"
                                                  "non_persistent)"),
    "save_optim": (bool, True, "with save: also the optimizer state (--no-save-optim: weights and step only, a "
                               "smaller checkpoint to hand on; it loads with --no-load-optim or --finetune)"),
    "save_rng": (bool, True, "with save: also the RNG state (CPU path; the CUDA path saves none)"),
    "eval_interval": (int, None, "steps between validation passes"),
    "eval_iters": (int, 2, "validation steps a pass (and test steps, after training, where there is test data)"),
    "skip_train": (bool, False, "no training steps: evaluate the (loaded) model on the validation and test "
                                "data and exit, as Megatron-LM's"),
    "exit_interval": (int, None, "stop (after saving) at this step"),
    "manual_gc": (bool, False, "Python's automatic garbage collection off; collect at the same steps on every rank "
                               "(manual_gc_interval, around evaluations), as Megatron-LM's"),
    "manual_gc_interval": (int, 0, "with manual_gc: steps between collections (0: none between steps)"),
    "manual_gc_eval": (bool, True, "with manual_gc: collect before and after each evaluation"),
    "exit_signal_handler": (bool, False, "on SIGTERM (SLURM's warning before the time limit, e.g. sbatch "
                                         "--signal=TERM@300) save at the end of the current step and exit 0"),
    "exit_duration_in_mins": (float, None, "save and exit once training has run this many minutes"),
    "progress_bar": (bool, True, "tqdm progress bar on rank 0"),
    "log_num_zeros_in_grad": (bool, False, "the number of zero entries in the gradients (before clipping, each "
                                           "tensor-parallel shard counted once) in each log line and TensorBoard, "
                                           "as Megatron-LM's"),
    "check_weight_hash_across_dp_replicas_interval": (int, None, "every N steps compare a hash of each weight "
                                                                 "across the data-parallel replicas and stop the "
                                                                 "run naming those that differ, as Megatron-LM's"),
    "tensorboard_queue_size": (int, 1000, "TensorBoard events held before a write (SummaryWriter's max_queue)"),
    "empty_unused_memory_level": (int, 0, "CUDA caching allocator: 0 keeps freed blocks; 1 empties the cache after "
                                          "each training step and evaluation pass; 2 also between a step's "
                                          "forward-backward and its optimizer update (Megatron engine), as "
                                          "Megatron-LM's levels"),
    "profile": (bool, False, "profile the steps profile_step_start .. profile_step_end - 1 (0-based iterations) "
                             "on profile_ranks: a CUDA profiler-API range for nsys --capture-range=cudaProfilerApi, "
                             "or with use_pytorch_profiler a torch.profiler trace a rank in tensorboard_dir"),
    "profile_step_start": (int, 10, "with profile: the first profiled iteration"),
    "profile_step_end": (int, 12, "with profile: the iteration the profile stops before"),
    "profile_ranks": (list, None, "with profile: the global ranks to profile (default 0)"),
    "use_pytorch_profiler": (bool, False, "with profile: torch.profiler traces (CPU and CUDA activity) into "
                                          "tensorboard_dir instead of an nsys range"),
    # Megatron-LM script flags with one meaning in this model: accepted with that value (so
    # existing launch scripts run), any other value stops naming the key (see _FIXED)
    "normalization": (str, "RMSNorm", "RMSNorm (the FoX-Pro model's)"),
    "position_embedding_type": (str, "none", "none (FoX's forget gate replaces position embeddings) | rope"),
    "rotary_base": (int, 10000, "with position_embedding_type rope: the base of its frequencies"),
    "rotary_percent": (float, 1.0, "with position_embedding_type rope: the share of each head's channels it turns"),
    "swiglu": (bool, True, "SwiGLU MLP (the FoX-Pro model's)"),
    "disable_bias_linear": (bool, True, "linear layers have no bias"),
    "attention_dropout": (float, 0.0, "0: the FoX kernels apply no dropout"),
    "hidden_dropout": (float, 0.0, "0: the FoX-Pro configs train without dropout"),
    "attention_softmax_in_fp32": (bool, True, "always (the kernels accumulate in float32)"),
    "calculate_per_token_loss": (bool, True, "always: the loss is the mean over all the global batch's loss tokens "
                                             "(each micro-batch's sum, divided once), so no TP/PP/DP/micro-batch "
                                             "split changes the gradient; Megatron-LM's default averages each "
                                             "micro-batch first"),
    "max_position_embeddings": (int, None, "accepted, unused: no position embedding"),
    "group_query_attention": (bool, None, "accepted: num_query_groups sets the key/value heads"),
    "use_mcore_models": (bool, None, "accepted: the models are Megatron-Core's"),
    "use_flash_attn": (bool, None, "accepted: FoX attention is its own Triton kernel"),
    "rope_fusion": (bool, None, "accepted: rotary embeddings (position_embedding_type rope) run unfused, "
                                "Megatron-Core's apply_rope_fusion off"),
    "async_tensor_model_parallel_allreduce": (bool, None, "accepted: Megatron-Core's linears overlap as they do"),
    "one_logger": (bool, None, "accepted, unused: NVIDIA's one-logger is not part of this trainer"),
    "local_rank": (int, None, "accepted (torch.distributed.launch passes it): LOCAL_RANK from the environment "
                              "is what counts"),
    "persist_layer_norm": (bool, None, "accepted: Apex's persistent LayerNorm kernel; the norms are "
                                       "Megatron-Core's (RMSNorm)"),
    "auto_detect_ckpt_format": (bool, None, "accepted: a resume reads the format its engine writes"),
    "dist_ckpt_strictness": (str, "assume_ok_unexpected", "assume_ok_unexpected (Megatron-LM's default, the only "
                                                          "one here): a tensor the model needs and the checkpoint "
                                                          "lacks stops the load"),
    "distributed_backend": (str, None, "nccl | gloo, accepted: CUDA runs use NCCL, CPU runs gloo"),
    "attention_backend": (str, "auto", "auto | flash | fused | unfused | local, accepted: FoX attention is its own "
                                       "kernel whatever the choice"),
    "ckpt_format": (str, "torch_dist", "torch_dist: Megatron-Core's dist_checkpointing (the CPU path writes "
                                       "per-rank torch files)"),
    "accumulate_allreduce_grads_in_fp32": (bool, None, "accepted: gradients are always reduced in float32"),
    "log_throughput": (bool, None, "accepted: tokens/s and TFLOP/s are always logged"),
    "log_validation_ppl_to_tensorboard": (bool, None, "accepted: valid/ppl is always written"),
    "log_memory_to_tensorboard": (bool, None, "accepted: the peak memory is always written (CUDA)"),
    "log_timers_to_tensorboard": (bool, False, "the per-phase timers (--timing-log-level 1) to TensorBoard too"),
    "timing_log_option": (str, "minmax", "the timers on the log line: max (the slowest rank's), minmax (min and max "
                                         "over ranks) or all (every rank's)"),
    "timing_log_level": (int, 0, "0: no per-phase timers; 1 (and 2: no finer timers here): batch generation, "
                                 "forward-backward and optimizer ms per step on each log line (over ranks as "
                                 "--timing-log-option says; CUDA syncs at phase edges)"),
    "masked_softmax_fusion": (bool, None, "accepted: FoX attention has no masked-softmax kernel"),
    "bias_gelu_fusion": (bool, None, "accepted: no GeLU (SwiGLU MLP), no bias"),
    "bias_swiglu_fusion": (bool, None, "accepted: the SwiGLU's fusion follows --fox-fuse-extras"),
    "bias_dropout_fusion": (bool, None, "accepted: no bias, no dropout"),
    "gradient_accumulation_fusion": (bool, None, "accepted: Megatron-Core's local linears accumulate in "
                                                 "float32 either way"),
    "num_workers": (int, None, "accepted: samples are read in the training process"),
    "recompute_activations": (bool, None, "Megatron-LM's selective recompute: refused, as "
                                          "recompute_granularity selective"),
    "dataloader_type": (str, "single", "single: each step takes the samples after the last step's, in order "
                                       "(Megatron-LM's default sampler); cyclic and external are not built"),
    "rerun_mode": (str, "disabled", "disabled: Megatron-Core's rerun state machine only validates (a non-finite "
                                    "loss or gradient stops the run); its re-running modes are not built"),
    "deterministic_mode": (bool, False, "bit-reproducible runs: torch's deterministic algorithms, cuBLAS's fixed "
                                        "workspace, NCCL_ALGO Ring (unless set), Inductor's deterministic mode; "
                                        "not with fox_context_pruning (its kernels add with atomics)"),
    "ckpt_fully_parallel_save": (bool, False, "Megatron engine: spread the writing of weights that the data-parallel "
                                              "ranks share over those ranks (Megatron-Core's fully parallel save "
                                              "strategy); the checkpoint is the same"),
    "ckpt_fully_parallel_load": (bool, False, "Megatron engine: each data-parallel rank reads a share of the shared "
                                              "weights and they exchange them"),
    "ckpt_assume_constant_structure": (bool, False, "with ckpt_fully_parallel_save: plan the split of the writes "
                                                    "once and reuse it at every save"),
    "override_opt_param_scheduler": (bool, False, "on resume, the learning-rate and weight-decay schedule of this "
                                                  "run's flags, whatever the checkpoint's"),
    "use_checkpoint_opt_param_scheduler": (bool, False, "on resume, the learning-rate and weight-decay schedule "
                                                        "saved with the checkpoint, whatever this run's flags say"),
    "log_progress": (bool, False, "a line in <save>/progress.txt at each job start and checkpoint: tokens and "
                                  "floating-point operations so far over all the run's jobs, TFLOP/s/GPU of this "
                                  "job and of all"),
    "record_memory_history": (bool, False, "CUDA: record the caching allocator's history from the start; each "
                                           "log line then writes its snapshot to memory_snapshot_path (the last "
                                           "rank's; open it at pytorch.org/memory_viz)"),
    "memory_snapshot_path": (str, "snapshot.pickle", "where record_memory_history writes the snapshot"),
    "create_attention_mask_in_dataloader": (bool, None, "accepted: no mask is made (FoX attention is causal and "
                                                        "restarts at document starts by itself)"),
    "tiktoken_pattern": (str, None, "accepted, unused: no TikTokenizer here"),
    "qk_layernorm": (bool, None, "Megatron-LM's QK layer norm: the same as fox_qk_norm (RMSNorm over the head "
                                 "dim, as --normalization RMSNorm)"),
    "optimizer": (str, "adam", "adam: AdamW (decoupled weight decay), Megatron-LM's adam; sgd is not built"),
    "use_dist_ckpt": (bool, None, "Megatron-LM's older flag: checkpoints are dist_checkpointing's torch_dist "
                                  "anyway"),
    "cross_entropy_loss_fusion": (bool, False, "Megatron-Core's fused vocab-parallel cross entropy (one kernel "
                                               "set for the softmax, target logit and loss)"),
    "cross_entropy_fusion_impl": (str, "native", "native (Megatron-Core's) | te (Transformer Engine's; needs it)"),
    "mmap_bin_files": (bool, True, "memory-map the indexed datasets' .bin files (--no-mmap-bin-files reads "
                                   "each sample with file reads: for file systems where mmap is slow)"),
    "log_world_size_to_tensorboard": (bool, False, "write the number of processes to TensorBoard (world-size)"),
    "log_learning_rate_to_tensorboard": (bool, True, "train/lr to TensorBoard (--no-log-learning-rate-to-tensorboard "
                                                     "leaves it out)"),
    "log_batch_size_to_tensorboard": (bool, False, "train/global_batch_size to TensorBoard at each log line (always "
                                                   "so with rampup_batch_size)"),
    "use_rotary_position_embeddings": (bool, None, "Megatron-LM's older flag: the same as position_embedding_type "
                                                   "rope"),
    "position_embedding": (bool, None, "Megatron-LM's older --no-position-embedding: accepted (FoX needs none); "
                                       "--position-embedding (learned absolute) is refused"),
}

# what --use-checkpoint-args takes from a checkpoint: the keys that shape the model's weights
# and its tokenizer (not ACP, lengths or the run's precision: those are this run's choice)
CHECKPOINT_ARG_KEYS = (
    "num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups", "kv_channels",
    "norm_epsilon", "vocab_size", "make_vocab_size_divisible_by", "untie_embeddings_and_output_weights",
    "hybrid_layer_pattern", "fox_forget_gate", "fox_forget_gate_type", "position_embedding_type", "rotary_base",
    "rotary_percent",
    "fox_output_gate", "fox_output_norm", "fox_qk_norm", "fox_qk_norm_eps", "fox_kv_shift",
    "fox_context_pruning", "fox_context_pruning_dim", "num_experts", "moe_ffn_hidden_size", "moe_router_topk",
    "moe_router_pre_softmax", "moe_layer_freq", "moe_shared_expert_intermediate_size", "default_corpus_bytes",
    "default_vocab_size",
    "tokenizer_type", "tokenizer_model", "vocab_file", "merge_file")

# keys above whose value is fixed here: the values accepted
_FIXED = {"attention_backend": ("auto", "flash", "fused", "unfused", "local"), "ckpt_format": ("torch_dist",),
          "normalization": ("RMSNorm",), "position_embedding_type": ("none", "rope"), "swiglu": (True,),
          "disable_bias_linear": (True,), "attention_dropout": (0.0,), "hidden_dropout": (0.0,),
          "attention_softmax_in_fp32": (True,), "calculate_per_token_loss": (True,),
          "distributed_backend": (None, "nccl", "gloo"), "dataloader_type": ("single",),
          "rerun_mode": ("disabled",), "position_embedding": (None, False), "optimizer": ("adam",),
          "use_dist_ckpt": (None, True), "cross_entropy_fusion_impl": ("native", "te"),
          "dist_ckpt_strictness": ("assume_ok_unexpected",)}


# Megatron-LM flags known but not built here: the reason, given naming the key
_VIRTUAL_PP = ("virtual (interleaved) pipeline stages are not built here: use --pipeline-model-parallel-size "
               "(uneven stages: --decoder-first/last-pipeline-num-layers)")
_FSDP = ("FSDP is not built here: --use-distributed-optimizer shards the optimizer state, --deepspeed "
         "--zero-stage 3 the weights too")
_FP8 = "FP8 training is not built here: use --bf16"
_LOSS_SCALE = "a loss scale is for fp16, which is not built here: use --bf16"
NOT_BUILT = {
    **dict.fromkeys(("num_layers_per_virtual_pipeline_stage", "num_virtual_stages_per_pipeline_rank"), _VIRTUAL_PP),
    **dict.fromkeys(("use_torch_fsdp2", "use_megatron_fsdp"), _FSDP),
    **dict.fromkeys(("data_parallel_sharding_strategy", "init_model_with_meta_device"),
                    "an FSDP option; FSDP is not built here"),
    "tp_comm_overlap": "needs Transformer Engine's userbuffers; not built here",
    **dict.fromkeys(("fp8_format", "fp8_amax_history_len", "fp8_amax_compute_algo", "fp8_param_gather",
                     "fp8_recipe"), _FP8),
    **dict.fromkeys(("loss_scale", "initial_loss_scale", "min_loss_scale", "loss_scale_window", "hysteresis"),
                    _LOSS_SCALE),
    "fp16_lm_cross_entropy": "fp16 is not built here: use --bf16",
    "apply_query_key_layer_scaling": "an fp16 option; FoX's QK-norm (--fox-qk-norm) keeps the logits bounded",
    "sgd_momentum": "only Adam is built here (--optimizer adam)",
    **dict.fromkeys(("async_save", "use_persistent_ckpt_worker"), "saves are synchronous here"),
    **dict.fromkeys(("non_persistent_local_ckpt_dir", "non_persistent_local_ckpt_algo"),
                    "local non-persistent checkpoints are not built here: --non-persistent-ckpt-type global"),
    "decrease_batch_size_if_needed": "not built here: the global batch size must be a multiple of micro-batch "
                                     "size x data-parallel size",
    "apply_layernorm_1p": "zero-centred norm weights (Megatron-Core's layernorm_zero_centered_gamma) are not built "
                          "here",
    "grad_reduce_in_bf16": "gradients are reduced in float32 here",
    "use_legacy_models": "megatron_fox builds Megatron-Core models only (the default --use-mcore-models)",
    "microbatch_group_size_per_virtual_pipeline_stage": _VIRTUAL_PP,
    "pipeline_model_parallel_layout": "layouts of layers over stages are not built here: "
                                      "--decoder-first/last-pipeline-num-layers set uneven stages",
    "ddp_average_in_collective": "gradients are summed and divided by the global batch's loss tokens here "
                                 "(calculate_per_token_loss)",
    **dict.fromkeys(("check_for_spiky_loss", "check_for_large_grads"),
                    "the rerun state machine's checks are not built here: --check-for-nan-in-loss-and-grad stops "
                    "on a non-finite loss or gradient"),
    **dict.fromkeys(("use_precision_aware_optimizer", "main_grads_dtype", "main_params_dtype", "exp_avg_dtype",
                     "exp_avg_sq_dtype"),
                    "the precision-aware optimizer (Transformer Engine's FusedAdam) is not built here: main weights, "
                    "gradients and Adam's moments are float32"),
    **dict.fromkeys(("optimizer_cpu_offload", "optimizer_offload_fraction", "overlap_cpu_optimizer_d2h_h2d",
                     "use_torch_optimizer_for_cpu_offload"), "optimizer CPU offload is not built here"),
    "num_distributed_optimizer_instances": "one distributed-optimizer instance over all data-parallel ranks here",
    "use_tp_pp_dp_mapping": "ranks are laid out in Megatron-Core's default order (tp-cp-ep-dp-pp) here",
    "use_cpu_initialization": "weights are initialised where they live here (on the GPU on the CUDA path)",
    **dict.fromkeys(("log_straggler", "disable_straggler_on_startup", "straggler_ctrlr_port",
                     "straggler_minmax_count", "enable_ft_package", "calc_ft_timeouts"),
                    "NVIDIA Resiliency Extension's straggler detection and fault tolerance are not built here"),
    "log_energy": "energy logging (NVML) is not built here",
}


# the first key of each part of OPTIONS: the headings of --help
HELP_SECTIONS = {"num_layers": "model", "fox_forget_gate": "FoX and ACP", "tensor_model_parallel_size": "parallelism",
                 "seq_length": "training and learning-rate schedule",
                 "num_experts": "Mixture of Experts (Megatron-Core's MoELayer)", "data_path": "data",
                 "log_interval": "logging, checkpoints and diagnostics",
                 "normalization": "other Megatron-LM flags (a fixed meaning here, or accepted and unused)"}


# Megatron-LM's spellings of flags whose names mix dashes and underscores
_MEGATRON_SPELLINGS = {"local_rank": ["--local_rank"],  # older torch.distributed.launch
                       "override_opt_param_scheduler": ["--override-opt_param-scheduler"],
                       "use_checkpoint_opt_param_scheduler": ["--use-checkpoint-opt_param-scheduler"]}


class _FlagError(Exception):
    """argparse's own complaint (a bad value or a missing argument), raised instead of printed."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line naming the flag, not the usage of all ~400 flags
        raise _FlagError(message)


def _flag_error(message: str) -> ConfigError:
    """A ConfigError from argparse's message ("argument --lr: invalid float value: 'x'")."""
    match = re.match(r"argument --([\w-]+)", message)
    key = match.group(1).replace("-", "_") if match else "command line"
    return ConfigError(key, message)


def _unknown_flag(extra: list[str]) -> ConfigError:
    """The error for the first of argparse's unrecognised arguments."""
    first = next((a for a in extra if a.startswith("--")), None)
    if first is None:
        return ConfigError("command line", f"unexpected argument {extra[0]!r} (flags start with --)")
    return unknown_key(first[2:].split("=")[0].replace("-", "_"), "flag")


def unknown_key(key: str, where: str) -> ConfigError:
    """The error for a key not in OPTIONS (where: "flag" or the YAML file's path): why a
    Megatron-LM key is not built, or the nearest known key."""
    if key in NOT_BUILT:
        return ConfigError(key, NOT_BUILT[key])
    if key.startswith("no_") and key[3:] in NOT_BUILT:  # a --no- form of one
        return ConfigError(key[3:], NOT_BUILT[key[3:]])
    if key.startswith("no_") and key[3:] in OPTIONS:  # only switches have a --no- form
        return ConfigError(key[3:], f"takes a value (--{key[3:].replace('_', '-')} VALUE), it has no --no- form")
    if key.startswith("moe_"):  # Megatron-LM's other MoE flags
        return ConfigError(key, "this Mixture-of-Experts option is not built here (see --help for the moe_* keys)")
    close = difflib.get_close_matches(key, list(OPTIONS), n=1, cutoff=0.75)
    if where == "flag":
        return ConfigError(key, f"unknown flag --{key.replace('_', '-')}"
                                + (f" (did you mean --{close[0].replace('_', '-')}?)" if close else " (see --help)"))
    return ConfigError(key, f"unknown key in {where}" + (f" (did you mean {close[0]}?)" if close else ""))


def build_parser() -> argparse.ArgumentParser:
    # no abbreviations (as Megatron-LM): a shortened or mistyped flag must not set another one
    p = _Parser(prog="python -m megatron_fox.train", allow_abbrev=False,
                description="Train a FoX(-Pro) model with ACP on Megatron-Core.")
    p.add_argument("--config", type=str, default=None, help="YAML file of settings (keys = flag names)")
    group = p
    for name, (typ, _default, help_) in OPTIONS.items():
        if name in HELP_SECTIONS:  # --help lists the flags under these headings, in OPTIONS' order
            group = p.add_argument_group(HELP_SECTIONS[name])
        flags = ["--" + name.replace("_", "-")] + _MEGATRON_SPELLINGS.get(name, [])
        if typ is bool:
            group.add_argument(*flags, dest=name, action=argparse.BooleanOptionalAction, default=None, help=help_)
        elif typ is list:
            group.add_argument(*flags, dest=name, nargs="+", type=str, default=None, help=help_)
        else:
            group.add_argument(*flags, dest=name, type=typ, default=None, help=help_)
    return p


def _coerce(key: str, value: Any) -> Any:
    typ = OPTIONS[key][0]
    if value is None:
        return None
    if typ is bool:
        if not isinstance(value, bool):
            raise ConfigError(key, f"must be true or false, got {value!r}")
        return value
    if typ is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if typ is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if typ is str and isinstance(value, str):
        return value
    if typ is list and isinstance(value, str):  # YAML "W1 PREFIX1 W2 PREFIX2"
        value = value.split()
    if typ is list and isinstance(value, list) and value and all(isinstance(v, (str, int, float)) for v in value):
        return [str(v) for v in value]
    raise ConfigError(key, f"must be {'a list of strings' if typ is list else typ.__name__}, got {value!r}")


def load_yaml(path: str) -> dict:
    if not os.path.isfile(path):
        raise ConfigError("config", f"file not found: {path}")
    with open(path) as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise ConfigError("config", f"{path} must hold a mapping of keys to values")
    for key in data:
        if key not in OPTIONS:
            raise unknown_key(key, path)
    return {k: _coerce(k, v) for k, v in data.items()}


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    """Defaults < YAML < flags, then derived values and checks (ConfigError on bad input)."""
    try:
        ns, extra = build_parser().parse_known_args(argv)
    except _FlagError as e:
        raise _flag_error(str(e)) from None
    if extra:
        raise _unknown_flag(extra)
    values = {k: v[1] for k, v in OPTIONS.items()}
    sources = {}  # key -> 1 set in the YAML, 2 on the command line (the schedule's either/or keys)
    if ns.config:
        from_yaml = load_yaml(ns.config)
        values.update(from_yaml)
        sources.update(dict.fromkeys(from_yaml, 1))
    given = {key: getattr(ns, key) for key in OPTIONS if getattr(ns, key) is not None}
    chosen = {**values, **given}
    if chosen["use_checkpoint_args"]:  # between the YAML and the flags
        values.update(checkpoint_args(chosen["load"], chosen["ckpt_step"], chosen["non_persistent_ckpt_type"],
                                      chosen["non_persistent_global_ckpt_dir"]))
    values.update(given)
    sources.update(dict.fromkeys(given, 2))
    args = argparse.Namespace(config=ns.config, config_sources=sources, **values)
    finalize(args)
    return args


# the keys that set the learning-rate and weight-decay schedule (Megatron-LM's
# OptimizerParamScheduler state), after resolve_schedule
SCHEDULE_KEYS = ("lr", "min_lr", "decoupled_lr", "decoupled_min_lr", "lr_warmup_iters", "lr_warmup_init",
                 "lr_decay_iters", "lr_decay_style", "lr_wsd_decay_iters", "lr_wsd_decay_style", "weight_decay",
                 "start_weight_decay", "end_weight_decay", "weight_decay_incr_style")


def resume_schedule(args: argparse.Namespace, saved: dict) -> None:
    """Megatron-LM's rule for the schedule on resume, `saved` the checkpoint's flags: with
    --use-checkpoint-opt_param-scheduler its values replace this run's; with
    --override-opt_param-scheduler this run's stand; with neither they must agree (a changed
    --lr or decay on resume is refused naming the key rather than taken silently)."""
    if args.override_opt_param_scheduler and args.use_checkpoint_opt_param_scheduler:
        raise ConfigError("use_checkpoint_opt_param_scheduler", "not with override_opt_param_scheduler: take the "
                                                                "schedule from one place")
    if args.override_opt_param_scheduler:
        return
    for key in SCHEDULE_KEYS:
        if key not in saved:  # a checkpoint from before the key existed
            continue
        if args.use_checkpoint_opt_param_scheduler:
            setattr(args, key, saved[key])
        elif saved[key] != getattr(args, key):
            raise ConfigError(key, f"{getattr(args, key)!r} differs from the checkpoint's {saved[key]!r}: add "
                                   f"--override-opt_param-scheduler (this run's schedule) or "
                                   f"--use-checkpoint-opt_param-scheduler (the checkpoint's)")


def checkpoint_args(load: Optional[str], step: Optional[int] = None, non_persistent_type: Optional[str] = None,
                    non_persistent_dir: Optional[str] = None) -> dict:
    """The CHECKPOINT_ARG_KEYS values saved with the checkpoint to load (args.json): load's,
    or its newer non-persistent one (`checkpoint.newer_non_persistent`)."""
    from ..checkpoint.tracker import newer_non_persistent, read_run_args

    if not load:
        raise ConfigError("use_checkpoint_args", "needs --load (the checkpoint to read the model's flags from)")
    try:
        found = newer_non_persistent(load, step, non_persistent_type, non_persistent_dir)
        saved = read_run_args(load if found is None else found[0], step)
    except (OSError, ValueError) as e:
        raise ConfigError("use_checkpoint_args", str(e)) from None
    return {key: saved[key] for key in CHECKPOINT_ARG_KEYS if key in saved}


def check_positions(args: argparse.Namespace) -> None:
    """The rotary embedding's keys."""
    if args.position_embedding_type == "rope":
        if args.hybrid_layer_pattern is not None:
            raise ConfigError("position_embedding_type", "rope: not with hybrid_layer_pattern (the FoX hybrid stack "
                                                         "runs without position embeddings)")
        if not 0.0 < args.rotary_percent <= 1.0:
            raise ConfigError("rotary_percent", f"must be in (0, 1], got {args.rotary_percent}")
        if args.rotary_base < 1:
            raise ConfigError("rotary_base", f"must be >= 1, got {args.rotary_base}")
    if args.reset_position_ids and args.position_embedding_type == "rope" and not args.reset_attention_mask:
        raise ConfigError("reset_position_ids", "with rope needs reset_attention_mask (positions restarting "
                                                "inside attention that crosses documents are not built)")


def check_forget_gate(args: argparse.Namespace) -> None:
    """The forget gate's kind; without the gate ACP has nothing to prune (off)."""
    from ..layers.config import FORGET_GATE_TYPES

    if args.fox_forget_gate_type not in FORGET_GATE_TYPES:
        raise ConfigError("fox_forget_gate_type", f"{args.fox_forget_gate_type!r}: use one of "
                                                  f"{', '.join(FORGET_GATE_TYPES)}")
    if not args.fox_forget_gate and args.fox_forget_gate_type != "data_dependent":
        raise ConfigError("fox_forget_gate_type", "needs the forget gate (not with --no-fox-forget-gate)")
    if not args.fox_forget_gate:
        args.acp = False


def pipeline_stages(args: argparse.Namespace) -> list[tuple[int, int]]:
    """[lo, hi) of the decoder layers on each pipeline stage (Megatron-LM's uneven splits:
    --decoder-first/last-pipeline-num-layers, --account-for-embedding/loss-in-pipeline-split;
    else L / PP each). ValueError naming the key where they do not split so."""
    from ..checkpoint.partition import stage_layers

    return stage_layers(args.num_layers, args.pipeline_model_parallel_size, args.decoder_first_pipeline_num_layers,
                        args.decoder_last_pipeline_num_layers, args.account_for_embedding_in_pipeline_split,
                        args.account_for_loss_in_pipeline_split)


def check_pipeline_split(args: argparse.Namespace) -> list[int]:
    """The decoder layers of each pipeline stage (`pipeline_stages`); ConfigError naming the
    key where they do not split so."""
    for key in ("decoder_first_pipeline_num_layers", "decoder_last_pipeline_num_layers",
                "account_for_embedding_in_pipeline_split", "account_for_loss_in_pipeline_split"):
        if getattr(args, key) not in (None, False) and args.pipeline_model_parallel_size == 1:
            raise ConfigError(key, "needs pipeline_model_parallel_size > 1")
    try:
        return [hi - lo for lo, hi in pipeline_stages(args)]
    except ValueError as e:
        key, _, message = str(e).partition(": ")
        raise ConfigError(key, message) from None


def check_moe(args: argparse.Namespace) -> None:
    """Mixture-of-Experts keys: sizes, router, expert parallelism (its fit to the world size:
    `check_expert_parallel`), and what is not built (MoE in the hybrid stack)."""
    etp = args.expert_tensor_parallel_size
    if etp is not None and etp != args.tensor_model_parallel_size:
        raise ConfigError("expert_tensor_parallel_size", f"{etp}: the experts are split like the dense layers here, "
                          f"so only tensor_model_parallel_size ({args.tensor_model_parallel_size}) is available")
    ep = args.expert_model_parallel_size
    if ep < 1 or (ep > 1 and args.num_experts is None):
        raise ConfigError("expert_model_parallel_size", f"must be 1, or above 1 with num_experts; got {ep}")
    if args.num_experts is None:
        return
    if args.num_experts < 2:
        raise ConfigError("num_experts", f"must be >= 2, got {args.num_experts}")
    if args.num_experts % ep:
        raise ConfigError("expert_model_parallel_size", f"{ep} does not divide num_experts {args.num_experts}")
    if not 1 <= args.moe_router_topk <= args.num_experts:
        raise ConfigError("moe_router_topk", f"must be in 1..num_experts ({args.num_experts}), got "
                                             f"{args.moe_router_topk}")
    if args.moe_ffn_hidden_size is None:
        args.moe_ffn_hidden_size = args.ffn_hidden_size
    if args.moe_ffn_hidden_size < 1 or args.moe_ffn_hidden_size % args.tensor_model_parallel_size:
        raise ConfigError("moe_ffn_hidden_size", f"{args.moe_ffn_hidden_size} must be positive and divisible by "
                                                 f"tensor_model_parallel_size {args.tensor_model_parallel_size}")
    if args.moe_router_load_balancing_type not in ("aux_loss", "seq_aux_loss", "none"):
        raise ConfigError("moe_router_load_balancing_type", f"must be aux_loss, seq_aux_loss or none, got "
                                                            f"{args.moe_router_load_balancing_type!r}")
    if args.moe_aux_loss_coeff < 0 or (args.moe_z_loss_coeff or 0) < 0:
        raise ConfigError("moe_aux_loss_coeff" if args.moe_aux_loss_coeff < 0 else "moe_z_loss_coeff", "must be >= 0")
    if args.moe_router_score_function not in ("softmax", "sigmoid"):
        raise ConfigError("moe_router_score_function", f"must be softmax or sigmoid, got "
                                                       f"{args.moe_router_score_function!r}")
    if args.moe_router_enable_expert_bias and args.moe_router_score_function != "sigmoid":
        raise ConfigError("moe_router_enable_expert_bias", "needs moe_router_score_function sigmoid (as Megatron-Core)")
    if args.moe_router_bias_update_rate <= 0:
        raise ConfigError("moe_router_bias_update_rate", f"must be > 0, got {args.moe_router_bias_update_rate}")
    if args.moe_router_topk_scaling_factor is not None and args.moe_router_topk_scaling_factor <= 0:
        raise ConfigError("moe_router_topk_scaling_factor", f"must be > 0, got {args.moe_router_topk_scaling_factor}")
    groups, group_topk = args.moe_router_num_groups, args.moe_router_group_topk
    if (groups is None) != (group_topk is None):
        raise ConfigError("moe_router_group_topk" if groups else "moe_router_num_groups",
                          "group-limited routing needs both moe_router_num_groups and moe_router_group_topk")
    if groups is not None:
        if groups < 1 or args.num_experts % groups:
            raise ConfigError("moe_router_num_groups", f"{groups} must divide num_experts {args.num_experts}")
        if not 1 <= group_topk <= groups or args.moe_router_topk % group_topk:
            raise ConfigError("moe_router_group_topk", f"{group_topk} must be in 1..moe_router_num_groups ({groups}) "
                                                       f"and divide moe_router_topk {args.moe_router_topk}")
        if args.moe_router_topk // group_topk > args.num_experts // groups:
            raise ConfigError("moe_router_group_topk", f"the {group_topk} groups of {args.num_experts // groups} "
                                                       f"experts cannot hold moe_router_topk {args.moe_router_topk}")
    cf = args.moe_expert_capacity_factor
    if cf is not None and cf <= 0:
        raise ConfigError("moe_expert_capacity_factor", f"must be > 0, got {cf} (leave it unset for dropless)")
    if args.moe_token_drop_policy not in ("probs", "position"):
        raise ConfigError("moe_token_drop_policy", f"must be probs or position, got {args.moe_token_drop_policy!r}")
    if args.moe_pad_expert_input_to_capacity and cf is None:
        raise ConfigError("moe_pad_expert_input_to_capacity", "needs moe_expert_capacity_factor")
    if args.moe_token_dispatcher_type not in ("allgather", "alltoall"):
        raise ConfigError("moe_token_dispatcher_type", f"must be allgather or alltoall, got "
                                                       f"{args.moe_token_dispatcher_type!r}")
    args.moe_layer_freq_value = _moe_layer_freq(args.moe_layer_freq, args.num_layers)
    shared = args.moe_shared_expert_intermediate_size
    if shared is not None and (shared < 1 or shared % args.tensor_model_parallel_size):
        raise ConfigError("moe_shared_expert_intermediate_size", f"{shared} must be positive and divisible by "
                                                                 f"tensor_model_parallel_size "
                                                                 f"{args.tensor_model_parallel_size}")
    if args.tensor_model_parallel_size > 1 and not args.sequence_parallel:
        raise ConfigError("sequence_parallel", "Megatron-Core's MoE layers need it with tensor_model_parallel_size > 1")
    if args.hybrid_layer_pattern is not None:
        raise ConfigError("num_experts", "not with hybrid_layer_pattern (the FoX hybrid stack has dense MLPs)")


def check_expert_parallel(args: argparse.Namespace) -> None:
    """Expert parallelism's fit to the layout (after data_parallel_size is known): as in
    Megatron-Core, the expert-parallel ranks are carved out of the data- and
    context-parallel ranks (the experts keep the tensor-parallel split of the rest)."""
    ep = args.expert_model_parallel_size
    if ep == 1:
        return
    dp_cp = args.data_parallel_size * args.context_parallel_size
    if dp_cp % ep:
        raise ConfigError("expert_model_parallel_size", f"{ep} does not divide data_parallel_size x "
                                                        f"context_parallel_size = {dp_cp}")
    if args.deepspeed:
        raise ConfigError("expert_model_parallel_size", "the DeepSpeed engine replicates the experts (DeepSpeed's "
                                                        "own MoE is not wired in); use the Megatron engine")


def _moe_layer_freq(freq: str, num_layers: int) -> int | list[int]:
    """moe_layer_freq as Megatron-LM reads it: an integer N (experts in layers 0, N, 2N, ...)
    or a Python list expression of 0/1 per layer; the int or the list, as TransformerConfig's
    moe_layer_freq takes it (layers.spec.moe_layer_pattern expands it)."""
    text = str(freq).strip()
    if text.isdigit():
        if int(text) < 1:
            raise ConfigError("moe_layer_freq", f"must be >= 1, got {text}")
        return int(text)
    try:
        pattern = eval(text, {"__builtins__": {}}, {})  # noqa: S307 (the user's own list expression)
    except Exception as e:  # noqa: BLE001 (any failure: not a pattern)
        raise ConfigError("moe_layer_freq", f"{text!r} is neither an integer nor a list expression ({e})") from None
    if not isinstance(pattern, list) or len(pattern) != num_layers or set(pattern) - {0, 1} or 1 not in pattern:
        raise ConfigError("moe_layer_freq", f"{text!r} must give {num_layers} values (num_layers) of 0 or 1 with at "
                                            f"least one 1, got {pattern!r}")
    return pattern


def check_hybrid_layer_pattern(args: argparse.Namespace) -> None:
    """The pattern fits the FoX hybrid stack, this run and the installed megatron-core."""
    pattern = args.hybrid_layer_pattern
    bad = sorted(set(pattern) - set("*-"))
    if bad or not pattern:
        raise ConfigError("hybrid_layer_pattern", f"{pattern!r}: the FoX hybrid stack has '*' (FoX attention) and "
                                                  f"'-' (MLP) layers only" + (f", not {''.join(bad)!r}" if bad else ""))
    if len(pattern) != args.num_layers:
        raise ConfigError("hybrid_layer_pattern", f"{pattern!r} has {len(pattern)} layers, num_layers is "
                                                  f"{args.num_layers} (one symbol a layer, as in Megatron-LM)")
    if args.pipeline_model_parallel_size != 1:
        raise ConfigError("hybrid_layer_pattern", "runs with pipeline_model_parallel_size 1")
    try:
        import megatron.core.models.hybrid.hybrid_model  # noqa: F401
    except ImportError:
        import megatron.core

        raise ConfigError("hybrid_layer_pattern", f"needs megatron-core with HybridModel (>= 0.17, Python >= 3.12); "
                                                  f"installed: {megatron.core.__version__}") from None


def _number(text: str) -> Optional[float]:
    try:
        return float(text)
    except ValueError:
        return None


def parse_data_blend(items: list[str], key: str = "data_path") -> tuple[list[str], Optional[list[float]]]:
    """--data-path as Megatron-LM reads it -> (prefixes, weights or None): 'PREFIX',
    'PREFIX1 PREFIX2 ...' (None: the blend weighs them by tokens) or 'W1 PREFIX1 W2 PREFIX2 ...'.
    key: the config key named in errors."""
    numbers = [_number(x) for x in items]
    if all(n is None for n in numbers):
        return list(items), None
    weights, prefixes = numbers[0::2], items[1::2]
    if len(items) % 2 or any(n is None for n in weights) or any(n is not None for n in numbers[1::2]):
        raise ConfigError(key, f"{' '.join(items)!r}: give prefixes only, or weight-prefix pairs "
                               f"'W1 PREFIX1 W2 PREFIX2 ...'")
    if any(not w > 0 for w in weights):
        raise ConfigError(key, f"blend weights must be > 0, got {weights}")
    return list(prefixes), weights


def check_context_pruning(args) -> None:
    """The learned context pruning's settings."""
    if args.context_parallel_size > 1:
        raise ConfigError("fox_context_pruning", "does not run with context_parallel_size > 1")
    if args.fox_context_pruning_dim < 1:
        raise ConfigError("fox_context_pruning_dim", f"must be >= 1, got {args.fox_context_pruning_dim}")
    if args.fox_context_pruning_lambda < 0:
        raise ConfigError("fox_context_pruning_lambda", f"must be >= 0, got {args.fox_context_pruning_lambda}")
    if not args.fox_context_pruning_alpha >= 1:
        raise ConfigError("fox_context_pruning_alpha", f"must be >= 1, got {args.fox_context_pruning_alpha}")
    if args.fox_context_pruning_alpha_iters is not None and args.fox_context_pruning_alpha_iters < 0:
        raise ConfigError("fox_context_pruning_alpha_iters",
                          f"must be >= 0, got {args.fox_context_pruning_alpha_iters}")


def read_data_args_files(args: argparse.Namespace) -> None:
    """Megatron-LM's --data-args-path (data_path's words from a file) and
    --per-split-data-args-path (the per-split paths from a JSON object)."""
    if args.data_args_path is not None:
        if args.data_path is not None:
            raise ConfigError("data_args_path", "give data_path or data_args_path, not both")
        try:
            with open(args.data_args_path) as f:
                words = f.read().split()
        except OSError as e:
            raise ConfigError("data_args_path", f"cannot read {args.data_args_path}: {e.strerror}") from None
        if not words:
            raise ConfigError("data_args_path", f"{args.data_args_path} is empty")
        args.data_path = words
    if args.per_split_data_args_path is not None:
        path = args.per_split_data_args_path
        if any(getattr(args, f"{k}_data_path") is not None for k in ("train", "valid", "test")) or args.data_path:
            raise ConfigError("per_split_data_args_path", "give it or data paths on the command line, not both")
        try:
            with open(path) as f:
                table = json.load(f)
        except OSError as e:
            raise ConfigError("per_split_data_args_path", f"cannot read {path}: {e.strerror}") from None
        except json.JSONDecodeError as e:
            raise ConfigError("per_split_data_args_path", f"{path} is not JSON: {e.msg} (line {e.lineno})") from None
        if not isinstance(table, dict) or set(table) - {"train", "valid", "test"}:
            raise ConfigError("per_split_data_args_path", f"{path} must map train / valid / test to their paths")
        for split, value in table.items():
            words = value.split() if isinstance(value, str) else value
            if not isinstance(words, list) or not words or not all(isinstance(w, (str, int, float)) for w in words):
                raise ConfigError("per_split_data_args_path", f"{path}: {split!r} must be a non-empty list of words")
            setattr(args, f"{split}_data_path", [str(w) for w in words])


def check_data_paths(args: argparse.Namespace) -> None:
    """Parse data_path, or train_data_path + valid_data_path + test_data_path (each split from
    its own files), into args.data_blends = {"all" | "train" | "valid" | "test": (prefixes,
    weights)} (empty: the embedded corpus); every prefix's .bin/.idx must exist."""
    read_data_args_files(args)
    per_split = {"train": args.train_data_path, "valid": args.valid_data_path, "test": args.test_data_path}
    given = {k: v for k, v in per_split.items() if v is not None}
    if given and args.data_path is not None:
        raise ConfigError(f"{next(iter(given))}_data_path", "give data_path or per-split paths, not both")
    if given and "train" not in given:
        raise ConfigError("train_data_path", f"needed with {next(iter(given))}_data_path")
    from .tokenizer import SENTENCEPIECE_TYPES, TOKENIZER_TYPES

    blends = {"all": args.data_path} if args.data_path is not None else given
    keys = {name: "data_path" if name == "all" else f"{name}_data_path" for name in blends}
    args.data_blends = {name: parse_data_blend(items, keys[name]) for name, items in blends.items()}
    for name, (prefixes, _) in args.data_blends.items():
        for prefix in prefixes:
            for suffix in (".bin", ".idx"):
                if not os.path.isfile(prefix + suffix):
                    raise ConfigError(keys[name], f"{prefix + suffix} not found")
    if args.mock_data:
        if args.data_blends:
            raise ConfigError("mock_data", "give mock_data or data paths, not both")
        if args.tokenizer_type != "NullTokenizer":
            raise ConfigError("tokenizer_type", f"{args.tokenizer_type!r}: mock_data needs NullTokenizer")
    if args.tokenizer_type == "NullTokenizer" and args.vocab_size is None:
        raise ConfigError("vocab_size", "needed by NullTokenizer (its ids are 0 .. vocab_size - 1)")
    if args.tokenizer_type not in TOKENIZER_TYPES:
        raise ConfigError("tokenizer_type", f"{args.tokenizer_type!r}: use one of {', '.join(TOKENIZER_TYPES)}")
    if args.tokenizer_type == "HuggingFaceTokenizer":
        if importlib.util.find_spec("transformers") is None:
            raise ConfigError("tokenizer_type", "HuggingFaceTokenizer needs the transformers package (pip install "
                                                "transformers)")
        if args.tokenizer_model is None:
            raise ConfigError("tokenizer_model", "needed by HuggingFaceTokenizer (a tokenizer directory or hub name)")
    if args.tokenizer_type == "GPT2BPETokenizer":
        for key in ("vocab_file", "merge_file"):
            if getattr(args, key) is None or not os.path.isfile(getattr(args, key)):
                raise ConfigError(key, f"{getattr(args, key)}: not found (needed by GPT2BPETokenizer)")
    elif args.tokenizer_type in SENTENCEPIECE_TYPES and args.data_blends and args.tokenizer_model is None:
        raise ConfigError("tokenizer_model", "needed with " + ("data_path" if args.data_path else "train_data_path"))
    if args.eval_interval and args.data_blends.keys() == {"train"}:
        raise ConfigError("eval_interval", "needs validation data: valid_data_path (with train_data_path)")


def _either(args: argparse.Namespace, keys: tuple[str, ...]) -> Optional[str]:
    """Which of keys (alternatives for one setting) this run sets: the one given at the higher
    level (command line over YAML); two at the same level are an error naming the last."""
    sources = getattr(args, "config_sources", {})
    given = [k for k in keys if sources.get(k) and getattr(args, k) is not None]
    if not given:
        return None
    top = max(sources[k] for k in given)
    winners = [k for k in given if sources[k] == top]
    if len(winners) > 1:
        raise ConfigError(winners[-1], f"give only one of {', '.join(winners)}")
    return winners[0]


def check_weight_decay_schedule(args: argparse.Namespace) -> None:
    """Megatron-LM's weight-decay schedule keys: constant uses weight_decay (no start or end
    weight decay, as there); linear and cosine need both ends, >= 0."""
    style = args.weight_decay_incr_style
    if style not in ("constant", "linear", "cosine"):
        raise ConfigError("weight_decay_incr_style", f"must be constant, linear or cosine, got {style!r}")
    for key in ("start_weight_decay", "end_weight_decay"):
        if style == "constant" and getattr(args, key) is not None:
            raise ConfigError(key, "only with weight_decay_incr_style linear or cosine (constant uses weight_decay)")
    if style == "constant":
        args.start_weight_decay = args.end_weight_decay = args.weight_decay
    for key in ("start_weight_decay", "end_weight_decay"):
        if getattr(args, key) is None:
            raise ConfigError(key, f"needed with weight_decay_incr_style {style}")
        if getattr(args, key) < 0:
            raise ConfigError(key, f"must be >= 0, got {getattr(args, key)}")


def resolve_schedule(args: argparse.Namespace) -> None:
    """Steps from samples as Megatron-LM: train_samples becomes the steps that consume that
    many sequences (through the batch-size ramp-up, if any); lr_decay_samples and
    lr_warmup_samples become LR-schedule steps of global_batch_size sequences (rounded up),
    lr_warmup_fraction a share of the decay steps."""
    gbs = args.global_batch_size
    check_rampup(args)

    def steps(key: str) -> int:
        value = getattr(args, key)
        if value < 0:
            raise ConfigError(key, f"must be >= 0, got {value}")
        return -(-value // gbs)

    if _either(args, ("train_iters", "train_samples")) == "train_samples":
        steps("train_samples")  # its sign
        args.train_iters = steps_for_samples(args.train_samples, args.rampup_batch_size, gbs)
    if args.train_iters < 0:
        raise ConfigError("train_iters", f"must be >= 0, got {args.train_iters}")
    if _either(args, ("lr_decay_iters", "lr_decay_samples")) == "lr_decay_samples":
        args.lr_decay_iters = steps("lr_decay_samples")
    if args.lr_decay_iters is None:
        args.lr_decay_iters = args.train_iters
    warmup = _either(args, ("lr_warmup_iters", "lr_warmup_samples", "lr_warmup_fraction"))
    if warmup == "lr_warmup_samples":
        args.lr_warmup_iters = steps("lr_warmup_samples")
    elif warmup == "lr_warmup_fraction":
        if not 0.0 <= args.lr_warmup_fraction <= 1.0:
            raise ConfigError("lr_warmup_fraction", f"must be in [0, 1], got {args.lr_warmup_fraction}")
        args.lr_warmup_iters = int(args.lr_warmup_fraction * args.lr_decay_iters)
    if args.lr_warmup_iters < 0:
        raise ConfigError("lr_warmup_iters", f"must be >= 0, got {args.lr_warmup_iters}")
    if not 0.0 <= args.lr_warmup_init <= args.lr:
        raise ConfigError("lr_warmup_init", f"must be in [0, lr = {args.lr}], got {args.lr_warmup_init}")
    if _either(args, ("lr_wsd_decay_iters", "lr_wsd_decay_samples")) == "lr_wsd_decay_samples":
        args.lr_wsd_decay_iters = steps("lr_wsd_decay_samples")
    check_lr_decay(args)


def check_rampup(args: argparse.Namespace) -> None:
    """rampup_batch_size: three integers START INCREMENT SAMPLES, START < global_batch_size,
    the difference a multiple of INCREMENT; stored as ints."""
    if args.rampup_batch_size is None:
        return
    try:
        start, increment, samples = (int(v) for v in args.rampup_batch_size)
    except ValueError:
        raise ConfigError("rampup_batch_size", f"needs three integers START INCREMENT SAMPLES, got "
                                               f"{' '.join(args.rampup_batch_size)}") from None
    gbs = args.global_batch_size
    if not (1 <= start < gbs and increment >= 1 and samples >= 1 and (gbs - start) % increment == 0):
        raise ConfigError("rampup_batch_size", f"START {start}, INCREMENT {increment}, SAMPLES {samples}: need 1 <= "
                                               f"START < global_batch_size ({gbs}), INCREMENT and SAMPLES >= 1, and "
                                               f"global_batch_size - START a multiple of INCREMENT")
    args.rampup_batch_size = [start, increment, samples]


_LR_DECAY_STYLES = ("cosine", "linear", "constant", "inverse-square-root", "WSD")
_WSD_DECAY_STYLES = ("exponential", "linear", "cosine", "minus_sqrt")


def check_lr_decay(args: argparse.Namespace) -> None:
    """lr_decay_style and, for WSD, its final decay: a length within the decay after warmup."""
    if args.lr_decay_style not in _LR_DECAY_STYLES:
        raise ConfigError("lr_decay_style", f"must be one of {', '.join(_LR_DECAY_STYLES)}, got {args.lr_decay_style!r}")
    if args.lr_decay_style != "WSD":
        if args.lr_wsd_decay_iters is not None:
            raise ConfigError("lr_wsd_decay_iters", "needs lr_decay_style WSD")
        return
    if args.lr_wsd_decay_style not in _WSD_DECAY_STYLES:
        raise ConfigError("lr_wsd_decay_style", f"must be one of {', '.join(_WSD_DECAY_STYLES)}, got "
                                                f"{args.lr_wsd_decay_style!r}")
    after_warmup = args.lr_decay_iters - args.lr_warmup_iters
    if args.lr_wsd_decay_iters is None or not 1 <= args.lr_wsd_decay_iters <= after_warmup:
        raise ConfigError("lr_wsd_decay_iters", f"WSD needs lr_wsd_decay_iters (or lr_wsd_decay_samples) in "
                                                f"1..{after_warmup} (lr_decay_iters - lr_warmup_iters), got "
                                                f"{args.lr_wsd_decay_iters}")


def _world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def finalize(args: argparse.Namespace) -> None:
    """Fill derived values and check consistency; raise ConfigError naming the key."""
    for key in ("num_layers", "hidden_size", "num_attention_heads", "seq_length", "micro_batch_size",
                "global_batch_size", "tensor_model_parallel_size", "pipeline_model_parallel_size",
                "context_parallel_size", "log_interval", "tensorboard_log_interval", "distributed_timeout_minutes"):
        if getattr(args, key) < 1:
            raise ConfigError(key, f"must be >= 1, got {getattr(args, key)}")
    for key, accepted in _FIXED.items():
        if getattr(args, key) not in accepted:
            raise ConfigError(key, f"{getattr(args, key)!r}: not available in this FoX model "
                                   f"(accepted: {', '.join(repr(a) for a in accepted if a is not None)})")
    if args.use_rotary_position_embeddings:
        if getattr(args, "config_sources", {}).get("position_embedding_type") and args.position_embedding_type != "rope":
            raise ConfigError("use_rotary_position_embeddings", f"contradicts position_embedding_type "
                                                                f"{args.position_embedding_type!r}")
        args.position_embedding_type = "rope"
    if args.log_progress and not args.save:
        raise ConfigError("log_progress", "needs save (progress.txt is written there)")
    if args.deterministic_mode and args.fox_context_pruning:
        raise ConfigError("deterministic_mode", "not with fox_context_pruning: its keep-mask kernels add "
                                                "gradients with atomics (no fixed order)")
    if args.decoupled_min_lr is not None and args.decoupled_lr is None:
        raise ConfigError("decoupled_min_lr", "needs decoupled_lr (the schedule it ends)")
    for key in ("decoupled_lr", "decoupled_min_lr"):
        if getattr(args, key) is not None and getattr(args, key) < 0:
            raise ConfigError(key, f"must be >= 0, got {getattr(args, key)}")
    if args.qk_layernorm is not None:
        if getattr(args, "config_sources", {}).get("fox_qk_norm") and args.fox_qk_norm != args.qk_layernorm:
            raise ConfigError("qk_layernorm", f"contradicts fox_qk_norm {args.fox_qk_norm}")
        args.fox_qk_norm = args.qk_layernorm
    if args.cross_entropy_loss_fusion and args.cross_entropy_fusion_impl == "te" and \
            importlib.util.find_spec("transformer_engine") is None:
        raise ConfigError("cross_entropy_fusion_impl", "te needs Transformer Engine (not installed): use native")
    resolve_schedule(args)
    check_weight_decay_schedule(args)
    if args.num_query_groups is None:
        args.num_query_groups = args.num_attention_heads
    if args.kv_channels is None:
        if args.hidden_size % args.num_attention_heads:
            raise ConfigError("hidden_size", f"{args.hidden_size} not divisible by num_attention_heads "
                                             f"{args.num_attention_heads} (or set kv_channels)")
        args.kv_channels = args.hidden_size // args.num_attention_heads
    if args.ffn_hidden_size is None:
        args.ffn_hidden_size = 256 * -(-int(args.hidden_size * 4 * 2 / 3) // 256)
    tp, pp, cp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size, args.context_parallel_size
    if args.num_attention_heads % args.num_query_groups:
        raise ConfigError("num_query_groups", f"{args.num_query_groups} must divide num_attention_heads "
                                              f"{args.num_attention_heads}")
    if args.num_attention_heads % tp:
        raise ConfigError("num_attention_heads", f"{args.num_attention_heads} not divisible by "
                                                 f"tensor_model_parallel_size {tp}")
    if args.num_query_groups % tp:
        raise ConfigError("num_query_groups", f"{args.num_query_groups} not divisible by "
                                              f"tensor_model_parallel_size {tp}")
    if args.ffn_hidden_size % tp:
        raise ConfigError("ffn_hidden_size", f"{args.ffn_hidden_size} not divisible by tensor_model_parallel_size {tp}")
    stage_sizes = check_pipeline_split(args)
    check_moe(args)
    if args.hybrid_layer_pattern is not None:
        check_hybrid_layer_pattern(args)
    check_positions(args)
    check_forget_gate(args)
    if args.fp16:
        raise ConfigError("fp16", "fp16 training (with loss scaling) is not built here: use --bf16")
    if args.recompute_activations:
        raise ConfigError("recompute_activations", "Megatron-LM's selective recompute: FoX attention keeps no "
                                                   "[s, s] tensor to save; use --recompute-granularity full")
    if args.recompute_granularity not in (None, "full"):
        raise ConfigError("recompute_granularity", f"{args.recompute_granularity!r}: use full (FoX attention keeps no "
                                                   f"[s, s] tensor for 'selective' to save)")
    if args.recompute_method not in ("uniform", "block"):
        raise ConfigError("recompute_method", f"must be uniform or block, got {args.recompute_method!r}")
    if not 1 <= args.recompute_num_layers <= max(stage_sizes):
        raise ConfigError("recompute_num_layers", f"must be in 1..{max(stage_sizes)} (layers per pipeline "
                                                  f"stage), got {args.recompute_num_layers}")
    if args.overlap_param_gather and not args.use_distributed_optimizer:
        raise ConfigError("overlap_param_gather", "needs use_distributed_optimizer (as in Megatron-LM)")
    if args.overlap_param_gather and not args.overlap_grad_reduce:
        raise ConfigError("overlap_param_gather", "needs overlap_grad_reduce (as in Megatron-LM)")
    if args.timing_log_option not in ("max", "minmax", "all"):
        raise ConfigError("timing_log_option", f"must be max, minmax or all, got {args.timing_log_option!r}")
    if args.timing_log_level not in (0, 1, 2):
        raise ConfigError("timing_log_level", f"must be 0, 1 or 2, got {args.timing_log_level}")
    if args.ddp_bucket_size is not None and args.ddp_bucket_size < 1:
        raise ConfigError("ddp_bucket_size", f"must be >= 1, got {args.ddp_bucket_size}")
    if args.cp_comm_type not in ("p2p", "a2a"):
        raise ConfigError("cp_comm_type", f"{args.cp_comm_type!r}: use p2p or a2a")
    if cp > 1 and args.cp_comm_type == "a2a" and args.num_query_groups // tp < cp:
        raise ConfigError("cp_comm_type", f"a2a needs num_query_groups / tensor_model_parallel_size "
                                          f"({args.num_query_groups // tp}) >= context_parallel_size {cp}; use p2p")
    if cp > 1 and args.seq_length % (2 * cp):
        raise ConfigError("seq_length", f"{args.seq_length} not divisible by 2 * context_parallel_size ({2 * cp})")
    if args.sequence_parallel and tp == 1:
        args.sequence_parallel = False  # as Megatron-LM: nothing to split
    if args.sequence_parallel and args.seq_length % tp:
        raise ConfigError("seq_length", f"{args.seq_length} not divisible by tensor_model_parallel_size {tp} "
                                        f"(sequence_parallel)")
    world = _world_size()
    if world % (tp * pp * cp):
        raise ConfigError("tensor_model_parallel_size", f"TP*PP*CP = {tp * pp * cp} does not divide the "
                                                        f"world size {world}")
    args.data_parallel_size = world // (tp * pp * cp)
    per_step = args.micro_batch_size * args.data_parallel_size
    if args.global_batch_size % per_step:
        raise ConfigError("global_batch_size", f"{args.global_batch_size} not divisible by micro_batch_size * "
                                               f"data_parallel_size = {per_step}")
    args.num_microbatches = args.global_batch_size // per_step
    check_expert_parallel(args)
    if args.rampup_batch_size is not None:
        odd = [b for b in ramp_sizes(args.rampup_batch_size, args.global_batch_size) if b % per_step]
        if odd:
            raise ConfigError("rampup_batch_size", f"passes batch sizes {odd[:4]} not divisible by micro_batch_size * "
                                                   f"data_parallel_size = {per_step}")
    if args.transformer_impl not in ("auto", "local", "transformer_engine"):
        raise ConfigError("transformer_impl", f"must be auto, local or transformer_engine, got {args.transformer_impl!r}")
    if args.acp_logit_bound not in ("qk_norm", "data"):
        raise ConfigError("acp_logit_bound", f"must be qk_norm or data, got {args.acp_logit_bound!r}")
    if args.acp and args.acp_logit_bound == "qk_norm" and not args.fox_qk_norm:
        raise ConfigError("acp_logit_bound", "qk_norm needs fox_qk_norm true (or use data)")
    if args.fox_qk_norm_eps < 0:
        raise ConfigError("fox_qk_norm_eps", f"must be >= 0, got {args.fox_qk_norm_eps}")
    if args.acp_backward_pruning not in ("lse", "bound"):
        raise ConfigError("acp_backward_pruning", f"must be lse or bound, got {args.acp_backward_pruning!r}")
    if args.acp_log_eps > 0:
        raise ConfigError("acp_log_eps", f"must be <= 0, got {args.acp_log_eps}")
    if args.fox_context_pruning:
        check_context_pruning(args)
    if args.device not in ("auto", "cpu", "cuda"):
        raise ConfigError("device", f"must be auto, cpu or cuda, got {args.device!r}")
    check_data_paths(args)
    # a SentencePiece model is a file; HuggingFaceTokenizer's is a directory or a hub name
    # (transformers resolves it, and the tokenizer's build names this key if that fails)
    if (args.tokenizer_model is not None and args.tokenizer_type != "HuggingFaceTokenizer"
            and not os.path.isfile(args.tokenizer_model)):
        raise ConfigError("tokenizer_model", f"{args.tokenizer_model} not found" +
                          (" (a directory: HuggingFaceTokenizer's kind, use --tokenizer-type HuggingFaceTokenizer)"
                           if os.path.isdir(args.tokenizer_model) else ""))
    for key in ("exit_signal_handler", "exit_duration_in_mins"):
        if getattr(args, key) and args.save is None:
            raise ConfigError(key, "needs save (where the checkpoint goes before the exit)")
    if args.exit_duration_in_mins is not None and args.exit_duration_in_mins <= 0:
        raise ConfigError("exit_duration_in_mins", f"must be > 0, got {args.exit_duration_in_mins}")
    if args.num_dataset_builder_threads < 1:
        raise ConfigError("num_dataset_builder_threads", f"must be >= 1, got {args.num_dataset_builder_threads}")
    if args.manual_gc_interval < 0:
        raise ConfigError("manual_gc_interval", f"must be >= 0, got {args.manual_gc_interval}")
    _check_needs(args, ("manual_gc_interval", "manual_gc_eval"), args.manual_gc, "manual_gc")
    if args.ckpt_step is not None and args.ckpt_step < 0:
        raise ConfigError("ckpt_step", f"must be >= 0, got {args.ckpt_step}")
    _check_needs(args, ("finetune", "load_optim", "load_rng", "exit_on_missing_checkpoint", "ckpt_step"),
                 args.load is not None, "load (a checkpoint directory)")
    _check_needs(args, ("save_optim", "save_rng"), args.save is not None, "save (a checkpoint directory)")
    check_non_persistent(args)
    if args.pretrained_checkpoint and not os.path.isfile(args.pretrained_checkpoint):
        raise ConfigError("pretrained_checkpoint", f"file {args.pretrained_checkpoint} not found")
    check_scalar_logs(args)
    check_profiling(args, world)
    if args.empty_unused_memory_level not in (0, 1, 2):
        raise ConfigError("empty_unused_memory_level", f"must be 0, 1 or 2, got {args.empty_unused_memory_level}")
    interval = args.check_weight_hash_across_dp_replicas_interval
    if interval is not None and interval < 1:
        raise ConfigError("check_weight_hash_across_dp_replicas_interval", f"must be >= 1, got {interval}")
    if args.tensorboard_queue_size < 1:
        raise ConfigError("tensorboard_queue_size", f"must be >= 1, got {args.tensorboard_queue_size}")
    check_deepspeed(args)


def check_profiling(args: argparse.Namespace, world: int) -> None:
    """--profile and its keys (Megatron-LM's): a window of iterations, ranks of this world, and
    where each kind of profile can go."""
    if args.record_memory_history and not _runs_on_cuda(args):
        raise ConfigError("record_memory_history", "records CUDA's caching allocator: needs CUDA")
    _check_needs(args, ("profile_step_start", "profile_step_end", "profile_ranks", "use_pytorch_profiler"),
                 args.profile, "profile")
    try:
        args.profile_ranks = [0] if args.profile_ranks is None else [int(r) for r in args.profile_ranks]
    except ValueError:
        raise ConfigError("profile_ranks", f"must be integers, got {args.profile_ranks}") from None
    if not args.profile:
        return
    if args.profile_step_start < 0:
        raise ConfigError("profile_step_start", f"must be >= 0, got {args.profile_step_start}")
    if args.profile_step_end <= args.profile_step_start:
        raise ConfigError("profile_step_end", f"must be > profile_step_start ({args.profile_step_start}), got "
                                              f"{args.profile_step_end}")
    bad = [r for r in args.profile_ranks if not 0 <= r < world]
    if bad:
        raise ConfigError("profile_ranks", f"{bad} not ranks of this world of {world}")
    if args.use_pytorch_profiler:
        if not args.tensorboard_dir:
            raise ConfigError("tensorboard_dir", "use_pytorch_profiler writes its traces there: give one")
    elif not _runs_on_cuda(args):
        raise ConfigError("profile", "without use_pytorch_profiler it marks a range for nsys through CUDA's "
                                     "profiler API, which needs CUDA: add --use-pytorch-profiler on CPUs")


def _runs_on_cuda(args: argparse.Namespace) -> bool:
    """Whether this run can use CUDA (--device not cpu, and a GPU present)."""
    import torch

    return args.device != "cpu" and torch.cuda.is_available()


def check_non_persistent(args: argparse.Namespace) -> None:
    """Non-persistent checkpoints (Megatron-LM's keys): the global kind only, an interval
    with somewhere to save, and a directory of their own (older ones in it are deleted)."""
    kind, interval, root = args.non_persistent_ckpt_type, args.non_persistent_save_interval, \
        args.non_persistent_global_ckpt_dir
    if kind not in (None, "global"):
        raise ConfigError("non_persistent_ckpt_type", f"{kind!r} is not built here: use global")
    if interval is not None:
        if interval < 1:
            raise ConfigError("non_persistent_save_interval", f"must be >= 1, got {interval}")
        if kind is None:
            raise ConfigError("non_persistent_ckpt_type", "needs a value with non_persistent_save_interval: global")
        if args.save is None:
            raise ConfigError("non_persistent_save_interval", "needs save (a checkpoint directory)")
    if root:  # "" is unset, as in Megatron-LM
        if kind is None:
            raise ConfigError("non_persistent_global_ckpt_dir", "needs non_persistent_ckpt_type global")
        for key in ("save", "load"):
            if getattr(args, key) and os.path.realpath(root) == os.path.realpath(getattr(args, key)):
                raise ConfigError("non_persistent_global_ckpt_dir", f"must differ from {key}: older checkpoints "
                                                                    "in it are deleted")


def _check_needs(args: argparse.Namespace, keys: tuple[str, ...], present: bool, needed: str) -> None:
    """Where the setting they modify is absent (present false), a key of keys given away from
    its default is an error naming it ("needs <needed>")."""
    sources = getattr(args, "config_sources", {})
    for key in keys:
        if not present and sources.get(key) and getattr(args, key) != OPTIONS[key][1]:
            raise ConfigError(key, f"needs {needed}")


def check_deepspeed(args: argparse.Namespace) -> None:
    """The DeepSpeed engine's flags: the package imports, and nothing it cannot run."""
    if not args.deepspeed:
        if args.deepspeed_config is not None:
            raise ConfigError("deepspeed_config", "needs deepspeed")
        _check_needs(args, ("zero_stage",), False, "deepspeed")
        return
    if not 0 <= args.zero_stage <= 3:
        raise ConfigError("zero_stage", f"must be 0, 1, 2 or 3, got {args.zero_stage}")
    if args.pipeline_model_parallel_size > 1:
        raise ConfigError("pipeline_model_parallel_size", "the DeepSpeed engine runs without pipeline parallelism")
    if args.sequence_parallel:
        raise ConfigError("sequence_parallel", "the DeepSpeed engine runs without sequence parallelism")
    for key in ("overlap_grad_reduce", "overlap_param_gather"):
        if getattr(args, key):
            raise ConfigError(key, "Megatron DDP's option; with deepspeed set overlap_comm in deepspeed_config")
    if not args.save_optim:
        raise ConfigError("save_optim", "the DeepSpeed engine always saves its optimizer partitions")
    if args.check_weight_hash_across_dp_replicas_interval and args.zero_stage == 3:
        raise ConfigError("check_weight_hash_across_dp_replicas_interval", "not with zero_stage 3 (each rank holds "
                                                                           "only its partition of the weights)")
    if args.log_num_zeros_in_grad:
        raise ConfigError("log_num_zeros_in_grad", "not with the DeepSpeed engine (its ZeRO stages hold the "
                                                   "gradients in their own partitions)")
    if args.deepspeed_config is not None:
        check_deepspeed_config(args.deepspeed_config)
    if importlib.util.find_spec("deepspeed") is None:
        raise ConfigError("deepspeed", "the deepspeed package is not installed (pip install deepspeed)")


# what the trainer's own flags decide (its data loop, AdamW and LR schedule)
_DEEPSPEED_OWN_KEYS = {"train_batch_size": "global_batch_size", "train_micro_batch_size_per_gpu": "micro_batch_size",
                       "gradient_accumulation_steps": "global_batch_size", "optimizer": "lr, adam_beta1, ...",
                       "scheduler": "lr_decay_style, lr_warmup_iters, ..."}


def check_deepspeed_config(path: str) -> None:
    """A JSON object, without the keys the trainer's flags set."""
    import json

    if not os.path.isfile(path):
        raise ConfigError("deepspeed_config", f"file {path} not found")
    try:
        with open(path) as f:
            config = json.load(f)
    except ValueError as e:
        raise ConfigError("deepspeed_config", f"{path} is not JSON: {e}") from None
    if not isinstance(config, dict):
        raise ConfigError("deepspeed_config", f"{path} must hold a JSON object")
    own = sorted(set(config) & set(_DEEPSPEED_OWN_KEYS))
    if own:
        raise ConfigError("deepspeed_config", f"{path} sets {', '.join(own)}: the trainer's flags decide those "
                                              f"({'; '.join(_DEEPSPEED_OWN_KEYS[k] for k in own)})")


def check_scalar_logs(args: argparse.Namespace) -> None:
    """The packages the scalar logs need import, and the W&B keys come with wandb_project."""
    for key in ("wandb_exp_name", "wandb_entity", "wandb_save_dir"):
        if getattr(args, key) is not None and not args.wandb_project:
            raise ConfigError(key, "needs wandb_project")
    for key, module, package in (("tensorboard_dir", "torch.utils.tensorboard", "tensorboard"),
                                 ("wandb_project", "wandb", "wandb")):
        if getattr(args, key):
            try:
                importlib.import_module(module)
            except ImportError:
                raise ConfigError(key, f"the {package} package is not installed (pip install {package})") from None


def parse_or_exit(argv: Optional[list[str]] = None, prog: str = "megatron_fox.train") -> argparse.Namespace:
    """parse_args, turning a ConfigError into one line on stderr ("<prog>: error: ...") and
    exit code 2."""
    try:
        return parse_args(argv)
    except ConfigError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        sys.exit(2)
