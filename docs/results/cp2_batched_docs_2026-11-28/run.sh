#!/bin/bash
# The four runs of "The ring takes a micro-batch of several packed rows" (docs/benchmarks.md):
# gpu_old/base = the code before (b56d19b), . = after; run_train.sh is the helper of
# ../cp2_kv_shift_2026-11-28/ (64k, CP=2, global batch 2; extra flags per run).
ITERS=10 T=110 bash ../cp2_kv_shift_2026-11-28/run_train.sh "base_mbs1 gpu_old/base" "new_mbs2 . --micro-batch-size 2" \
    "base_mbs2 gpu_old/base --micro-batch-size 2" "new_mbs1 ."
