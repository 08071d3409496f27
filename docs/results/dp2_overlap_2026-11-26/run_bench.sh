#!/usr/bin/env bash
# Session 8, call 4 (2 GPUs): --overlap-grad-reduce / --overlap-param-gather: GPU tests (DP=2), then the 125M
# at 4k with DP=2, plain vs overlap, 64k tokens a step (micro-batch 8 a rank), alternating, median tokens/s.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONWARNINGS=ignore NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export TRITON_CACHE_DIR=$PWD/.triton_cache PYTHONPATH=/tmp/site:$PWD MEGATRON_FOX_CACHE=/tmp/mfcache
nvidia-smi --query-gpu=name --format=csv,noheader
MEGATRON_FOX_TEST_GPU=1 timeout -s INT 330 python3 -m pytest -q tests/gpu/test_megatron_path.py -k overlap \
  --durations=3 -p no:cacheprovider > $OUT/tests.log 2>&1; echo "tests rc $?"; tail -12 $OUT/tests.log
F="--config configs/fox_pro_125m.yaml --seq-length 4096 --micro-batch-size 8 --global-batch-size 16 --train-iters 25
   --lr-warmup-iters 5 --log-interval 1 --no-progress-bar --default-vocab-size 8192 --default-corpus-bytes 8000000 --bf16"
for r in 1 2; do for mode in plain overlap; do
  if [ $mode = overlap ]; then X="--overlap-grad-reduce --overlap-param-gather"; else X=""; fi
  timeout 100 torchrun --standalone --nproc_per_node 2 -m megatron_fox.train $F $X > $OUT/dp2_${mode}_$r.log 2>&1
  echo "$mode r$r rc $?"
  python3 - $OUT/dp2_${mode}_$r.log <<'PY'
import re, statistics, sys
rows = [(int(m[1]), float(m[2]), float(m[3])) for m in re.findall(r"step\s+(\d+) \| loss ([\d.]+) .*?tokens/s (\d+)", open(sys.argv[1]).read())]
if rows:
    print(f"  steps {len(rows)}  median tokens/s (steps 6+) {statistics.median(t for s, _, t in rows if s > 5):.0f}  loss at {rows[-1][0]}: {rows[-1][1]}")
PY
done; done
