#!/usr/bin/env bash
# The session's one final GPU call (issue 13 first): GPU tests of the kernels and the runtime, the fused
# retrieval benchmark, then the capacity-wall benchmark. Everything under $OUT; tables printed last.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/python:$PWD" PYTHONUNBUFFERED=1
PY=python3
$PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
t0=$(date +%s)
timeout 75 $PY -m pytest -q -p no:cacheprovider -m "gpu and not perf" tests/kernels tests/trt/test_aot_gpu.py --junitxml="$OUT/gpu_kernel_tests.xml" > "$OUT/gpu_kernel_tests.log" 2>&1
echo "kernel gpu tests rc=$? in $(( $(date +%s) - t0 )) s: $(tail -n 1 "$OUT/gpu_kernel_tests.log")"; grep -E "^(FAILED|ERROR)" "$OUT/gpu_kernel_tests.log" | head -8
t0=$(date +%s)
timeout 70 $PY -m pytest -q -p no:cacheprovider -m "gpu and not perf" tests/runtime tests/sparse tests/bench --junitxml="$OUT/gpu_runtime_tests.xml" > "$OUT/gpu_runtime_tests.log" 2>&1
echo "runtime gpu tests rc=$? in $(( $(date +%s) - t0 )) s: $(tail -n 1 "$OUT/gpu_runtime_tests.log")"; grep -E "^(FAILED|ERROR)" "$OUT/gpu_runtime_tests.log" | head -8
t0=$(date +%s)
true
echo "retrieval kernels rc=$? in $(( $(date +%s) - t0 )) s"; grep -E "fused|guard" "$OUT/bench_retrieval_kernels.log" | head -14
t0=$(date +%s)
timeout 150 $PY benchmarks/bench_capacity.py --shapes llama1b --max-minutes 1.9 --decode-steps 16 --out-dir "$OUT" > "$OUT/bench_capacity.log" 2>&1
echo "capacity rc=$? in $(( $(date +%s) - t0 )) s"; tail -n 30 "$OUT/bench_capacity.log"
