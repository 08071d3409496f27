#!/usr/bin/env bash
# Session 8, call 1: the GPU tests not yet run (export via from-megatron, hybrid export), then
# recompute on the 125M run at 16k (tokens/s, peak memory).
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONWARNINGS=ignore PYTHONPATH=/tmp/site:$PWD
nvidia-smi --query-gpu=name --format=csv,noheader
MEGATRON_FOX_TEST_GPU=1 timeout -s INT 330 python3 -m pytest -q -x tests/gpu/test_generate.py tests/gpu/test_hybrid.py \
  --durations=8 -p no:cacheprovider > $OUT/tests.log 2>&1; echo "tests rc $?"; tail -25 $OUT/tests.log
for rc in none full; do
  if [ $rc = none ]; then X=""; else X="-- --recompute-granularity full --recompute-method uniform --recompute-num-layers 1"; fi
  timeout 110 python3 tools/bench_train.py --config configs/fox_pro_125m.yaml --lengths 16384 \
    --micro-batch-tokens 65536 --train-iters 16 --acp-modes lse --json $OUT/train_rc_$rc.json $X > $OUT/train_rc_$rc.log 2>&1
  echo "recompute=$rc rc $?"; grep -E "^\|" $OUT/train_rc_$rc.log | tail -1
done
