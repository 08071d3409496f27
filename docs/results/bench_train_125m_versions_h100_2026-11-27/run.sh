set -u
t0=$(date +%s); R=$PWD
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl 2>&1 | tail -1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/ds/*.whl 2>&1 | tail -1
export PYTHONWARNINGS=ignore PYTHONUNBUFFERED=1 MEGATRON_FOX_TEST_GPU=1 MEGATRON_FOX_CACHE=/tmp/mfc PATH=/tmp/site/bin:$PATH
nvidia-smi --query-gpu=name --format=csv,noheader; date -u
mkdir -p $OUT/reg
for v in new pre; do
  if [ $v = new ]; then D=$R; else D=$R/gpu_old/$v; fi
  echo "== t=$(( $(date +%s)-t0 )) $v"
  (cd $D && PYTHONPATH=/tmp/site:$D timeout 200 python3 tools/bench_train.py --config configs/fox_pro_125m.yaml --lengths 16384 4096 --micro-batch-tokens 65536 --train-iters 20 --acp-modes lse off 2>&1 | grep -E "^\| [0-9]|rror" | cut -c1-200) | tee $OUT/reg/$v.log
done
echo "== t=$(( $(date +%s)-t0 )) zero3 export"
left=$(( 590-($(date +%s)-t0) ))
PYTHONPATH=/tmp/site:$R timeout $left python3 -m pytest -q -s -p no:cacheprovider tests/gpu/test_deepspeed_gpu.py -k zero3_checkpoint 2>&1 | grep -vE "^\s*$" | tail -15
echo "== t=$(( $(date +%s)-t0 ))"
