# session 9, last device minutes: 32K at the 34 GiB budget, dense and ESA with today's defaults (plans made ahead,
# after_step not deferred, QueryDrift draws on the worker threads); compare with the 12:57 call (deferred, draws on
# the main thread): ESA 576.1 tok/s, dense 363.3
source benchmarks/_gpu_env.sh
$PY benchmarks/bench_capacity.py --shapes llama8b --turnovers realistic --no-batch1 --out-dir $OUT \
    --contexts 32768 --kv-budget-gib 34 --algorithms dense esa --tag _s9_defaults32 2>&1 | grep "tok/s"
