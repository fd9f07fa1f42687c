# Session 10's last GPU call (run on 8a94588; results/runtime/capacity_*_s10_stagger*.json): the 8B capacity rows
# with staggered retrieval phases (RetrievalConfig.stagger, on by default in that commit, off since: this script now
# runs unstaggered unless --stagger is added) and the step's host time split to the end
# (StepRecord launch / enqueue / emit), host-representation ESA vs GPU-resident ESA representations, dense
# in the same call. Before it (H100, defer_after_step on, no staggering) ESA's 128K batch-6 retrievals (6 tasks of
# ~30 ms every 4th step) waited 4.6 ms per step with 100 ms spikes, and its plan on those steps outran the GPU.
source benchmarks/_gpu_env.sh
C="timeout 165 $PY benchmarks/bench_capacity.py --shapes llama8b --turnovers realistic --no-batch1 --out-dir $OUT"
$C --contexts 131072 --algorithms dense esa esa-gpu-reps --max-minutes 2.4 --tag _s10_stagger128 2>&1 | grep "tok/s\|rror"
$C --contexts 32768 --kv-budget-gib 34 --algorithms dense esa --max-minutes 1.8 --tag _s10_stagger32 2>&1 | grep "tok/s\|rror"
