#!/usr/bin/env bash
# A/B: backward row term precombined (new) vs HEAD (gpu_old); then --check and --profile on new.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONWARNINGS=ignore
nvidia-smi --query-gpu=name --format=csv,noheader
for rnd in 1 2; do
for side in old new; do
  if [ $side = old ]; then P=/tmp/site:$PWD/gpu_old; else P=/tmp/site:$PWD; fi
  PYTHONPATH=$P:$PWD timeout 150 python3 tools/bench_attention.py --impls fox_exact fox_acp_b --lengths 4096 16384 32768 \
    --json $OUT/ab_${side}_$rnd.json > $OUT/ab_${side}_$rnd.log 2>&1
  echo "$side $rnd rc $?"; grep -E "^\| fox" $OUT/ab_${side}_$rnd.log | sed "s/^/$side$rnd /"
  PYTHONPATH=$P:$PWD timeout 60 python3 tools/bench_attention.py --impls fox_exact fox_acp_b --lengths 16384 --head-dim 64 \
    --json $OUT/ab64_${side}_$rnd.json > $OUT/ab64_${side}_$rnd.log 2>&1
  grep -E "^\| fox" $OUT/ab64_${side}_$rnd.log | sed "s/^/$side$rnd d64 /"
done; done
PYTHONPATH=/tmp/site:$PWD timeout 100 python3 tools/bench_attention.py --check > $OUT/check.log 2>&1; tail -2 $OUT/check.log
PYTHONPATH=/tmp/site:$PWD timeout 60 python3 tools/bench_attention.py --profile --lengths 16384 > $OUT/profile.log 2>&1; grep -iE "dkdv|dq_kernel|fwd_kernel|total" $OUT/profile.log | head -12
