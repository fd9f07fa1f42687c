#!/usr/bin/env bash
# One <= 10-minute device call for issues 13/14/17, made to be followed on the same warm machine by the
# SmolLM2 quality call (benchmarks/quality_gpu.sh, issue 15):
#   1. stores SmolLM2's first GGUF part for the next call (carry .carry/a: `mkdir -p ~/smol; cp .carry/a/* ~/smol/`);
#   2. the kernel benchmark's peer rows again (FlashInfer from .whl/, the AOT tile rule and its sweep, the index
#      guard) at 128K, block 64, budget 1/8, batch 1 and 8 (bench_kernels.py; <= KERNELS_S seconds);
#   3. the capacity wall (SUITE=capacity of gpu_suite.sh: its gpu tests, then bench_capacity.py for both shapes).
#   run with carry [".whl", ".carry/a"]:  bash benchmarks/gpu_offload_call.sh
set -uo pipefail
source "$(dirname "$0")/_gpu_env.sh"
if [[ -f .carry/a/p1 ]]; then mkdir -p ~/smol && cp .carry/a/* ~/smol/ && echo "SmolLM2 part 1 stored in ~/smol"; fi
t0=$(date +%s)
timeout "${KERNELS_S:-100}" $PY benchmarks/bench_kernels.py --out "$OUT" --contexts 131072 --batches 1 8 \
  --block-sizes 64 --budgets 0.125 --odd-head-dims --skip-retrieval --reps 30 > "$OUT/bench_kernels.log" 2>&1
echo "bench_kernels rc=$? in $(( $(date +%s) - t0 )) s"
sed -n '/^card:/,$p' "$OUT/bench_kernels.log" | head -40
grep -E "^(RuntimeError|ninja|FAILED|.*error:)" "$OUT/bench_kernels.log" | tail -n 12
t0=$(date +%s)
timeout "${TESTS_S:-50}" $PY -m pytest -q -p no:cacheprovider -m gpu tests/runtime/test_host_memory.py tests/bench/test_bench_capacity.py \
  > "$OUT/gpu_capacity_tests.log" 2>&1
echo "capacity/host-memory gpu tests rc=$? in $(( $(date +%s) - t0 )) s: $(tail -n 1 "$OUT/gpu_capacity_tests.log")"
grep -E "^(FAILED|ERROR)" "$OUT/gpu_capacity_tests.log" | head -5
# the capacity wall (prints its table last)
t0=$(date +%s)
# shellcheck disable=SC2086
timeout "${CAPACITY_S:-240}" $PY benchmarks/bench_capacity.py ${CAPACITY_ARGS:---algorithms dense gsa-on-device esa gsa kvstar --decode-steps 16 --max-minutes 3.0} \
  --out-dir "$OUT" > "$OUT/bench_capacity.log" 2>&1
echo "capacity rc=$? in $(( $(date +%s) - t0 )) s"; tail -n 40 "$OUT/bench_capacity.log"
