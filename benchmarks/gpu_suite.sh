#!/usr/bin/env bash
# The project's one GPU script: the GPU tier of the tests and the benchmarks in one call.
# Results go to $OUT (JSON + logs); a short table is printed last.
#
#   benchmarks/gpu_suite.sh [bench_kernels args]          kernels: kernel tests on the GPU + kernel benchmarks
#   SUITE=runtime benchmarks/gpu_suite.sh                 runtime: runtime gpu tests + end-to-end decode benchmark
#   SUITE=capacity benchmarks/gpu_suite.sh                capacity: throughput at the capacity wall (bench_capacity.py)
#   SUITE=retrieval benchmarks/gpu_suite.sh               retrieval: retrieval-option gpu tests, CPU threads vs GPU-resident
#                                                         representations by batch, end-to-end ESA decode cost of each
#   SUITE=pending benchmarks/gpu_suite.sh                 pending: what is left to measure (after session 13: the
#                                                         128K AOT / JIT / guard kernel rows, the AOT and runtime GPU
#                                                         tests, 128K dense / ESA GPU reps staggered); about 9 minutes
#   SUITE=brief benchmarks/gpu_suite.sh                   brief: batched-DMA and plan-ahead GPU tests, 128K dense / ESA /
#                                                         ESA GPU reps; about 4 minutes (a short device budget)
#   SUITE="kernels runtime" benchmarks/gpu_suite.sh       several (the default is "kernels")
#
# KERNEL_TESTS narrows the kernel test selection; RUNTIME_BENCH_ARGS overrides bench_runtime.py's arguments;
# CAPACITY_ARGS overrides bench_capacity.py's (default: both shapes, 32K and 128K, every algorithm, both
# turnovers, no new algorithm started after 6.5 minutes); CAPACITY_TESTS=0 skips its gpu tests.
set -uo pipefail
# FlashInfer (the kernel benchmark's peer) travels as wheels in .whl/ (benchmarks/flashinfer_wheels.sh), installed
# by _gpu_env.sh; without them the benchmark records speedup_vs_flashinfer: null and the import error
source "$(dirname "$0")/_gpu_env.sh"
SUITE=${SUITE:-kernels}
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu,power.draw --format=csv 2>/dev/null || true
rc=0

if [[ " $SUITE " == *" kernels "* ]]; then
  t0=$(date +%s)
  $PY -m pytest -q -p no:cacheprovider ${KERNEL_TESTS:-tests/kernels tests/trt/test_aot_gpu.py} -x --junitxml="$OUT/gpu_tests.xml" >"$OUT/gpu_tests.log" 2>&1
  test_rc=$?
  echo "kernel tests on GPU: rc=$test_rc in $(( $(date +%s) - t0 )) s"
  tail -n 25 "$OUT/gpu_tests.log"
  $PY benchmarks/bench_kernels.py --out "$OUT" "$@" 2>&1 | tee "$OUT/bench.log" | grep -v "^attention\|^retrieval"
  bench_rc=${PIPESTATUS[0]}
  echo "kernels: tests rc=$test_rc bench rc=$bench_rc"
  (( test_rc == 0 && bench_rc == 0 )) || rc=1
fi

