"""A Megatron-LM GPT pretraining command line (its usual model, data, optimizer and
parallelism flags) parses unchanged; a flag whose value this FoX model cannot honour stops
naming its key."""

import pytest

from megatron_fox.training.arguments import ConfigError, parse_args

MEGATRON_LM_SCRIPT = """
--num-layers 4 --hidden-size 256 --num-attention-heads 8 --group-query-attention --num-query-groups 4
--seq-length 512 --max-position-embeddings 512 --position-embedding-type none --normalization RMSNorm
--swiglu --disable-bias-linear --untie-embeddings-and-output-weights --attention-dropout 0.0
--hidden-dropout 0.0 --init-method-std 0.02 --use-mcore-models --transformer-impl local
--attention-softmax-in-fp32 --use-flash-attn --micro-batch-size 4 --global-batch-size 32
--train-samples 64000 --lr 3e-4 --min-lr 3e-5 --lr-decay-style cosine --lr-warmup-fraction 0.01
--weight-decay 0.1 --adam-beta1 0.9 --adam-beta2 0.95 --clip-grad 1.0 --bf16
--tensor-model-parallel-size 1 --pipeline-model-parallel-size 1 --use-distributed-optimizer
--overlap-grad-reduce --overlap-param-gather --distributed-backend nccl --split 99,1,0
--log-interval 10 --save-interval 500 --eval-interval 250 --eval-iters 10 --seed 1234
--attention-backend auto --ckpt-format torch_dist --accumulate-allreduce-grads-in-fp32 --log-throughput
--log-validation-ppl-to-tensorboard --log-memory-to-tensorboard --log-timers-to-tensorboard --timing-log-level 0
--no-masked-softmax-fusion --no-bias-gelu-fusion --no-bias-swiglu-fusion --no-bias-dropout-fusion
--no-gradient-accumulation-fusion --num-workers 2 --tensorboard-log-interval 5 --distributed-timeout-minutes 20
--eod-mask-loss --calculate-per-token-loss --dataloader-type single --tensorboard-queue-size 1000
--log-num-zeros-in-grad --check-weight-hash-across-dp-replicas-interval 20 --empty-unused-memory-level 0
--rerun-mode disabled --qk-layernorm --optimizer adam --use-dist-ckpt --timing-log-option max
--no-create-attention-mask-in-dataloader --tiktoken-pattern v2 --decoupled-lr 5e-4 --decoupled-min-lr 4.5e-5
--no-persist-layer-norm --auto-detect-ckpt-format --dist-ckpt-strictness assume_ok_unexpected
--num-dataset-builder-threads 2 --no-rope-fusion --no-async-tensor-model-parallel-allreduce --local-rank 0
--lr-warmup-init 1e-5 --log-batch-size-to-tensorboard
""".split()


def test_megatron_lm_script_parses():
    args = parse_args(MEGATRON_LM_SCRIPT)
    assert (args.num_query_groups, args.train_iters, args.lr_warmup_iters) == (4, 2000, 20)
    assert args.overlap_param_gather and args.bf16 and args.position_embedding_type == "none"
    assert (args.tensorboard_log_interval, args.distributed_timeout_minutes) == (5, 20)
    assert args.eod_mask_loss and args.log_num_zeros_in_grad
    assert (args.check_weight_hash_across_dp_replicas_interval, args.tensorboard_queue_size) == (20, 1000)
    assert args.num_dataset_builder_threads == 2 and args.lr_warmup_init == 1e-5 and args.local_rank == 0
    # the experts' tensor parallelism equal to the dense layers' (Megatron-LM's default) is what runs here
    assert parse_args(MEGATRON_LM_SCRIPT + ["--expert-tensor-parallel-size", "1"]).expert_tensor_parallel_size == 1


