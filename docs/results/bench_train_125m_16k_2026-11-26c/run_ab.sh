#!/usr/bin/env bash
# 125M training at 16k (head_dim 64): keys' prefix sums by TMA (new = HEAD) vs not (old = 29ac21c), two rounds.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONWARNINGS=ignore
nvidia-smi --query-gpu=name --format=csv,noheader
for rnd in 1 2; do
for side in old new; do
  if [ $side = old ]; then P=/tmp/site:$PWD/gpu_old; else P=/tmp/site:$PWD; fi
  PYTHONPATH=$P:$PWD timeout 120 python3 tools/bench_train.py --config configs/fox_pro_125m.yaml --lengths 16384 \
    --micro-batch-tokens 65536 --train-iters 20 --json $OUT/train_${side}_$rnd.json > $OUT/train_${side}_$rnd.log 2>&1
  echo "$side $rnd rc $?"; grep -E "^\| 16384" $OUT/train_${side}_$rnd.log | sed "s/^/$side$rnd /"
done; done