if [[ " $SUITE " == *" runtime "* ]]; then
  t0=$(date +%s)
  $PY -m pytest -q -p no:cacheprovider tests/runtime -m "gpu and not perf" --junitxml="$OUT/gpu_runtime_tests.xml" >"$OUT/gpu_runtime_tests.log" 2>&1
  test_rc=$?
  echo "runtime tests on GPU: rc=$test_rc in $(( $(date +%s) - t0 )) s"
  tail -n 15 "$OUT/gpu_runtime_tests.log"
  card=$($PY -c "import torch; print(torch.cuda.get_device_name().replace(' ', '-'))")
  stem="$OUT/runtime_${card}_$(date +%F)"
  bench_rc=0
  # 1. every algorithm with CUDA-graph decode steps, batch 1, 32K and 128K
  # shellcheck disable=SC2086
  $PY benchmarks/bench_runtime.py ${RUNTIME_BENCH_ARGS:---contexts 32768 131072 --algorithms dense esa gsa kvstar gsa-on-device rerope --cuda-graph on --decode-steps 32} \
      --out "${stem}.json" 2>&1 | tee "$OUT/bench_runtime.log" | grep -v '^{' ; (( PIPESTATUS[0] == 0 )) || bench_rc=1
  if [[ -z "${RUNTIME_BENCH_ARGS:-}" ]]; then
    # 2. the same steps without graphs (what the runtime did before), 3. batch 4 at 128K, 4. measured concurrency
    $PY benchmarks/bench_runtime.py --contexts 32768 131072 --algorithms dense esa gsa-on-device --cuda-graph off \
        --decode-steps 32 --out "${stem}_eager.json" 2>&1 | tee -a "$OUT/bench_runtime.log" | grep -v '^{' ; (( PIPESTATUS[0] == 0 )) || bench_rc=1
    $PY benchmarks/bench_runtime.py --contexts 131072 --batch 4 --algorithms dense esa gsa-on-device --cuda-graph on \
        --decode-steps 32 --out "${stem}_batch4.json" 2>&1 | tee -a "$OUT/bench_runtime.log" | grep -v '^{' ; (( PIPESTATUS[0] == 0 )) || bench_rc=1
    # (the measured concurrency in a fixed budget, bench_runtime.py --capacity, is superseded by SUITE=capacity)
  fi
  $PY benchmarks/runtime_table.py "$OUT"/runtime_*.json
  echo "runtime: tests rc=$test_rc bench rc=$bench_rc"
  (( test_rc == 0 && bench_rc == 0 )) || rc=1
fi
if [[ " $SUITE " == *" capacity "* ]]; then
  # the capacity wall: one device KV budget per shape, dense vs offload at their largest batches
  # (benchmarks/bench_capacity.py; writes capacity_<card>_<date>.json, prints its table last)
  t0=$(date +%s)
  test_rc=0
  if [[ "${CAPACITY_TESTS:-1}" == 1 ]]; then  # its gpu tests first (tiny shape): the CUDA path checked before the long run
    $PY -m pytest -q -p no:cacheprovider tests/bench/test_bench_capacity.py -m gpu \
        --junitxml="$OUT/gpu_capacity_tests.xml" >"$OUT/gpu_capacity_tests.log" 2>&1
    test_rc=$?
    echo "capacity gpu tests: rc=$test_rc in $(( $(date +%s) - t0 )) s"
    tail -n 5 "$OUT/gpu_capacity_tests.log"
  fi
  # shellcheck disable=SC2086
  $PY benchmarks/bench_capacity.py ${CAPACITY_ARGS:---max-minutes 6.5} --out-dir "$OUT" 2>&1 | tee "$OUT/bench_capacity.log"
  cap_rc=${PIPESTATUS[0]}
  echo "capacity: tests rc=$test_rc bench rc=$cap_rc in $(( $(date +%s) - t0 )) s"
  (( test_rc == 0 && cap_rc == 0 )) || rc=1
fi
if [[ " $SUITE " == *" retrieval "* ]]; then
  # issue 13 item 4: host retrieval (threads) vs GPU-resident representations, and what each costs a decode step
  t0=$(date +%s)
  $PY -m pytest -q -p no:cacheprovider tests/sparse/test_retrieval_options.py -m gpu >"$OUT/retr_gpu_tests.log" 2>&1
  test_rc=$?
  echo "retrieval gpu tests: rc=$test_rc in $(( $(date +%s) - t0 )) s"; tail -n 5 "$OUT/retr_gpu_tests.log"
  $PY benchmarks/bench_retrieval.py --out "$OUT" --batches 1,4,16,64 --intra-op-threads 1,8 2>&1 | tee "$OUT/bench_retrieval.log" | tail -n 40
  b1_rc=${PIPESTATUS[0]}
  $PY benchmarks/bench_retrieval_e2e.py --out "$OUT" 2>&1 | tee "$OUT/bench_retrieval_e2e.log" | grep -v '^{'
  b2_rc=${PIPESTATUS[0]}
  echo "retrieval: tests rc=$test_rc bench rc=$b1_rc/$b2_rc"
  (( test_rc == 0 && b1_rc == 0 && b2_rc == 0 )) || rc=1
