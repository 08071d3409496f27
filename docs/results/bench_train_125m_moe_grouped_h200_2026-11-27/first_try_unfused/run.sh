set -u
t0=$(date +%s)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl 2>&1 | tail -1
export PYTHONWARNINGS=ignore PYTHONUNBUFFERED=1 MEGATRON_FOX_CACHE=/tmp/mfc PYTHONPATH=/tmp/site:$PWD
nvidia-smi --query-gpu=name --format=csv,noheader; date -u
MEGATRON_FOX_TEST_GPU=1 CUDA_VISIBLE_DEVICES=0 timeout 150 python3 -m pytest -q -s -p no:cacheprovider tests/gpu/test_megatron_path.py -k grouped 2>&1 | grep -E "^(sequential|grouped|E  )|passed|failed|Error" | tail -20
echo "== t=$(( $(date +%s)-t0 ))"
mkdir -p $OUT/gg
B="tools/bench_train.py --config configs/fox_pro_125m.yaml --lengths 16384 --micro-batch-tokens 65536 --train-iters 20 --acp-modes lse"
M="--num-experts 8 --moe-router-topk 2 --moe-token-dispatcher-type alltoall"
export CUDA_VISIBLE_DEVICES=0

timeout 110 python3 $B --json $OUT/gg/seq_1gpu.json -- $M 2>&1 | grep -E "^\| [0-9]|rror|load bal" | tee $OUT/gg/seq_1gpu.log
timeout 110 python3 $B --json $OUT/gg/grouped_1gpu.json -- $M --moe-grouped-gemm 2>&1 | grep -E "^\| [0-9]|rror|load bal" | tee $OUT/gg/grouped_1gpu.log
echo "== t=$(( $(date +%s)-t0 ))"
unset CUDA_VISIBLE_DEVICES
B2="$B --tokens-per-step 131072"
timeout 110 python3 -m torch.distributed.run --nproc-per-node 2 --master-port 29511 $B2 --json $OUT/gg/ep2_seq.json -- $M --expert-model-parallel-size 2 2>&1 | grep -E "^\| [0-9]|rror|load bal" | tee $OUT/gg/ep2_seq.log
timeout 110 python3 -m torch.distributed.run --nproc-per-node 2 --master-port 29512 $B2 --json $OUT/gg/ep2_grouped.json -- $M --expert-model-parallel-size 2 --moe-grouped-gemm 2>&1 | grep -E "^\| [0-9]|rror|load bal" | tee $OUT/gg/ep2_grouped.log
echo "== t=$(( $(date +%s)-t0 ))"
