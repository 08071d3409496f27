set -u
t0=$(date +%s); R=$PWD
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl 2>&1 | tail -1
export PYTHONWARNINGS=ignore PYTHONUNBUFFERED=1 MEGATRON_FOX_CACHE=/tmp/mfc PYTHONPATH=/tmp/site:$PWD
nvidia-smi --query-gpu=name --format=csv,noheader; date -u
mkdir -p $OUT/bench
B="tools/bench_train.py --config configs/fox_pro_125m.yaml --lengths 4096 16384 --micro-batch-tokens 65536 --train-iters 30"
timeout 560 python3 $B --acp-modes transformer transformer-pro off lse --json $OUT/bench/train.json > $OUT/bench/train.log 2>&1; grep -E "^\| [0-9]|rror" $OUT/bench/train.log
echo "== t=$(( $(date +%s)-t0 ))"
