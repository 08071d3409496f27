set -u
t0=$(date +%s)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl 2>&1 | tail -1
export PYTHONWARNINGS=ignore PYTHONUNBUFFERED=1 MEGATRON_FOX_CACHE=/tmp/mfc PYTHONPATH=/tmp/site:$PWD
nvidia-smi --query-gpu=name --format=csv,noheader; date -u
mkdir -p $OUT/moe
B="tools/bench_train.py --config configs/fox_pro_125m.yaml --lengths 16384 --micro-batch-tokens 65536 --train-iters 20 --acp-modes lse"
timeout 110 python3 $B --json $OUT/moe/dense.json 2>&1 | grep -E "^\| [0-9]|rror" | tee $OUT/moe/dense.log
echo "== t=$(( $(date +%s)-t0 ))"
timeout 130 python3 $B --json $OUT/moe/moe8.json -- --num-experts 8 --moe-router-topk 2 --moe-token-dispatcher-type alltoall 2>&1 | grep -E "^\| [0-9]|rror|load bal" | tee $OUT/moe/moe8.log
echo "== t=$(( $(date +%s)-t0 ))"
