#!/bin/bash
# Call F (2 GPUs): the rest of the kernel tests on GPU 0 beside nothing; then a2a at 64k, CP=2, mbs 1 and 2.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl .whl/ds/*.whl || exit
export PYTHONPATH=/tmp/site:$PWD PYTHONWARNINGS=ignore PYTHONUNBUFFERED=1 MEGATRON_FOX_CACHE=/tmp/mfc
t0=$(date +%s)
( export MEGATRON_FOX_TEST_GPU=1 CUDA_VISIBLE_DEVICES=0 TRITON_CACHE_DIR=/tmp/tri0; F=tests/ops/test_forgetting_attention.py
  timeout 330 python3 -m pytest -q -p no:cacheprovider "$F::test_backward_pruning_by_lse" "$F::test_exact_skips_only_zero_blocks" tests/ops/test_merge.py tests/ops/test_pruned_attention_kernel.py tests/ops/test_memo.py > $OUT/ops2.txt 2>&1; echo "ops rc=$? $(( $(date +%s) - t0 )) s" >> $OUT/ops2.txt ) &
( export CUDA_VISIBLE_DEVICES=1 TRITON_CACHE_DIR=/tmp/tri1
  timeout 330 python3 tools/bench_train.py --config configs/fox_pro_125m.yaml --lengths 4096 --tokens-per-step 65536 --train-iters 12 --acp-modes lse --profile --json $OUT/prof4k.json > $OUT/prof4k.log 2>&1; echo "prof4k rc=$?" >> $OUT/prof4k.log ) &
wait
tail -6 $OUT/ops2.txt; grep -h "profile\|tokens_per_s\|rc=" $OUT/prof4k.log | head
run() { name=$1; shift
  GPUS_PER_NODE=2 MASTER_PORT=$((20000 + RANDOM % 20000)) TRITON_CACHE_DIR=/tmp/tri1 timeout 110 launch/torchrun.sh --config configs/fox_pro_125m.yaml --seq-length 65536 \
    --context-parallel-size 2 --global-batch-size 2 --train-iters 10 --log-interval 1 "$@" > $OUT/$name.log 2>&1
  echo "== $name rc=$? $(( $(date +%s) - t0 )) s"; tr '\r' '\n' < $OUT/$name.log | grep -o "step  .*" | cut -c1-150 | tail -4; }
run a2a_mbs1 --cp-comm-type a2a --micro-batch-size 1
run a2a_mbs2 --cp-comm-type a2a --micro-batch-size 2
run p2p_mbs2 --micro-batch-size 2
