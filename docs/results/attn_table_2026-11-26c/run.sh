#!/usr/bin/env bash
# Main table of docs/benchmarks.md (issue 3) with the kernels of steps 17-18; then the profile at 16k.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONWARNINGS=ignore PYTHONPATH=/tmp/site:$PWD
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 420 python3 tools/bench_attention.py --json $OUT/table.json > $OUT/table.log 2>&1; echo "table rc $?"
grep -E "^\|" $OUT/table.log
timeout 100 python3 tools/bench_attention.py --profile --lengths 16384 > $OUT/profile.log 2>&1; echo "profile rc $?"
grep -E "kernel|log_eps|total|ms" $OUT/profile.log | head -24
