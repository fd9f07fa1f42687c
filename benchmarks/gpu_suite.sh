#!/usr/bin/env bash
# One call runs the whole GPU tier of the kernels: the kernel tests on the GPU (CPU-tier cases
# at small shapes plus the `gpu`-marked real-shape cases) and the benchmarks. Results go to
# $OUT (JSON + logs); a short table is printed last. Usage: benchmarks/gpu_suite.sh [bench args]
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/out}
mkdir -p "$OUT"
export PYTHONPATH="$PWD/python:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
$PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu,power.draw --format=csv 2>/dev/null || true

t0=$(date +%s)
# KERNEL_TESTS narrows the test selection for a follow-up call (default: every kernel test)
$PY -m pytest -q -p no:cacheprovider ${KERNEL_TESTS:-tests/kernels} -x --junitxml="$OUT/gpu_tests.xml" >"$OUT/gpu_tests.log" 2>&1
test_rc=$?
echo "kernel tests on GPU: rc=$test_rc in $(( $(date +%s) - t0 )) s"
tail -n 25 "$OUT/gpu_tests.log"

$PY benchmarks/bench_kernels.py --out "$OUT" "$@" 2>&1 | tee "$OUT/bench.log" | grep -v "^attention\|^retrieval" 
bench_rc=${PIPESTATUS[0]}
echo "gpu_suite: tests rc=$test_rc bench rc=$bench_rc"
exit $(( test_rc != 0 || bench_rc != 0 ))
