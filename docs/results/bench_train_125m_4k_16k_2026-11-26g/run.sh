#!/usr/bin/env bash
# x1: the two GPU tests not reached earlier this session; the 125M run at 4k and 16k with today's kernels (ACP off / lse).
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONWARNINGS=ignore PYTHONPATH=/tmp/site:$PWD
nvidia-smi --query-gpu=name --format=csv,noheader
MEGATRON_FOX_TEST_GPU=1 timeout -s INT 150 python3 -m pytest -q -p no:cacheprovider "tests/ops/test_forgetting_attention.py::test_tma_tile_loads" > $OUT/test.log 2>&1
echo "test rc $?"; tail -2 $OUT/test.log
timeout 420 python3 tools/bench_train.py --config configs/fox_pro_125m.yaml --lengths 4096 16384 --micro-batch-tokens 65536 \
  --train-iters 20 --acp-modes off lse --json $OUT/train.json > $OUT/train.log 2>&1; echo "train rc $?"; grep -E "^\|" $OUT/train.log
