#!/usr/bin/env bash
# A/B/C of the d=128 dK/dV tile: old = HEAD (64x128, 8 warps, 3 stages), new = 64x64/4/2, c = 32x64/4/3.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONWARNINGS=ignore
nvidia-smi --query-gpu=name --format=csv,noheader
for rnd in 1 2; do
for side in old new c; do
  if [ $side = old ]; then P=/tmp/site:$PWD/gpu_old; elif [ $side = c ]; then P=/tmp/site:$PWD/gpu_c; else P=/tmp/site:$PWD; fi
  PYTHONPATH=$P:$PWD timeout 110 python3 tools/bench_attention.py --impls fox_exact fox_acp_b --lengths 4096 16384 32768 \
    > $OUT/ab_${side}_$rnd.log 2>&1
  echo "$side $rnd rc $?"; grep -E "^\| fox" $OUT/ab_${side}_$rnd.log | sed "s/^/$side$rnd /"
done; done
PYTHONPATH=/tmp/site:$PWD timeout 100 python3 tools/bench_attention.py --check > $OUT/check.log 2>&1; echo "check rc $?"; grep worst $OUT/check.log
