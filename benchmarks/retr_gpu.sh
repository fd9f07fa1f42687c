#!/usr/bin/env bash
# Issue 13 items 2/4 on the GPU (branch retr): the retrieval-option GPU tests, the retrieval
# batch-scaling benchmark (host CPU threads vs GPU-resident representations) and the end-to-end
# decode cost of CPU vs GPU retrieval (ESA). About 3-4 minutes on an H100. Results in $OUT.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/out}
mkdir -p "$OUT"
export PYTHONPATH="$PWD/python:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
rc=0
$PY -m pytest -q -p no:cacheprovider tests/sparse/test_retrieval_options.py -m gpu >"$OUT/retr_gpu_tests.log" 2>&1 || rc=1
tail -n 5 "$OUT/retr_gpu_tests.log"
$PY benchmarks/bench_retrieval.py --out "$OUT" --batches 1,4,16,64 --intra-op-threads 1,8 2>&1 | tee "$OUT/bench_retrieval.log" | tail -n 40 || rc=1
$PY benchmarks/bench_retrieval_e2e.py --out "$OUT" 2>&1 | tee "$OUT/bench_retrieval_e2e.log" | grep -v '^{' || rc=1
exit $rc
