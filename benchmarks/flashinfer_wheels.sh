#!/usr/bin/env bash
# Wheels that carry FlashInfer (the peer in benchmarks/bench_kernels.py) to the GPU machine, which has
# no package registry. Usage: benchmarks/flashinfer_wheels.sh [DEST]   (default /work/main/.whl)
#
# flashinfer-python 0.7.2.post1 is a 62 MB wheel, almost all of it JIT sources for other kernels
# (data/csrc 262 MB unpacked, vendored CUTLASS and CCCL); the device call carries at most 64 MiB.
# The wheel is therefore repacked (same name and version, RECORD rewritten) keeping the Python
# package, data/include, data/spdlog and of data/csrc only the shared headers and the batch-decode
# sources that BatchDecodeWithPagedKVCacheWrapper JIT-compiles, and of the vendored CCCL only libcudacxx's
# headers: the decode headers include <cuda/cmath> (flashinfer/fastdiv.cuh), which the device's nvcc CCCL
# lacks (the first device run failed its ninja build without them); CUTLASS, CUB and Thrust are dropped. Its import-time needs beyond the
# device's torch/numpy: apache-tvm-ffi (cp312) and nvidia-ml-py, plus the small pure-Python
# requirements einops, tabulate, click, tqdm. The heavy optional ones (cuda-tile, cutlass-dsl,
# cudnn-frontend, nccl4py) are not carried: `import flashinfer` does not need them.
set -euo pipefail
DEST=${1:-/work/main/.whl}
mkdir -p "$DEST"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
PIP=(python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp
     --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64
     --platform manylinux2014_x86_64)
"${PIP[@]}" -d "$tmp" flashinfer-python==0.7.2.post1
"${PIP[@]}" -d "$DEST" "apache-tvm-ffi>=0.1.11,<0.2" nvidia-ml-py einops tabulate click tqdm
python3 - "$tmp"/flashinfer_python-*.whl "$DEST" <<'PY'
import base64, hashlib, os, re, sys, zipfile

src, dest = sys.argv[1], sys.argv[2]
keep_csrc = re.compile(r"flashinfer/data/csrc/(batch_decode[^/]*|[^/]+\.(h|cuh|inc))$")
def keep(name):
    if name.startswith("flashinfer/data/cccl/libcudacxx/include/"):
        return True
    if name.startswith(("flashinfer/data/cutlass/", "flashinfer/data/cccl/")):
        return False
    if name.startswith("flashinfer/data/csrc/"):
        return bool(keep_csrc.match(name))
    return True
out = os.path.join(dest, os.path.basename(src))
with zipfile.ZipFile(src) as zin, zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as zout:
    record_name = next(n for n in zin.namelist() if n.endswith(".dist-info/RECORD"))
    lines = []
    for info in zin.infolist():
        if info.filename == record_name or not keep(info.filename):
            continue
        data = zin.read(info.filename)
        zout.writestr(info, data)
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        lines.append(f"{info.filename},sha256={digest},{len(data)}")
    lines.append(f"{record_name},,")
    zout.writestr(record_name, "\n".join(lines) + "\n")
print(f"{out}: {os.path.getsize(out) / 1e6:.1f} MB (from {os.path.getsize(src) / 1e6:.1f} MB)")
PY
du -ch "$DEST"/*.whl | tail -1
