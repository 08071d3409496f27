#!/usr/bin/env bash
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONWARNINGS=ignore PYTHONPATH=/tmp/site:$PWD
nvidia-smi --query-gpu=name,clocks.max.sm,power.limit --format=csv,noheader
nvidia-smi --query-gpu=timestamp,clocks.sm,power.draw,temperature.gpu,clocks_throttle_reasons.active --format=csv,noheader -lms 250 > $OUT/smi.csv &
SMI=$!
timeout 200 python3 gpu_gap.py 2>&1 | tail -80
kill $SMI
awk -F, '{print $2, $3, $4, $5}' $OUT/smi.csv | sort | uniq -c | sort -rn | head -12
