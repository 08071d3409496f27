#!/usr/bin/env bash
# Learned context pruning on one GPU: a 4-layer FoX-Pro (256 wide, 1024-token sequences)
# trained on the embedded corpus (8 MB of the Python standard library), then fine-tuned from
# its weights without and with --fox-context-pruning (lambda 0.3); each run stops after its
# --exit-duration-in-mins (saving; BASE_MINS, PLAIN_MINS, DCP_MINS) so the whole fits one 10-minute call. Then the pruned
# model's loss with hard keep decisions against every token kept and against the plain
# fine-tune on the same 32 validation samples (tools/eval_positions.py), and the keys left in
# the decoding cache (tools/generate.py). Logs in $W (default $OUT, else /tmp/dcp_gpu).
set -e
W=${W:-${OUT:-/tmp/dcp_gpu}}; mkdir -p $W; cd "$(dirname "$0")/../../.."
export MEGATRON_FOX_CACHE=${MEGATRON_FOX_CACHE:-/tmp/mf_cache} PYTHONUNBUFFERED=1
C=/tmp/dcp_ckpt; mkdir -p $C
stage() { echo "== $(date -u +%T) $*"; }
M="--num-layers 4 --hidden-size 256 --num-attention-heads 4 --ffn-hidden-size 768 --seq-length 1024
   --micro-batch-size 8 --global-batch-size 32 --bf16 --fox-qk-norm --fox-output-gate --fox-output-norm --fox-kv-shift
   --default-corpus-bytes 8000000 --default-vocab-size 2048 --split 98,2,0 --no-progress-bar"
stage base
[ -f $C/base/latest_checkpointed_iteration.txt ] || python -m megatron_fox.train $M --train-iters 400 --lr 2e-3 --min-lr 2e-4 --lr-warmup-iters 40 --log-interval 50 \
  --eval-interval 400 --eval-iters 8 --save $C/base --exit-duration-in-mins ${BASE_MINS:-1.25} > $W/base.log 2>&1
grep "step .*|\|exit" $W/base.log | tail -3 || true
python tools/convert_checkpoint.py from-megatron $M --vocab-size 2048 --input $C/base --output $C/base.pt > $W/convert.log 2>&1
FT="$M --pretrained-checkpoint $C/base.pt --train-iters 150 --lr 5e-4 --lr-decay-style constant --lr-warmup-iters 0
    --eval-interval 150 --eval-iters 8 --log-interval 25"
stage plain fine-tune
python -m megatron_fox.train $FT --save $C/plain --exit-duration-in-mins ${PLAIN_MINS:-0.75} > $W/ft_plain.log 2>&1
grep "step .*|\|exit" $W/ft_plain.log | tail -2 || true
D="--fox-context-pruning --fox-context-pruning-lambda 0.3"
stage pruning fine-tune
python -m megatron_fox.train $FT $D --save $C/dcp --exit-duration-in-mins ${DCP_MINS:-1.25} > $W/ft_dcp.log 2>&1
grep "step .*|\|exit" $W/ft_dcp.log | tail -3 || true
stage evaluation
EV="--eval-samples 32 --bins 8 --dataset valid"
python tools/eval_positions.py $M --load $C/plain $EV --json $W/eval_plain.json > $W/eval_plain.log 2>&1
python tools/eval_positions.py $M $D --load $C/dcp $EV --compare-context-pruning --json $W/eval_dcp.json > $W/eval_dcp.log 2>&1
grep -h "overall" $W/eval_plain.log $W/eval_dcp.log || true
stage generation
PROMPT=$(python -c "import inspect, textwrap; print(inspect.getsource(textwrap.TextWrapper)[:6000])")
python tools/generate.py $M $D --load $C/dcp --prompt "$PROMPT" --max-new-tokens 512 --max-length 4096 > $W/gen_dcp.log 2>&1
python tools/generate.py $M --load $C/plain --prompt "$PROMPT" --max-new-tokens 512 --max-length 4096 > $W/gen_plain.log 2>&1
grep -h "cached keys" $W/gen_dcp.log $W/gen_plain.log || true
stage done
