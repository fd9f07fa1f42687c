# session 9 A/B on one card: plans made ahead with and without the deferred after_step, and the serial order
source benchmarks/_gpu_env.sh
C="$PY benchmarks/bench_capacity.py --shapes llama8b --turnovers realistic --no-batch1 --out-dir $OUT"
$C --contexts 32768 --kv-budget-gib 34 --algorithms dense esa --runtime-option defer_after_step=true --tag _defer32 2>&1 | grep "tok/s"
$C --contexts 32768 --kv-budget-gib 34 --algorithms esa --tag _nodefer32 2>&1 | grep "tok/s"
