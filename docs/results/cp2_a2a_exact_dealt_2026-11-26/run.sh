#!/usr/bin/env bash
# Seventh session, 2 GPUs: (1) a2a exact FoX heads dealt by cost (HEAD) vs evenly (3f6022c in gpu_old), two rounds;
# (2) the ring's lse slowdown at 32k: GPU timelines per rank, bound vs lse (and 64k for contrast).
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONWARNINGS=ignore NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export TRITON_CACHE_DIR=$PWD/.triton_cache
nvidia-smi --query-gpu=name --format=csv,noheader
for rnd in 1 2; do
  for side in old new; do
    if [ $side = old ]; then D=$PWD/gpu_old; else D=$PWD; fi
    (cd $D && PYTHONPATH=/tmp/site:$D timeout 110 torchrun --standalone --nproc_per_node 2 tools/bench_cp.py --multi-gpu \
      --cp-comm-type a2a --lengths 32768 65536 --iters 10 > $OUT/a2a_${side}_$rnd.log 2>&1); echo "$side $rnd rc $?"
    grep -E "^\| [0-9]+ \| 2 \| a2a" $OUT/a2a_${side}_$rnd.log | sed "s/^/$side$rnd /"
  done
done
for L in 32768 65536; do
  PYTHONPATH=/tmp/site:$PWD timeout 120 torchrun --standalone --nproc_per_node 2 gpu_cpt.py $L > $OUT/timeline_$L.log 2>&1
  echo "timeline $L rc $?"; grep "^rank" $OUT/timeline_$L.log
done
gzip $OUT/trace_*.json; ls -la $OUT
