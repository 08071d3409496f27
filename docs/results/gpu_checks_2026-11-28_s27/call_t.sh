#!/bin/bash
# Call T (4 GPUs): the 26th session's CPU-only work on GPUs. GPU0 op+layer tests, GPU1 bench old (d2076be) vs new,
# GPU2 Megatron-path one-GPU tests, GPU3 hybrid/extras/gluon/baseline/generate.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl .whl/ds/*.whl || exit
export PYTHONWARNINGS=ignore PYTHONUNBUFFERED=1 MEGATRON_FOX_TEST_GPU=1
ROOT=$PWD; nvidia-smi --query-gpu=name,clocks.max.sm --format=csv,noheader | head -1; date -u; t0=$(date +%s)
left() { echo $(( ${1:-570} - ($(date +%s) - t0) )); }
pt() { # gpu name timeout args...
  local g=$1 n=$2 to=$3; shift 3
  ( cd $ROOT && CUDA_VISIBLE_DEVICES=$g PYTHONPATH=/tmp/site:$ROOT TRITON_CACHE_DIR=/tmp/tri$g MEGATRON_FOX_CACHE=/tmp/mfc$g \
    timeout $to python3 -m pytest -q -p no:cacheprovider -rfE "$@" > $OUT/$n.txt 2>&1; echo "$n rc=$? at $(( $(date +%s) - t0 )) s" >> $OUT/$n.txt )
}
bench() { # name dir extra...
  local name=$1 dir=$2; shift 2
  ( cd $dir && CUDA_VISIBLE_DEVICES=1 PYTHONPATH=/tmp/site:$PWD TRITON_CACHE_DIR=/tmp/tri_$name MEGATRON_FOX_CACHE=/tmp/mfc_$name timeout $(left 560) \
    python3 tools/bench_train.py --config configs/fox_pro_125m.yaml --acp-modes lse --json $OUT/$name.json "$@" ) > $OUT/$name.log 2>&1
  echo "== $name rc=$? at $(( $(date +%s) - t0 )) s" >> $OUT/bench.txt
}
M=tests/gpu/test_megatron_path.py
( pt 0 ops_a 300 tests/ops/test_forgetting_attention.py tests/ops/test_input_errors.py tests/ops/test_doc_maps.py tests/layers
  pt 0 ops_b $(left 565) tests/ops/test_boundary.py tests/ops/test_pruned_attention_kernel.py tests/ops/test_decode.py tests/ops/test_context_pruning.py ) &
( bench new1 $ROOT; bench old1 $ROOT/gpu_old/sb; bench new2 $ROOT; bench old2 $ROOT/gpu_old/sb ) &
( pt 2 mp1 400 -s "$M::test_gpu_non_persistent_checkpoint_resumes" "$M::test_gpu_train_loss_falls_and_resume_matches" "$M::test_gpu_decoupled_lr_equals_cpu_engine"
  pt 2 mp2 $(left 565) tests/gpu/test_context_pruning_gpu.py tests/gpu/test_generate.py ) &
( pt 3 gx 300 tests/gpu/test_hybrid.py tests/gpu/test_gluon_fwd.py tests/gpu/test_transformer_baseline.py
  pt 3 gx2 $(left 565) tests/gpu/test_extras.py "$M::test_gpu_step_diagnostics_leave_the_losses_and_count_zeros" "$M::test_gpu_moe_trains_and_resumes" ) &
wait
for f in ops_a ops_b mp1 mp2 gx gx2; do echo "### $f"; tail -4 $OUT/$f.txt; done
cat $OUT/bench.txt; for n in new1 old1 new2 old2; do echo "## $n"; grep -v "^ *$" $OUT/$n.log 2>/dev/null | grep -iv warn | tail -4; done
