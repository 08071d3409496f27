python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >/dev/null 2>&1
export PYTHONPATH=/tmp/site:$PWD
nvidia-smi --query-gpu=name --format=csv,noheader
echo "== gpu test"; MEGATRON_FOX_TEST_GPU=1 timeout 120 python -m pytest -q tests/gpu/test_gluon_fwd.py 2>&1 | tail -3
echo "== check"; timeout 100 python tools/bench_attention.py --check > $OUT/check.log 2>&1; tail -8 $OUT/check.log
for r in 1 2; do for m in 0 1; do
  echo "== round $r gluon=$m d128"
  MEGATRON_FOX_GLUON_FWD=$m timeout 120 python tools/bench_attention.py --lengths 4096 16384 32768 --impls fox_exact fox_acp_b --json $OUT/ab_d128_${m}_$r.json 2>&1 | grep "^{" | python3 -c "import sys,json; [print(r['impl'], r['L'], 'fwd', r['fwd_ms'], 'fwdbwd', r['fwdbwd_ms'], r['skipped']) for r in map(json.loads, sys.stdin)]"
done; done
for m in 0 1; do
  echo "== gluon=$m d64"
  MEGATRON_FOX_GLUON_FWD=$m timeout 60 python tools/bench_attention.py --lengths 16384 --head-dim 64 --impls fox_exact fox_acp_b --json $OUT/ab_d64_${m}.json 2>&1 | grep "^{" | python3 -c "import sys,json; [print(r['impl'], r['L'], 'fwd', r['fwd_ms'], 'fwdbwd', r['fwdbwd_ms'], r['skipped']) for r in map(json.loads, sys.stdin)]"
done
