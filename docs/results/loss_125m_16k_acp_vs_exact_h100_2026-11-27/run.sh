set -u
t0=$(date +%s)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl 2>&1 | tail -1
export PYTHONWARNINGS=ignore PYTHONUNBUFFERED=1 MEGATRON_FOX_CACHE=/tmp/mfc PYTHONPATH=/tmp/site:$PWD
nvidia-smi --query-gpu=name --format=csv,noheader; date -u
mkdir -p $OUT/loss /tmp/code
cp gpu_corpus.py $OUT/loss/corpus.py; cp gpu_c2.sh $OUT/loss/run.sh
python3 gpu_corpus.py /tmp/code/code.jsonl 3e8
timeout 200 python3 tools/train_tokenizer.py --input /tmp/code/code.jsonl --vocab-size 32000 --model-prefix /tmp/code/tok --input-sentence-size 2000000 2>&1 | tail -1
timeout 200 python3 tools/preprocess_data.py --input /tmp/code/code.jsonl --output-prefix /tmp/code/code --tokenizer-model /tmp/code/tok.model --append-eod --workers 32 2>&1 | tail -1
echo "== t=$(( $(date +%s)-t0 )) prepared"
S=${STEPS:-600}
D="--config configs/fox_pro_125m.yaml --data-path /tmp/code/code_text_document --tokenizer-model /tmp/code/tok.model --split 98,2,0 --no-progress-bar --device cuda"
C="$D --seq-length 16384 --micro-batch-size 4 --global-batch-size 8 --train-iters $S --lr-warmup-iters 60 --eval-interval 150 --eval-iters 8 --log-interval 25"
run() {  # gpu name flags...
  g=$1; n=$2; shift 2
  left=$(( 575-($(date +%s)-t0) ))
  CUDA_VISIBLE_DEVICES=$g timeout $(( left-70 )) python3 -m megatron_fox.train $C "$@" --save /tmp/ck/$n > $OUT/loss/$n.train.log 2>&1
  left=$(( 575-($(date +%s)-t0) ))
  CUDA_VISIBLE_DEVICES=$g timeout $left python3 tools/eval_positions.py $D "$@" --seq-length 16384 --micro-batch-size 1 --global-batch-size 1 --train-iters $S --load /tmp/ck/$n --eval-samples 16 --bins 14 --compare-acp --json $OUT/loss/$n.json > $OUT/loss/$n.eval.log 2>&1
}
run 0 acp_seed1234 --seed 1234 &
run 1 exact_seed1234 --seed 1234 --no-acp &
run 2 acp_seed5678 --seed 5678 &
run 3 exact_seed5678 --seed 5678 --no-acp &
wait
for n in acp_seed1234 exact_seed1234 acp_seed5678 exact_seed5678; do
  echo "== $n"; grep -E "^step|valid|rror" $OUT/loss/$n.train.log | cut -c1-200 | awk 'NR%3==0 || /valid|rror/' | tail -12
  grep -E "^\||overall|rror" $OUT/loss/$n.eval.log | tail -20
done
echo "== t=$(( $(date +%s)-t0 ))"
