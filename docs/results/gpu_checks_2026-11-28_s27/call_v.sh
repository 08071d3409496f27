#!/bin/bash
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl .whl/ds/*.whl || exit
export PYTHONWARNINGS=ignore PYTHONUNBUFFERED=1 MEGATRON_FOX_TEST_GPU=1
ROOT=$PWD; t0=$(date +%s)
pt() { local g=$1 n=$2 to=$3; shift 3
  ( cd $ROOT && CUDA_VISIBLE_DEVICES=$g PYTHONPATH=/tmp/site:$ROOT TRITON_CACHE_DIR=/tmp/tri$g MEGATRON_FOX_CACHE=/tmp/mfc$g \
    timeout $to python3 -m pytest -q -p no:cacheprovider -rfE "$@" > $OUT/$n.txt 2>&1; echo "$n rc=$? at $(( $(date +%s) - t0 )) s" >> $OUT/$n.txt ) ; }
pt 0 v0 470 tests/ops/test_forgetting_attention.py &
pt 1 v1 470 tests/ops/test_input_errors.py tests/ops/test_doc_maps.py tests/layers &
pt 2 v2 470 tests/gpu/test_generate.py tests/gpu/test_context_pruning_gpu.py &
pt 3 v3 470 tests/gpu/test_deepspeed_gpu.py -k "not two_gpus" &
wait; for f in v0 v1 v2 v3; do echo "### $f"; tail -5 $OUT/$f.txt; done
