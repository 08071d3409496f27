#!/usr/bin/env bash
# Session 8, call 3 (2 GPUs): the ring with the boundary searches as one Triton launch each (fb1) or torch ops (fb0).
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONWARNINGS=ignore NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export TRITON_CACHE_DIR=$PWD/.triton_cache PYTHONPATH=/tmp/site:$PWD
nvidia-smi --query-gpu=name --format=csv,noheader
for fb in 0 1; do
  MEGATRON_FOX_FUSED_BOUNDARY=$fb timeout 100 torchrun --standalone --nproc_per_node 2 gpu_timeline_ring.py 32768 \
    > $OUT/timeline_fb$fb.log 2>&1; echo "timeline fb$fb rc $?"; grep "^rank" $OUT/timeline_fb$fb.log | sed "s/^/fb$fb /"
done
for rnd in 1 2; do for fb in 0 1; do
  MEGATRON_FOX_FUSED_BOUNDARY=$fb timeout 110 torchrun --standalone --nproc_per_node 2 tools/bench_cp.py --multi-gpu \
    --cp-comm-type p2p --lengths 16384 32768 65536 --iters 10 --backward-pruning lse > $OUT/ring_fb${fb}_$rnd.log 2>&1
  echo "fb$fb $rnd rc $?"; grep -E "^\| [0-9]+ \| 2 \| (exact|acp)" $OUT/ring_fb${fb}_$rnd.log | sed "s/^/fb$fb r$rnd /"
done; done