def test_megatron_lm_script_with_rampup_and_wsd():
    """The same script with a batch-size ramp-up and a WSD schedule in samples: the ramp's
    smaller batches take more steps for the same 64000 sequences."""
    args = parse_args(MEGATRON_LM_SCRIPT + ["--rampup-batch-size", "8", "8", "6400", "--lr-decay-style", "WSD",
                                            "--lr-wsd-decay-samples", "6400", "--lr-wsd-decay-style", "linear"])
    assert args.rampup_batch_size == [8, 8, 6400]
    # ramp 8 -> 16 -> 24 over 6400 sequences (a third each, 2133.3): 267 steps of 8 (to 2136),
    # 134 of 16 (to 4280), 89 of 24 (to 6416, past 6400: the next step takes 32), then
    # ceil(57584 / 32) = 1800 steps of 32
    assert args.train_iters == 267 + 134 + 89 + 1800
    assert args.lr_wsd_decay_iters == 200


@pytest.mark.parametrize("flags,key", [
    (["--normalization", "LayerNorm"], "normalization"),
    (["--position-embedding-type", "learned_absolute"], "position_embedding_type"),
    (["--no-swiglu"], "swiglu"),
    (["--attention-dropout", "0.1"], "attention_dropout"),
    (["--hidden-dropout", "0.1"], "hidden_dropout"),
    (["--distributed-backend", "mpi"], "distributed_backend"),
    (["--attention-backend", "cudnn"], "attention_backend"),
    (["--ckpt-format", "torch"], "ckpt_format"),
    (["--recompute-activations"], "recompute_activations"),
    (["--fp16"], "fp16"),
    (["--no-calculate-per-token-loss"], "calculate_per_token_loss"),
    (["--tensorboard-log-interval", "0"], "tensorboard_log_interval"),
    (["--num-experts", "8", "--moe-router-fusion"], "moe_router_fusion"),
    (["--expert-model-parallel-size", "2"], "expert_model_parallel_size"),
    (["--no-save-optim"], "save_optim"),
    (["--no-save-rng"], "save_rng"),
    (["--manual-gc-interval", "5"], "manual_gc_interval"),
    (["--num-experts", "4", "--tensor-model-parallel-size", "2", "--sequence-parallel",
      "--expert-tensor-parallel-size", "1"], "expert_tensor_parallel_size"),
    (["--manual-gc", "--manual-gc-interval", "-1"], "manual_gc_interval"),
    (["--save", "ckpt", "--deepspeed", "--no-save-optim"], "save_optim"),
])
def test_unavailable_values_name_the_key(flags, key):
    with pytest.raises(ConfigError, match=f"'{key}'"):
        parse_args(flags)


