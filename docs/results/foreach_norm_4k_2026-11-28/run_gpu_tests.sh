#!/bin/bash
# Call H (2 GPUs): the Megatron-path GPU tests after the foreach grad norm (resume exactness, MoE, DP=2).
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit
export PYTHONPATH=/tmp/site:$PWD PYTHONWARNINGS=ignore PYTHONUNBUFFERED=1 MEGATRON_FOX_TEST_GPU=1 MEGATRON_FOX_CACHE=/tmp/mfc
nvidia-smi --query-gpu=name --format=csv,noheader | head -1; date -u
t0=$(date +%s); M=tests/gpu/test_megatron_path.py
( CUDA_VISIBLE_DEVICES=0 TRITON_CACHE_DIR=/tmp/tri0 timeout 260 python3 -m pytest -q -p no:cacheprovider "$M::test_gpu_train_loss_falls_and_resume_matches" "$M::test_gpu_moe_trains_and_resumes" > $OUT/g0.txt 2>&1; echo "g0 rc=$? $(( $(date +%s) - t0 )) s" >> $OUT/g0.txt ) &
( CUDA_VISIBLE_DEVICES=1 TRITON_CACHE_DIR=/tmp/tri1 timeout 260 python3 -m pytest -q -p no:cacheprovider "$M::test_gpu_moe_grouped_gemm_trains_like_sequential" "$M::test_gpu_moe_routing_options_equal_cpu_engine" > $OUT/g1.txt 2>&1; echo "g1 rc=$? $(( $(date +%s) - t0 )) s" >> $OUT/g1.txt ) &
wait; tail -4 $OUT/g0.txt $OUT/g1.txt
TRITON_CACHE_DIR=/tmp/tri0 timeout $(( 480 - ($(date +%s) - t0) )) python3 -m pytest -q -p no:cacheprovider "$M::test_gpu_data_parallel_overlap_matches_plain" "$M::test_gpu_moe_two_gpu_layouts_match_one" > $OUT/g2.txt 2>&1; echo "g2 rc=$? $(( $(date +%s) - t0 )) s" >> $OUT/g2.txt
tail -4 $OUT/g2.txt
