#!/usr/bin/env bash
# Learned context pruning on CPU: the README's tiny FoX-Pro (200 steps on the embedded corpus),
# then 100 fine-tuning steps from its weights, with and without --fox-context-pruning.
set -e
W=${W:-/tmp/dcp_run}; mkdir -p $W; cd "$(dirname "$0")/../../.."
python -m megatron_fox.train --config configs/tiny.yaml --no-progress-bar --save $W/base > $W/base.log 2>&1
python tools/convert_checkpoint.py from-megatron --config configs/tiny.yaml --input $W/base --output $W/base.pt > $W/convert.log 2>&1
FT="--config configs/tiny.yaml --pretrained-checkpoint $W/base.pt --train-iters 100 --lr 5e-4 --lr-decay-style constant
    --lr-warmup-iters 0 --eval-interval 100 --eval-iters 8 --log-interval 20 --no-progress-bar"
python -m megatron_fox.train $FT > $W/ft_plain.log 2>&1
for lam in 0.3 1.0 3.0; do
  python -m megatron_fox.train $FT --fox-context-pruning --fox-context-pruning-lambda $lam \
    --fox-context-pruning-alpha-iters 60 > $W/ft_dcp_$lam.log 2>&1
done
grep -h "validation loss\|step    100 |" $W/ft_*.log
