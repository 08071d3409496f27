#!/bin/bash
# Call U (4 GPUs as two pairs): the 2-GPU tests after the 26th session's changes; the real CP ring/a2a checked
# against the one-GPU op.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl .whl/ds/*.whl || exit
export PYTHONWARNINGS=ignore PYTHONUNBUFFERED=1 MEGATRON_FOX_TEST_GPU=1
ROOT=$PWD; nvidia-smi --query-gpu=name --format=csv,noheader | head -1; date -u; t0=$(date +%s)
left() { echo $(( ${1:-570} - ($(date +%s) - t0) )); }
pt() { # gpus name timeout args...
  local g=$1 n=$2 to=$3; shift 3
  ( cd $ROOT && CUDA_VISIBLE_DEVICES=$g PYTHONPATH=/tmp/site:$ROOT TRITON_CACHE_DIR=/tmp/tri${g/,/} MEGATRON_FOX_CACHE=/tmp/mfc${g/,/} \
    timeout $to python3 -m pytest -q -p no:cacheprovider -rfE "$@" > $OUT/$n.txt 2>&1; echo "$n rc=$? at $(( $(date +%s) - t0 )) s" >> $OUT/$n.txt )
}
M=tests/gpu/test_megatron_path.py
( cd $ROOT && CUDA_VISIBLE_DEVICES=0,1 PYTHONPATH=/tmp/site:$ROOT TRITON_CACHE_DIR=/tmp/tri01 timeout 200 \
    torchrun --nproc_per_node 2 tools/bench_cp.py --multi-gpu --check --cp 2 --lengths 32768 --iters 3 > $OUT/cp_check.txt 2>&1
  echo "cp_check rc=$? at $(( $(date +%s) - t0 )) s" >> $OUT/cp_check.txt
  pt 0,1 pa $(left 565) "$M::test_gpu_steps_leave_no_tensors_in_reference_cycles" "$M::test_gpu_uneven_pipeline_matches_one_gpu_and_resumes" "$M::test_gpu_torchrun_sigterm_two_ranks" ) &
( pt 2,3 pb 565 "$M::test_gpu_data_parallel_overlap_matches_plain" "$M::test_gpu_fully_parallel_checkpoint_and_deterministic_mode" "$M::test_gpu_fused_cross_entropy_trains_like_plain" "$M::test_gpu_weight_hash_check_with_deferred_param_gather" "$M::test_gpu_moe_two_gpu_layouts_match_one" ) &
wait
echo "### cp_check"; grep -iE "err|max|check|rc=" $OUT/cp_check.txt | tail -25
for f in pa pb; do echo "### $f"; tail -6 $OUT/$f.txt; done
