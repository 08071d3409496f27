#!/usr/bin/env bash
# 2 GPUs: the ring at 32k/64k, backward pruning bound vs lse, alternating, two rounds (bench_cp's own timing).
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONWARNINGS=ignore NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export TRITON_CACHE_DIR=$PWD/.triton_cache PYTHONPATH=/tmp/site:$PWD
for rnd in 1 2; do for bp in bound lse; do
  timeout 100 torchrun --standalone --nproc_per_node 2 tools/bench_cp.py --multi-gpu --cp-comm-type p2p --lengths 32768 65536 \
    --iters 10 --backward-pruning $bp > $OUT/ring_${bp}_$rnd.log 2>&1; echo "$bp $rnd rc $?"
  grep -E "^\| [0-9]+ \| 2 \| (exact|acp)" $OUT/ring_${bp}_$rnd.log | sed "s/^/$bp$rnd /"
done; done
