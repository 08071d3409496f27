set -u
t0=$(date +%s); R=$PWD
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl 2>&1 | tail -1
export PYTHONWARNINGS=ignore PYTHONUNBUFFERED=1 MEGATRON_FOX_CACHE=/tmp/mfc PYTHONPATH=/tmp/site:$PWD
nvidia-smi --query-gpu=name --format=csv,noheader; date -u
mkdir -p $OUT/pos /tmp/code
python3 gpu_corpus.py /tmp/code/code.jsonl 3e8
timeout 200 python3 tools/train_tokenizer.py --input /tmp/code/code.jsonl --vocab-size 32000 --model-prefix /tmp/code/tok --input-sentence-size 2000000 2>&1 | tail -1
timeout 200 python3 tools/preprocess_data.py --input /tmp/code/code.jsonl --output-prefix /tmp/code/code --tokenizer-model /tmp/code/tok.model --append-eod --workers 16 2>&1 | tail -1
echo "== t=$(( $(date +%s)-t0 )) prepared"
S=${STEPS:-300}
D="--config configs/fox_pro_125m.yaml --data-path /tmp/code/code_text_document --tokenizer-model /tmp/code/tok.model --split 98,2,0 --no-progress-bar --device cuda"
C="$D --seq-length 4096 --micro-batch-size 16 --global-batch-size 32 --train-iters $S --lr-warmup-iters 30 --eval-interval $S --eval-iters 4 --log-interval 50"
for m in fox transformer-pro; do
  case $m in fox) F="";; transformer-pro) F="--no-fox-forget-gate --position-embedding-type rope --no-reset-attention-mask";; esac
  left=$(( 585-($(date +%s)-t0) )); [ $left -lt 100 ] && break
  echo "== t=$(( $(date +%s)-t0 )) $m train"
  timeout $left python3 -m megatron_fox.train $C $F --save /tmp/ck/$m > $OUT/pos/$m.train.log 2>&1
  grep -E "^step|valid|rror" $OUT/pos/$m.train.log | cut -c1-170 | tail -8
  left=$(( 585-($(date +%s)-t0) )); [ $left -lt 30 ] && break
  echo "== t=$(( $(date +%s)-t0 )) $m eval at 16k"
  timeout $left python3 tools/eval_positions.py $D $F --seq-length 16384 --micro-batch-size 1 --global-batch-size 1 --train-iters $S --load /tmp/ck/$m --eval-samples 24 --bins 14 --json $OUT/pos/$m.json > $OUT/pos/$m.eval.log 2>&1
  grep -E "^\||overall|rror" $OUT/pos/$m.eval.log
done
echo "== t=$(( $(date +%s)-t0 ))"
