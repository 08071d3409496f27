set -u
t0=$(date +%s)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl 2>&1 | tail -1
export PYTHONWARNINGS=ignore PYTHONUNBUFFERED=1 MEGATRON_FOX_TEST_GPU=1 MEGATRON_FOX_CACHE=/tmp/mfc PYTHONPATH=/tmp/site:$PWD
nvidia-smi --query-gpu=name --format=csv,noheader; date -u
mkdir -p $OUT/t
timeout ${T:-430} python3 -m pytest -q -s -p no:cacheprovider --durations=0 tests/gpu/test_megatron_path.py ${K:-} > $OUT/t/path.log 2>&1
grep -E "^(one|four|gpu|cpu|plain|dp2|ep2|tp2_sp|alltoall|allgather|sequential|grouped|uninterrupted|resumed|E  )|passed|failed|Error|[0-9.]+s (call|setup)" $OUT/t/path.log | cut -c1-240 | tail -60
echo "== t=$(( $(date +%s)-t0 ))"
B="tools/bench_train.py --config configs/fox_pro_125m.yaml --lengths 16384 --micro-batch-tokens 65536 --tokens-per-step 131072 --train-iters 20 --acp-modes lse"
M="--num-experts 8 --moe-router-topk 2 --moe-token-dispatcher-type alltoall --moe-grouped-gemm"
for ep in 1 2; do
  left=$(( 590-($(date +%s)-t0) )); [ $left -lt 80 ] && break
  timeout $left python3 -m torch.distributed.run --nproc-per-node 2 --master-port 2950$ep $B --json $OUT/t/gg_ep$ep.json -- $M --expert-model-parallel-size $ep 2>&1 | grep -E "^\| [0-9]|rror|EP " | tee $OUT/t/gg_ep$ep.log
  echo "== t=$(( $(date +%s)-t0 ))"
done
