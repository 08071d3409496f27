#!/usr/bin/env bash
# Learned context pruning on CPU: the README's tiny FoX-Pro (200 steps on the embedded corpus),
# then 300 fine-tuning steps from its weights, without and with --fox-context-pruning
# (alpha's cosine rise 1 -> 8 spans the whole fine-tune, as in the paper).
set -e
W=${W:-/tmp/dcp_run}; STEPS=${STEPS:-300}; mkdir -p $W; cd "$(dirname "$0")/../../.."
[ -f $W/base.pt ] || {
  python -m megatron_fox.train --config configs/tiny.yaml --no-progress-bar --save $W/base > $W/base.log 2>&1
  python tools/convert_checkpoint.py from-megatron --config configs/tiny.yaml --input $W/base --output $W/base.pt > $W/convert.log 2>&1; }
FT="--config configs/tiny.yaml --pretrained-checkpoint $W/base.pt --train-iters $STEPS --lr 5e-4 --lr-decay-style constant
    --lr-warmup-iters 0 --eval-interval $STEPS --eval-iters 16 --log-interval 50 --no-progress-bar"
python -m megatron_fox.train $FT > $W/ft_plain.log 2>&1
for lam in ${LAMBDAS:-0.3 1.0 3.0}; do
  python -m megatron_fox.train $FT --fox-context-pruning --fox-context-pruning-lambda $lam > $W/ft_dcp_$lam.log 2>&1
done
grep -h "validation loss\|step  *$STEPS |" $W/ft_*.log
