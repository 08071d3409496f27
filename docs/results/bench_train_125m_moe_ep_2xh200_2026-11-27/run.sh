set -u
t0=$(date +%s)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl 2>&1 | tail -1
export PYTHONWARNINGS=ignore PYTHONUNBUFFERED=1 MEGATRON_FOX_CACHE=/tmp/mfc PYTHONPATH=/tmp/site:$PWD
nvidia-smi --query-gpu=name --format=csv,noheader; date -u
mkdir -p $OUT/ep
B="tools/bench_train.py --config configs/fox_pro_125m.yaml --lengths 16384 --micro-batch-tokens 65536 --tokens-per-step 131072 --train-iters 20 --acp-modes lse"
M="--num-experts 8 --moe-router-topk 2 --moe-token-dispatcher-type alltoall"
for ep in 1 2; do
timeout 200 python3 -m torch.distributed.run --nproc-per-node 2 --master-port 2950$ep $B --json $OUT/ep/ep$ep.json -- $M --expert-model-parallel-size $ep 2>&1 | grep -E "^\| [0-9]|rror|load bal|EP " | tee $OUT/ep/ep$ep.log
echo "== t=$(( $(date +%s)-t0 ))"
done
timeout 150 python3 -m torch.distributed.run --nproc-per-node 2 --master-port 29503 $B --json $OUT/ep/dense.json 2>&1 | grep -E "^\| [0-9]|rror|EP " | tee $OUT/ep/dense.log
echo "== t=$(( $(date +%s)-t0 ))"
