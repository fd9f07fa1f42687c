"""Retrieval cost per sequence as the batch grows: host (CPU threads) vs GPU-resident representations.

    PYTHONPATH=python python benchmarks/bench_retrieval.py --out OUT_DIR            # GPU machine: all paths
    PYTHONPATH=python python benchmarks/bench_retrieval.py --out OUT_DIR --no-device --batches 1,4,8

Writes OUT_DIR/retrieval_scaling_<card or cpu>_<date>.json (machine facts, settings, rows) and prints
a table last. Paths: host (float32, bfloat16), host-pooled (all requests in one store, one task),
and with a GPU device / device-pooled (float32, bfloat16). The 8B-class shape (32 layers, 32 q / 8 KV heads, head_dim 128), 1024 blocks of 128
tokens (128K context), ratio 1/8. See ucm_trt.bench.retrieval.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
from pathlib import Path

import torch

from ucm_trt.bench.cpu import machine_facts
from ucm_trt.bench.retrieval import ScalingShape, bench_batch_scaling


def _ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--blocks", type=int, default=1024)
    p.add_argument("--batches", type=_ints, default=[1, 4, 16, 64])
    p.add_argument("--worker-threads", type=_ints, default=None,
                   help="RetrievalWorker threads (default: 1, 4 and all cores)")
    p.add_argument("--intra-op-threads", type=_ints, default=[1])
    p.add_argument("--host-dtypes", default="float32,bfloat16")
    p.add_argument("--no-device", action="store_true", help="skip the GPU-resident path")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--tag", default="")
    args = p.parse_args(argv)
    cores = os.cpu_count() or 1
    wts = args.worker_threads or sorted({1, min(4, cores), cores})
    paths = [("host", d) for d in args.host_dtypes.split(",") if d] + [("host-pooled", "float32")]
    cuda = torch.cuda.is_available() and not args.no_device
    if cuda:
        paths += [("device", "float32"), ("device", "bfloat16"), ("device-pooled", "float32"),
                  ("device-pooled", "bfloat16")]
    card = torch.cuda.get_device_name().replace(" ", "-") if torch.cuda.is_available() else "cpu"
    started = dt.datetime.now(dt.timezone.utc)
    load0 = os.getloadavg()
    rows = bench_batch_scaling(shape=ScalingShape(), num_blocks=args.blocks, batches=args.batches,
                               worker_threads=wts, intra_op_threads=args.intra_op_threads, paths=paths,
                               warmup=args.warmup, repeats=args.repeats)
    result = {
        "what": "retrieval cost per sequence vs batch: host CPU threads vs GPU-resident representations (issue 13 item 4)",
        "machine": {**machine_facts(), "cpu_count": cores, "platform": platform.platform(), "card": card,
                    "load_average_start": list(load0), "load_average_end": list(os.getloadavg())},
        "date_utc": started.strftime("%Y-%m-%d %H:%M"),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "rows": rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"retrieval_scaling_{card}_{started:%Y-%m-%d}{args.tag}.json"
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {path}")
    print(f"{'path':>13} {'dtype':>8} {'B':>3} {'wt':>3} {'it':>3} {'round ms':>9} {'ms/seq/retr':>11} "
          f"{'ms/seq/step R4':>14} {'GB/s':>6} {'diff':>4}")
    for r in rows:
        print(f"{r['path']:>13} {r['rep_dtype']:>8} {r['batch']:>3} {r['worker_threads']:>3} {r['intra_op_threads']:>3} "
              f"{r['round_ms']:>9.2f} {r['ms_per_seq_per_retrieval']:>11.3f} {r['ms_per_seq_per_step_R4']:>14.3f} "
              f"{r['effective_gb_per_s']:>6.1f} {r['differing_layers_vs_first_path']:>4}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
