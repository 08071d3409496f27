#!/usr/bin/env bash
# Session 8, call 6 (2 GPUs): the Megatron path tests after the multi-bucket checkpoint fix.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONWARNINGS=ignore NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export TRITON_CACHE_DIR=$PWD/.triton_cache PYTHONPATH=/tmp/site:$PWD
MEGATRON_FOX_TEST_GPU=1 timeout -s INT 280 python3 -m pytest -q tests/gpu/test_megatron_path.py \
  --durations=3 -p no:cacheprovider > $OUT/tests.log 2>&1; echo "tests rc $?"; tail -12 $OUT/tests.log
