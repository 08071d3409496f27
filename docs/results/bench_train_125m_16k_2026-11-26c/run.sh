#!/usr/bin/env bash
# Final figures of the session: main table (issue 3) on the current kernels, then 125M training at 16k,
# kernels of the session start (gpu_old = 35a79ec) vs now, ACP on and off.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONWARNINGS=ignore
nvidia-smi --query-gpu=name --format=csv,noheader
PYTHONPATH=/tmp/site:$PWD timeout 230 python3 tools/bench_attention.py --json $OUT/table.json > $OUT/table.log 2>&1; echo "table rc $?"
grep -E "^\| (fox|sdpa_cudnn)" $OUT/table.log
for side in old new; do
  if [ $side = old ]; then P=/tmp/site:$PWD/gpu_old; else P=/tmp/site:$PWD; fi
  PYTHONPATH=$P:$PWD timeout 150 python3 tools/bench_train.py --config configs/fox_pro_125m.yaml --lengths 16384 \
    --micro-batch-tokens 65536 --train-iters 20 --json $OUT/train_$side.json > $OUT/train_$side.log 2>&1
  echo "$side rc $?"; grep -E "^\|" $OUT/train_$side.log | tail -3 | sed "s/^/$side /"
done
