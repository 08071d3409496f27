#!/bin/bash
ITERS=10 T=110 bash gpu_bisect.sh "base_mbs1 gpu_old/base" "new_mbs2 . --micro-batch-size 2" "base_mbs2 gpu_old/base --micro-batch-size 2" "new_mbs1 ."
