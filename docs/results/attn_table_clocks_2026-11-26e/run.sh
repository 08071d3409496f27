python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >/dev/null 2>&1
export PYTHONPATH=/tmp/site:$PWD
nvidia-smi --query-gpu=name,clocks.sm,power.limit,driver_version --format=csv
echo "== check"; timeout 120 python tools/bench_attention.py --check > $OUT/check.log 2>&1; echo rc $?; tail -9 $OUT/check.log
echo "== gpu tests"; MEGATRON_FOX_TEST_GPU=1 timeout 330 python -m pytest -q -x tests/gpu > $OUT/gpu_tests.log 2>&1; echo rc $?; tail -5 $OUT/gpu_tests.log
echo "== clocks table"; timeout 200 python tools/bench_attention.py --clocks --lengths 4096 16384 32768 --impls sdpa_cudnn fox_exact fox_acp_b --json $OUT/table_clocks.json > $OUT/table_clocks.log 2>&1; echo rc $?; tail -14 $OUT/table_clocks.log
