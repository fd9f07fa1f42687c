"""Delta-prefetch copy speed on a GPU: ``copy_blocks`` (one launch per layer, reads the pinned host
store over the bus) vs one ``copy_`` per block, for N blocks of a Llama-1B-shaped layer
(2 x 8 heads x 64 tokens x 64 dims, bf16 = 128 KiB). Events and medians; prints GB/s.

    python benchmarks/bench_block_copy.py --blocks 256 3500
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))

from ucm_trt.kernels.block_copy import copy_blocks  # noqa: E402


def _time(fn, reps: int) -> float:
    fn()
    torch.cuda.synchronize()
    out = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        out.append(a.elapsed_time(b))
    return statistics.median(out)


def _per_block(host, dev, pairs) -> None:
    for h, d in pairs:
        dev[d].copy_(host[h], non_blocking=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--blocks", type=int, nargs="+", default=[256, 3500])
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2
    shape = (2, 8, 64, 64)
    rows = []
    for n in args.blocks:
        host = torch.randn(n * 2, *shape, dtype=torch.bfloat16).pin_memory()
        dev = torch.empty(n * 2, *shape, dtype=torch.bfloat16, device="cuda")
        hid = torch.randperm(n * 2)[:n]
        did = torch.randperm(n * 2)[:n]
        hid_d, did_d = hid.cuda(), did.cuda()
        nbytes = n * host[0].numel() * 2
        ms_kernel = _time(lambda host=host, dev=dev, h=hid_d, d=did_d: copy_blocks(host, dev, h, d), args.reps)
        pairs = list(zip(hid.tolist(), did.tolist(), strict=True))
        ms_loop = _time(lambda host=host, dev=dev, pairs=pairs: _per_block(host, dev, pairs), args.reps)
        row = {"blocks": n, "bytes": nbytes, "copy_blocks_ms": ms_kernel, "per_block_copy_ms": ms_loop,
               "copy_blocks_GBps": nbytes / ms_kernel / 1e6, "per_block_copy_GBps": nbytes / ms_loop / 1e6}
        rows.append(row)
        print(f"{n:5d} blocks ({nbytes / 2**20:6.1f} MiB): copy_blocks {ms_kernel:7.2f} ms "
              f"({row['copy_blocks_GBps']:5.1f} GB/s), per-block copy_ {ms_loop:7.2f} ms ({row['per_block_copy_GBps']:5.1f} GB/s)")
    if args.out:
        args.out.write_text(json.dumps({"card": torch.cuda.get_device_name(), "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