fi
if [[ " $SUITE " == *" pending "* ]]; then
  # after session 13's kernel change (the TensorRT paths' kernel walks the pool and the chunk in separate passes, so
  # the AOT path runs the runtime's own 64-key x 2-stage tile): the 128K block-64 AOT / JIT / guard rows, the AOT GPU
  # tests, the runtime GPU tests, then 128K dense and ESA with GPU-resident representations, staggered, if time is
  # left (PENDING_CONTEXTS adds contexts, e.g. "131072 32768"). Each step under its own timeout; about 9 minutes.
  t0=$(date +%s)
  test_rc=0 cap_rc=0
  timeout "${PENDING_BENCH_S:-130}" $PY benchmarks/bench_kernels.py --out "$OUT" --contexts 131072 --block-sizes 64 \
      --batches 1 8 --skip-retrieval --max-minutes 1.2 > "$OUT/bench_kernels.log" 2>&1 || cap_rc=1
  echo "bench_kernels: in $(( $(date +%s) - t0 )) s"; sed -n '/^card:/,$p' "$OUT/bench_kernels.log" | head -40
  timeout "${PENDING_AOT_S:-150}" $PY -m pytest -q -p no:cacheprovider tests/trt/test_aot_gpu.py -m "gpu and not perf" \
      --junitxml="$OUT/pending_aot_tests.xml" >"$OUT/pending_aot_tests.log" 2>&1 || test_rc=1
  echo "aot gpu tests: in $(( $(date +%s) - t0 )) s"; tail -n 3 "$OUT/pending_aot_tests.log"
  if [[ "${CAPACITY_TESTS:-1}" == 1 ]]; then
    timeout "${PENDING_TESTS_S:-180}" $PY -m pytest -q -p no:cacheprovider tests/runtime/test_gpu.py -m "gpu" \
        -k "not batch_dma" --junitxml="$OUT/pending_tests.xml" >"$OUT/pending_tests.log" 2>&1 || test_rc=1
    echo "runtime gpu tests: in $(( $(date +%s) - t0 )) s"; tail -n 3 "$OUT/pending_tests.log"
  fi
  C="$PY benchmarks/bench_capacity.py --shapes llama8b --turnovers realistic --no-batch1 --out-dir $OUT"
  for ctx in ${PENDING_CONTEXTS:-131072}; do
    B=""; [[ $ctx == 32768 ]] && B="--kv-budget-gib 34"
    $C --contexts $ctx $B --algorithms dense esa-gpu-reps --stagger --tag _pending_${ctx}_stagger 2>&1 | grep "tok/s\|rror"
    (( PIPESTATUS[0] == 0 )) || cap_rc=1
  done
  echo "pending: tests rc=$test_rc bench/capacity rc=$cap_rc in $(( $(date +%s) - t0 )) s"
  grep -E "^(FAILED|ERROR)" "$OUT"/pending_*tests.log | head -10
  (( test_rc == 0 && cap_rc == 0 )) || rc=1
fi
if [[ " $SUITE " == *" brief "* ]]; then
  # for a short device budget (about 4 minutes): the batched-DMA GPU tests and the plan-ahead ones (the DMA issue path
  # and the planner changed in session 11), then 128K dense / ESA / ESA with GPU-resident representations
  t0=$(date +%s)
  $PY -m pytest -q -p no:cacheprovider tests/runtime/test_gpu.py -m "gpu" -k "batch_dma or plans_made_ahead" \
      --junitxml="$OUT/brief_tests.xml" >"$OUT/brief_tests.log" 2>&1
  test_rc=$?
  echo "brief gpu tests: rc=$test_rc in $(( $(date +%s) - t0 )) s"; tail -n 2 "$OUT/brief_tests.log"
  $PY benchmarks/bench_capacity.py --shapes llama8b --turnovers realistic --no-batch1 --out-dir "$OUT" \
      --contexts 131072 --algorithms dense esa-gpu-reps esa --tag _brief_131072 2>&1 | grep "tok/s\|rror"
  cap_rc=${PIPESTATUS[0]}
  echo "brief: tests rc=$test_rc capacity rc=$cap_rc in $(( $(date +%s) - t0 )) s"
  (( test_rc == 0 && cap_rc == 0 )) || rc=1
fi
exit $rc
