set -u
t0=$(date +%s); R=$PWD
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl 2>&1 | tail -1
export PYTHONWARNINGS=ignore PYTHONUNBUFFERED=1 MEGATRON_FOX_CACHE=/tmp/mfc PYTHONPATH=/tmp/site:$PWD
nvidia-smi --query-gpu=name --format=csv,noheader; date -u
mkdir -p $OUT/bench
B="tools/bench_train.py --config configs/fox_pro_760m.yaml --lengths 16384 4096 --tokens-per-step 131072 --micro-batch-tokens 16384 --train-iters 16 --warmup-steps 4"
timeout 330 python3 $B --acp-modes transformer lse --json $OUT/bench/train.json > $OUT/bench/train.log 2>&1; grep -E "^\| [0-9]|rror|GPU:" $OUT/bench/train.log
echo "== t=$(( $(date +%s)-t0 )) every block"
left=$(( 585-($(date +%s)-t0) ))
MEGATRON_FOX_SKIP_ZERO=0 timeout $left python3 $B --acp-modes off --json $OUT/bench/train_every_block.json > $OUT/bench/train_every_block.log 2>&1; grep -E "^\| [0-9]|rror" $OUT/bench/train_every_block.log
echo "== t=$(( $(date +%s)-t0 ))"
