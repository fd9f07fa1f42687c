# Sourced by the GPU scripts (benchmarks/gpu_suite.sh, benchmarks/gpu_*_call.sh): the repository root as the working folder,
# $OUT, PYTHONPATH, $PY, the versions line, and FlashInfer (the kernel benchmark's peer) installed from the
# carried wheels in .whl/ (benchmarks/flashinfer_wheels.sh) into /tmp/ucm-site when they are there.
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 2
OUT=${OUT:-$PWD/out}
mkdir -p "$OUT"
export PYTHONPATH="$PWD/python:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
$PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
if compgen -G ".whl/flashinfer_python-*.whl" >/dev/null; then
  if $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/ucm-site .whl/*.whl; then
    export PYTHONPATH="$PYTHONPATH:/tmp/ucm-site"
  else
    echo "installing .whl/*.whl failed"
  fi
fi
