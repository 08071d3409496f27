#!/usr/bin/env bash
# Learned context pruning on CPU: the README's tiny FoX-Pro (200 steps on the embedded corpus),
# then 300 fine-tuning steps from its weights, without and with --fox-context-pruning
# (alpha's cosine rise 1 -> 8 spans the whole fine-tune, as in the paper); then each model's
# loss with hard keep decisions against every token kept (tools/eval_positions.py), and the
# keys that leave the decoding cache (tools/generate.py).
set -e
W=${W:-/tmp/dcp_run}; STEPS=${STEPS:-300}; mkdir -p $W; cd "$(dirname "$0")/../../.."
[ -f $W/base.pt ] || {
  python -m megatron_fox.train --config configs/tiny.yaml --no-progress-bar --save $W/base > $W/base.log 2>&1
  python tools/convert_checkpoint.py from-megatron --config configs/tiny.yaml --input $W/base --output $W/base.pt > $W/convert.log 2>&1; }
FT="--config configs/tiny.yaml --pretrained-checkpoint $W/base.pt --train-iters $STEPS --lr 5e-4 --lr-decay-style constant
    --lr-warmup-iters 0 --eval-interval $STEPS --eval-iters 16 --log-interval 50 --no-progress-bar"
PROMPT=$(python -c "import inspect, textwrap; print(inspect.getsource(textwrap.TextWrapper._wrap_chunks)[:900])")
[ -n "$SKIP_PLAIN" ] || python -m megatron_fox.train $FT --save $W/ft_plain > $W/ft_plain.log 2>&1
for lam in ${LAMBDAS:-0.3 1.0 3.0}; do
  D="--fox-context-pruning --fox-context-pruning-lambda $lam"
  python -m megatron_fox.train $FT $D --save $W/ft_dcp_$lam > $W/ft_dcp_$lam.log 2>&1
  python tools/eval_positions.py --config configs/tiny.yaml $D --load $W/ft_dcp_$lam --eval-samples 64 --bins 6 \
    --compare-context-pruning --json $W/eval_dcp_$lam.json > $W/eval_dcp_$lam.log 2>&1
  python tools/generate.py --config configs/tiny.yaml $D --load $W/ft_dcp_$lam --prompt "$PROMPT" \
    --max-new-tokens 256 --max-length 1024 > $W/gen_dcp_$lam.log 2>&1
done
grep -h "validation loss\|step  *$STEPS |" $W/ft_*.log; grep -h "overall" $W/eval_*.log; grep -h "dropped" $W/gen_*.log
