set -u
t0=$(date +%s)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl 2>&1 | tail -1
export PYTHONWARNINGS=ignore PYTHONUNBUFFERED=1 MEGATRON_FOX_CACHE=/tmp/mfc PYTHONPATH=/tmp/site:$PWD
nvidia-smi --query-gpu=name --format=csv,noheader; date -u
mkdir -p $OUT/gg2
B="tools/bench_train.py --config configs/fox_pro_125m.yaml --lengths 16384 --micro-batch-tokens 65536 --acp-modes lse"
M="--num-experts 8 --moe-router-topk 2 --moe-token-dispatcher-type alltoall"
timeout 80 python3 $B --train-iters 20 --json $OUT/gg2/seq8.json -- $M 2>&1 | grep -E "^\| [0-9]|rror" | tee $OUT/gg2/seq8.log
timeout 80 python3 $B --train-iters 20 --json $OUT/gg2/grouped8.json -- $M --moe-grouped-gemm 2>&1 | grep -E "^\| [0-9]|rror" | tee $OUT/gg2/grouped8.log
echo "== t=$(( $(date +%s)-t0 ))"
F="--num-experts 32 --moe-ffn-hidden-size 448 --moe-router-topk 8 --moe-token-dispatcher-type alltoall"
timeout 85 python3 $B --train-iters 12 --json $OUT/gg2/seq32.json -- $F 2>&1 | grep -E "^\| [0-9]|rror" | tee $OUT/gg2/seq32.log
timeout 85 python3 $B --train-iters 12 --json $OUT/gg2/grouped32.json -- $F --moe-grouped-gemm 2>&1 | grep -E "^\| [0-9]|rror" | tee $OUT/gg2/grouped32.log
echo "== t=$(( $(date +%s)-t0 ))"
