#!/usr/bin/env bash
# Session 8, call 2 (1 GPU): fused boundary searches: GPU tests, search timings, op table A/B.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONWARNINGS=ignore PYTHONPATH=/tmp/site:$PWD TRITON_CACHE_DIR=$PWD/.triton_cache
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 60 python3 tools/bench_attention.py --boundaries --lengths 4096 16384 65536 > $OUT/boundaries.log 2>&1; echo "boundaries rc $?"
grep -E "^\|" $OUT/boundaries.log
MEGATRON_FOX_TEST_GPU=1 timeout -s INT 200 python3 -m pytest -q tests/ops/test_boundary.py tests/ops/test_block.py \
  --durations=5 -p no:cacheprovider > $OUT/tests_a.log 2>&1; echo "tests a rc $?"; tail -4 $OUT/tests_a.log
for r in 1 2; do for fb in 0 1; do
  MEGATRON_FOX_FUSED_BOUNDARY=$fb timeout 100 python3 tools/bench_attention.py --impls fox_exact fox_acp_b_lse \
    --lengths 4096 16384 > $OUT/table_fb${fb}_$r.log 2>&1; echo "fused=$fb r$r rc $?"
  grep -E "^\| fox" $OUT/table_fb${fb}_$r.log | sed "s/^/fb$fb /"
done; done
MEGATRON_FOX_TEST_GPU=1 timeout -s INT 240 python3 -m pytest -q tests/ops/test_forgetting_attention.py -k "not float32" \
  --durations=5 -p no:cacheprovider > $OUT/tests_b.log 2>&1; echo "tests b rc $?"; tail -4 $OUT/tests_b.log
