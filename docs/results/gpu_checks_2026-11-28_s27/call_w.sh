#!/bin/bash
# Call W (4 GPUs, parallel): is the 4k loss gap of new (HEAD) vs old (d2076be) noise? exact both, and a second seed.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit
export PYTHONWARNINGS=ignore PYTHONUNBUFFERED=1; ROOT=$PWD; t0=$(date +%s)
b() { local g=$1 name=$2 dir=$3 mode=$4; shift 4
  ( cd $dir && CUDA_VISIBLE_DEVICES=$g PYTHONPATH=/tmp/site:$PWD TRITON_CACHE_DIR=/tmp/tw$g MEGATRON_FOX_CACHE=/tmp/mw$g timeout 170 \
    python3 tools/bench_train.py --config configs/fox_pro_125m.yaml --lengths 4096 --acp-modes $mode "$@" ) > $OUT/$name.log 2>&1
  echo "== $name rc=$? at $(( $(date +%s) - t0 )) s: $(grep '^{' $OUT/$name.log | cut -c1-200)"; }
b 0 new_off $ROOT off & b 1 old_off $ROOT/gpu_old/sb off &
b 2 new_s2 $ROOT lse -- --seed 1235 & b 3 old_s2 $ROOT/gpu_old/sb lse -- --seed 1235 &
wait
