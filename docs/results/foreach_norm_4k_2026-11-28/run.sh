#!/bin/bash
# Call G (2 GPUs): 4k training before/after the foreach grad norm (crossed over the GPUs); op launch overhead.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit
export PYTHONWARNINGS=ignore PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name --format=csv,noheader; date -u
b() { # name dir gpu tokens
  ( cd $2 && CUDA_VISIBLE_DEVICES=$3 PYTHONPATH=/tmp/site:$PWD MEGATRON_FOX_CACHE=/tmp/mfc_${1%%_*} TRITON_CACHE_DIR=/tmp/tri_$3 timeout 200 \
    python3 tools/bench_train.py --config configs/fox_pro_125m.yaml --lengths 4096 --tokens-per-step $4 --train-iters 20 --acp-modes lse \
    --json $OUT/$1.json > $OUT/$1.log 2>&1 ); echo "$1 rc=$?"; grep '"tokens_per_s"' $OUT/$1.json | head -2; }
b base_g0_64k gpu_old/base 0 65536 & b new_g1_64k . 1 65536 & wait
b new_g0_64k . 0 65536 & b base_g1_64k gpu_old/base 1 65536 & wait
b base_g0_256k gpu_old/base 0 262144 & b new_g1_256k . 1 262144 & wait
for f in $OUT/*.json; do echo "$(basename $f) $(python3 -c "import json,sys;r=json.load(open('$f'))[0];print(r['tokens_per_s'],r['loss_last10'],r['final_loss'])")"; done
CUDA_VISIBLE_DEVICES=0 PYTHONPATH=/tmp/site:$PWD TRITON_CACHE_DIR=/tmp/tri_0 timeout 120 python3 gpu_launch.py 2>&1 | tail -12
