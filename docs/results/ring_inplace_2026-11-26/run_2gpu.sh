#!/usr/bin/env bash
# Ninth session (2 x H100): the ring at HEAD (in-place bf16 grad adds, base-2 lse) vs 239a3b0 in gpu_old/ (git archive 239a3b0 megatron_fox tools)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONWARNINGS=ignore NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export TRITON_CACHE_DIR=$PWD/.triton_cache
nvidia-smi --query-gpu=name --format=csv,noheader
for rnd in 1 2; do for ver in old new; do
  if [ $ver = old ]; then root=$PWD/gpu_old; else root=$PWD; fi
  PYTHONPATH=/tmp/site:$root timeout 120 torchrun --standalone --nproc_per_node 2 $root/tools/bench_cp.py --multi-gpu \
    --cp-comm-type p2p --lengths 16384 32768 65536 --iters 10 --backward-pruning lse > $OUT/ring_${ver}_$rnd.log 2>&1
  echo "$ver $rnd rc $?"; grep -E "^\| [0-9]+ \| 2 \| (exact|acp)" $OUT/ring_${ver}_$rnd.log | sed "s/^/$ver r$rnd /"
done; done
