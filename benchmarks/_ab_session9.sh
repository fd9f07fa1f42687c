source benchmarks/_gpu_env.sh
C="$PY benchmarks/bench_capacity.py --shapes llama8b --turnovers realistic --no-batch1"
$C --contexts 32768 --kv-budget-gib 34 --algorithms esa gsa --runtime-option defer_after_step=false --tag _nodefer32 --out-dir $OUT 2>&1 | grep "tok/s"
$C --contexts 32768 --kv-budget-gib 34 --algorithms esa --runtime-option plan_ahead=false --tag _serial32 --out-dir $OUT 2>&1 | grep "tok/s"
$C --contexts 131072 --algorithms esa gsa --runtime-option defer_after_step=false --tag _nodefer128 --out-dir $OUT 2>&1 | grep "tok/s"
