#!/usr/bin/env bash
# GPU call 1 (shake-out): every gpu-marked test, then quick benchmarks. Logs to $OUT.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/python:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY=python3
if ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
export FLASHINFER_WORKSPACE_BASE=/tmp/fi
$PY -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'tf', transformers.__version__, torch.cuda.get_device_name())"
t0=$(date +%s)
timeout 300 $PY -m pytest -q -p no:cacheprovider -m "gpu and not perf" tests/kernels tests/trt/test_aot_gpu.py tests/runtime tests/sparse/test_retrieval_options.py tests/bench --junitxml="$OUT/gpu_tests.xml" > "$OUT/gpu_tests.log" 2>&1
echo "gpu tests rc=$? in $(( $(date +%s) - t0 )) s"; grep -E "passed|failed|error" "$OUT/gpu_tests.log" | tail -3
grep -E "^(FAILED|ERROR)" "$OUT/gpu_tests.log" | head -20
t0=$(date +%s)
timeout 240 $PY benchmarks/bench_capacity.py --shapes llama1b --contexts 32768 --max-minutes 3 --decode-steps 16 --tag call1 --out-dir "$OUT" > "$OUT/cap1.log" 2>&1
echo "capacity quick rc=$? in $(( $(date +%s) - t0 )) s"; tail -n 25 "$OUT/cap1.log"
