# Run in session 10 (H100, 2026-12-07, on 8b6e19c; results/runtime/capacity_*_s10_ab_*.json; since then
# defer_after_step is on by default, so "defaults" below now means deferred). The 8B capacity rows with session 9's
# defaults (plans made ahead, after_step not deferred, QueryDrift draws on the retrieval worker threads) against
# defer_after_step=true, at 32K
# (34 GiB budget, batch 27) and 128K (batch 6), with dense in the same call. Session 9's 12:50-12:57 H100 calls had
# the deferral on and the draws on the main thread: 32K ESA 576.1 tok/s (dense 363.3), 128K ESA 243.4 (dense 98.7).
#   device: bash benchmarks/_ab_session9.sh   (about 5 minutes)
source benchmarks/_gpu_env.sh
C="$PY benchmarks/bench_capacity.py --shapes llama8b --turnovers realistic --no-batch1 --out-dir $OUT"
$C --contexts 32768 --kv-budget-gib 34 --algorithms dense esa gsa --tag _defaults32 2>&1 | grep "tok/s"
$C --contexts 32768 --kv-budget-gib 34 --algorithms esa --runtime-option defer_after_step=true --tag _defer32 2>&1 | grep "tok/s"
$C --contexts 131072 --algorithms dense esa gsa --tag _defaults128 2>&1 | grep "tok/s"
$C --contexts 131072 --algorithms esa --runtime-option defer_after_step=true --tag _defer128 2>&1 | grep "tok/s"
