#!/usr/bin/env bash
# Launch megatron_fox.train with torchrun, one process per GPU (or per CPU worker with --device cpu).
#   single node:  GPUS_PER_NODE=8 launch/torchrun.sh --config configs/fox_pro_125m.yaml
#   multi-node:   NNODES=4 NODE_RANK=<0..3> MASTER_ADDR=<node 0 host> launch/torchrun.sh --config ...
# Extra arguments go to the trainer (Megatron-LM flag names).
set -euo pipefail
GPUS_PER_NODE=${GPUS_PER_NODE:-$(python3 -c 'import torch; print(max(1, torch.cuda.device_count()))')}
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}
# On SIGTERM torchrun forwards it to the ranks and kills them after this many seconds: with
# --exit-signal-handler they finish the step and save first, which takes longer than the 30 s default
# (torch 2.13 reads this variable; a torch that does not keeps 30 s).
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-600}
exec torchrun --nproc_per_node "$GPUS_PER_NODE" --nnodes "$NNODES" --node_rank "$NODE_RANK" \
    --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" \
    -m megatron_fox.train "$@"
