#!/usr/bin/env bash
# A/B: key prefix sums by TMA in the forward and dQ kernels (new) vs HEAD (gpu_old); then --check on new.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONWARNINGS=ignore
nvidia-smi --query-gpu=name --format=csv,noheader
for rnd in 1 2; do
for side in old new; do
  if [ $side = old ]; then P=/tmp/site:$PWD/gpu_old; else P=/tmp/site:$PWD; fi
  PYTHONPATH=$P:$PWD timeout 120 python3 tools/bench_attention.py --impls fox_exact fox_acp_b --lengths 4096 16384 32768 \
    --json $OUT/ab_${side}_$rnd.json > $OUT/ab_${side}_$rnd.log 2>&1
  echo "$side $rnd rc $?"; grep -E "^\| fox" $OUT/ab_${side}_$rnd.log | sed "s/^/$side$rnd /"
  PYTHONPATH=$P:$PWD timeout 60 python3 tools/bench_attention.py --impls fox_exact fox_acp_b --lengths 16384 --head-dim 64 \
    --json $OUT/ab64_${side}_$rnd.json > $OUT/ab64_${side}_$rnd.log 2>&1
  grep -E "^\| fox" $OUT/ab64_${side}_$rnd.log | sed "s/^/$side$rnd d64 /"
done; done
PYTHONPATH=/tmp/site:$PWD timeout 150 python3 tools/bench_attention.py --check > $OUT/check.log 2>&1; echo "check rc $?"; grep worst $OUT/check.log
PYTHONPATH=/tmp/site:$PWD timeout 120 python3 - <<'PY'
import torch, math
from megatron_fox.ops import forgetting_attention, forgetting_attention_reference
torch.manual_seed(0)
for T, log_eps in ((1001, None), (1003, -10.0), (130, -10.0)):
    q, k, v = (torch.randn(2, T, 4, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    g = torch.nn.functional.logsigmoid(torch.randn(2, T, 4, device="cuda") + 2).requires_grad_()
    o = forgetting_attention(q, k, v, g, log_eps=log_eps)
    r = forgetting_attention_reference(q, k, v, g, log_eps=log_eps, dtype=torch.float64)
    do = torch.randn_like(o)
    errs = [((o.double() - r).norm() / r.norm()).item()]
    for a, b in zip(torch.autograd.grad(o, (q, k, v, g), do), torch.autograd.grad(r, (q, k, v, g), do)):
        errs.append(((a.double() - b.double()).norm() / b.double().norm()).item())
    print(f"T={T} log_eps={log_eps} bf16 rel err o/dq/dk/dv/dlogf", " ".join(f"{e:.2e}" for e in errs), flush=True)
PY
