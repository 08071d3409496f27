python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >/dev/null 2>&1
export PYTHONPATH=/tmp/site:$PWD
nvidia-smi --query-gpu=name --format=csv,noheader
echo "== gpu test"; MEGATRON_FOX_TEST_GPU=1 timeout 100 python -m pytest -q -x tests/gpu/test_gluon_kernels.py 2>&1 | tail -3
for r in 1 2; do for m in fwd 1; do
  echo "== round $r gluon=$m"
  MEGATRON_FOX_GLUON=$m timeout 100 python tools/bench_attention.py --lengths 4096 16384 32768 --impls fox_exact fox_acp_b --json $OUT/ab_${m}_$r.json 2>&1 | grep "^{" | python3 -c "import sys,json; [print(r['impl'], r['L'], 'fwd', r['fwd_ms'], 'fwdbwd', r['fwdbwd_ms'], r['skipped']) for r in map(json.loads, sys.stdin)]"
done; done
