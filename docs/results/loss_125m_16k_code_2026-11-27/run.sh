set -u
t0=$(date +%s); R=$PWD
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl 2>&1 | tail -1
export PYTHONWARNINGS=ignore PYTHONUNBUFFERED=1 MEGATRON_FOX_CACHE=/tmp/mfc PYTHONPATH=/tmp/site:$PWD
nvidia-smi --query-gpu=name --format=csv,noheader; date -u
mkdir -p $OUT/loss /tmp/code
if [ ! -f /tmp/code/code_text_document.idx ]; then
# corpus: the Python source on this machine (site-packages and stdlib), one JSON document per file
python3 - <<'PY'
import json, os, random, sys, sysconfig
roots = sorted({sysconfig.get_paths()["stdlib"], sysconfig.get_paths()["purelib"], "/tmp/site"} | set(p for p in sys.path if p.endswith("site-packages")))
files = sorted({os.path.join(d, f) for r in roots if os.path.isdir(r) for d, _, fs in os.walk(r) for f in fs if f.endswith(".py")})
random.Random(0).shuffle(files)
total, n = 0, 0
with open("/tmp/code/code.jsonl", "w") as out:
    for f in files:
        try:
            t = open(f, encoding="utf-8").read()
        except (UnicodeDecodeError, OSError):
            continue
        if len(t) < 200:
            continue
        out.write(json.dumps({"text": t}) + "\n"); total += len(t); n += 1
        if total > 300e6:
            break
print(f"corpus: {n} files, {total/1e6:.0f} MB from {roots}")
PY
timeout 200 python3 tools/train_tokenizer.py --input /tmp/code/code.jsonl --vocab-size 32000 --model-prefix /tmp/code/tok --input-sentence-size 2000000 2>&1 | tail -2
timeout 200 python3 tools/preprocess_data.py --input /tmp/code/code.jsonl --output-prefix /tmp/code/code --tokenizer-model /tmp/code/tok.model --append-eod --workers 16 2>&1 | tail -2
fi
echo "== t=$(( $(date +%s)-t0 )) prepared"
C="--config configs/fox_pro_125m.yaml --data-path /tmp/code/code_text_document --tokenizer-model /tmp/code/tok.model --seq-length 16384 --micro-batch-size 4 --global-batch-size 8 --train-iters ${STEPS:-250} --lr-warmup-iters 25 --split 98,2,0 --eval-interval ${STEPS:-250} --eval-iters 8 --log-interval 25 --no-progress-bar --device cuda"
for m in ${MODELS:-fox transformer}; do
  case $m in fox) F="";; transformer) F="--no-fox-forget-gate --position-embedding-type rope --no-reset-attention-mask --no-fox-output-gate --no-fox-output-norm --no-fox-qk-norm --no-fox-kv-shift";;
    transformer-pro) F="--no-fox-forget-gate --position-embedding-type rope --no-reset-attention-mask";; esac
  left=$(( 585-($(date +%s)-t0) )); [ $left -lt 60 ] && break
  echo "== t=$(( $(date +%s)-t0 )) $m"
  timeout $left python3 -m megatron_fox.train $C $F > $OUT/loss/$m.log 2>&1
  grep -E "^step|valid|rror" $OUT/loss/$m.log | cut -c1-170 | tail -14
done
echo "== t=$(( $(date +%s)-t0 ))"
