# Session 10: with plans made ahead and the after_step deferred, ESA's 128K batch-6 step is host-bound (GPU kernels
# 13 ms of compute + 7 ms of hidden copies per step; the step 22-28 ms) and its host retrievals (mean-K scoring of
# 268 MB of fp32 representations per row at 128K, ~30 ms a task) leave waits of 4.6 ms per step and 100 ms spikes.
# The GPU-resident representations (esa-gpu-reps / gsa-gpu-reps) score on a side stream instead: their capacity rows,
# with dense and host-representation ESA in the same call.
#   device: bash benchmarks/_gpu_reps_s10.sh   (about 6 minutes)
source benchmarks/_gpu_env.sh
C="$PY benchmarks/bench_capacity.py --shapes llama8b --turnovers realistic --no-batch1 --out-dir $OUT"
$C --contexts 131072 --algorithms dense esa-gpu-reps gsa-gpu-reps esa --max-minutes 4 --tag _reps128 2>&1 | grep "tok/s\|rror"
$C --contexts 32768 --kv-budget-gib 34 --algorithms dense esa-gpu-reps gsa-gpu-reps --max-minutes 3 --tag _reps32 2>&1 | grep "tok/s\|rror"