@pytest.mark.parametrize("flags,key,text", [
    (["--train-iter", "5"], "train_iter", "unknown flag --train-iter (did you mean --train-iters?)"),
    (["--foo-bar"], "foo_bar", "unknown flag --foo-bar (see --help)"),
    (["--train-it", "5"], "train_it", "unknown flag"),  # no abbreviations: it must not set train_iters
    (["--lr", "abc"], "lr", "invalid float value: 'abc'"),
    (["--lr"], "lr", "expected one argument"),
    (["--num-layers-per-virtual-pipeline-stage", "2"], "num_layers_per_virtual_pipeline_stage", "not built"),
    (["--use-torch-fsdp2"], "use_torch_fsdp2", "FSDP is not built"),
    (["--initial-loss-scale", "4096"], "initial_loss_scale", "fp16"),
    (["--no-fp8-param-gather"], "fp8_param_gather", "FP8"),
    (["--decoupled-min-lr", "5e-5"], "decoupled_min_lr", "needs decoupled_lr"),
    (["--no-lr", "3"], "lr", "takes a value"),
    (["--moe-router-fusion"], "moe_router_fusion", "Mixture-of-Experts option"),
    (["stray"], "command line", "unexpected argument 'stray'"),
    (["--optimizer", "sgd"], "optimizer", "'sgd'"),
    (["--no-use-dist-ckpt"], "use_dist_ckpt", "False"),
    (["--timing-log-option", "mean"], "timing_log_option", "max, minmax or all"),
    (["--fox-qk-norm", "--no-qk-layernorm"], "qk_layernorm", "contradicts fox_qk_norm"),
    (["--microbatch-group-size-per-virtual-pipeline-stage", "2"], "microbatch_group_size_per_virtual_pipeline_stage",
     "virtual (interleaved) pipeline stages are not built"),
    (["--use-precision-aware-optimizer"], "use_precision_aware_optimizer", "precision-aware optimizer"),
    (["--exp-avg-dtype", "bf16"], "exp_avg_dtype", "precision-aware optimizer"),
    (["--optimizer-cpu-offload"], "optimizer_cpu_offload", "CPU offload is not built"),
    (["--num-distributed-optimizer-instances", "2"], "num_distributed_optimizer_instances", "one distributed"),
    (["--use-cpu-initialization"], "use_cpu_initialization", "initialised where they live"),
    (["--log-straggler"], "log_straggler", "Resiliency Extension"),
    (["--enable-ft-package"], "enable_ft_package", "Resiliency Extension"),
    (["--dist-ckpt-strictness", "log_all"], "dist_ckpt_strictness", "'assume_ok_unexpected'"),
    (["--num-dataset-builder-threads", "0"], "num_dataset_builder_threads", "must be >= 1"),
    (["--check-for-spiky-loss"], "check_for_spiky_loss", "rerun state machine"),
    (["--ddp-average-in-collective"], "ddp_average_in_collective", "calculate_per_token_loss"),
    (["--use-persistent-ckpt-worker"], "use_persistent_ckpt_worker", "synchronous"),
    (["--pipeline-model-parallel-layout", "E|t*4|L"], "pipeline_model_parallel_layout", "uneven stages"),
])
def test_bad_flags_name_the_key_in_one_line(flags, key, text):
    """argparse's own complaints and unknown flags become one ConfigError naming the key
    (main prints it as one line, exit code 2), not the usage of every flag."""
    with pytest.raises(ConfigError) as e:
        parse_args(flags)
    assert e.value.key == key and text in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_unknown_yaml_key_suggests_the_nearest(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("num_layer: 3\n")
    with pytest.raises(ConfigError, match=r"'num_layer': unknown key in .*c\.yaml \(did you mean num_layers\?\)"):
        parse_args(["--config", str(cfg)])
    cfg.write_text("async_save: true\n")
    with pytest.raises(ConfigError, match="'async_save': saves are synchronous"):
        parse_args(["--config", str(cfg)])


def test_megatron_lm_aliases():
    assert parse_args(["--qk-layernorm"]).fox_qk_norm is True
    assert parse_args(["--no-qk-layernorm", "--acp-logit-bound", "data"]).fox_qk_norm is False
    assert parse_args([]).fox_qk_norm is True and parse_args([]).timing_log_option == "minmax"
    import importlib.util
    if importlib.util.find_spec("transformer_engine") is None:
        with pytest.raises(ConfigError, match="'cross_entropy_fusion_impl'"):
            parse_args(["--cross-entropy-loss-fusion", "--cross-entropy-fusion-impl", "te"])


def test_help_lists_every_flag_under_a_heading(capsys):
    """--help groups the ~400 flags under headings (the parts of OPTIONS), every flag once."""
    from megatron_fox.training.arguments import HELP_SECTIONS, OPTIONS, build_parser

    parser = build_parser()
    text = parser.format_help()
    for title in HELP_SECTIONS.values():
        assert f"\n{title}:\n" in text, title
    grouped = [a.dest for g in parser._action_groups if g.title in HELP_SECTIONS.values() for a in g._group_actions]
    assert sorted(grouped) == sorted(OPTIONS)


def test_use_checkpoint_args_reads_a_newer_non_persistent_checkpoint(tmp_path):
    """A run that crashed before its first persistent save: --use-checkpoint-args reads the
    model's flags from <load>/non_persistent with --non-persistent-ckpt-type global (as the
    resume itself would load from there), and without it finds no checkpoint, naming the key."""
    import json

    np_iter = tmp_path / "non_persistent" / "iter_0000006"
    np_iter.mkdir(parents=True)
    (np_iter / "args.json").write_text(json.dumps({"num_layers": 3, "hidden_size": 96}))
    (tmp_path / "non_persistent" / "latest_checkpointed_iteration.txt").write_text("6")
    flags = ["--load", str(tmp_path), "--use-checkpoint-args", "--num-attention-heads", "4"]
    args = parse_args(flags + ["--non-persistent-ckpt-type", "global"])
    assert (args.num_layers, args.hidden_size) == (3, 96)
    with pytest.raises(ConfigError, match="'use_checkpoint_args'"):
        parse_args(flags)
