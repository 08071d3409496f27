#!/usr/bin/env bash
# Session 8, call 5 (2 GPUs): which DP=2 resume breaks? tiny model, 20 steps, exit+save at 10, resume; vs uninterrupted.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONWARNINGS=ignore NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export TRITON_CACHE_DIR=$PWD/.triton_cache PYTHONPATH=/tmp/site:$PWD MEGATRON_FOX_CACHE=/tmp/mfcache
F="--num-layers 2 --hidden-size 128 --num-attention-heads 4 --ffn-hidden-size 384 --seq-length 512 --micro-batch-size 2
   --global-batch-size 8 --lr 3e-3 --lr-warmup-iters 5 --log-interval 1 --no-progress-bar --device cuda --bf16
   --default-corpus-bytes 2000000 --default-vocab-size 1024 --split 100,0,0 --train-iters 20"
T="timeout 60 torchrun --standalone --nproc_per_node 2 -m megatron_fox.train $F"
losses() { grep -oE "step +[0-9]+ \| loss [0-9.]+" $1 | awk '{printf "%s ", $4}'; echo; }
$T > $OUT/ref.log 2>&1; echo "ref rc $?"; echo -n "ref       "; losses $OUT/ref.log
run() {  # name, env, flags
  rm -rf /tmp/ck_$1
  env $2 $T $3 --exit-interval 10 --save /tmp/ck_$1 > $OUT/$1_a.log 2>&1; a=$?
  env $2 $T $3 --load /tmp/ck_$1 > $OUT/$1_b.log 2>&1; echo "$1 rc $a $?"
  echo -n "$1 first "; losses $OUT/$1_a.log; echo -n "$1 rest  "; losses $OUT/$1_b.log
}
run plain "X=1" ""
run ovl1bucket "X=1" "--overlap-grad-reduce --overlap-param-gather"
run grad_smallbk "X=1" "--overlap-grad-reduce --ddp-bucket-size 100000"
run ovl_smallbk_dprs "MEGATRON_FOX_OPTIM_SHARDING=dp_reshardable" "--overlap-grad-reduce --overlap-param-gather --ddp-bucket-size 100000"
run plain_dprs "MEGATRON_FOX_OPTIM_SHARDING=dp_reshardable" ""
