#!/bin/bash
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl .whl/ds/*.whl || exit
export PYTHONWARNINGS=ignore PYTHONUNBUFFERED=1 TRITON_CACHE_DIR=/tmp/triton
nvidia-smi --query-gpu=name,clocks.max.sm,power.limit --format=csv
ROOT=$PWD
run() { # name dir extra...
  local name=$1 dir=$2; shift 2
  ( cd $dir && export PYTHONPATH=/tmp/site:$PWD MEGATRON_FOX_CACHE=/tmp/mfc_$name && GPUS_PER_NODE=2 timeout ${T:-170} bash launch/torchrun.sh --config configs/fox_pro_125m.yaml --seq-length 65536 --context-parallel-size 2 --micro-batch-size 1 --global-batch-size 2 --train-iters ${ITERS:-12} --log-interval 1 "$@" ) > $OUT/$name.log 2>&1
  echo "== $name rc=$?"; tr '\r' '\n' < $OUT/$name.log | grep -o "step  .*" | cut -c1-140 | tail -6
}
for spec in "$@"; do eval "run $spec"; done
