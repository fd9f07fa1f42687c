"""Speed plots from the committed GPU results (no GPU needed): attention tokens/s vs context length,
dense vs sparse, and end-to-end decode tokens/s of the runtime.

    python benchmarks/plot_speed.py   # writes benchmarks/results/speed_vs_context_NVIDIA-H200_2026-11-28.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from runtime_table import steady_tokens_per_s

RESULTS = Path(__file__).resolve().parent / "results"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kernels", type=Path, default=RESULTS / "kernels_NVIDIA-H200_2026-11-28.json")
    p.add_argument("--runtime", type=Path, nargs="+",
                   default=[RESULTS / "runtime" / "runtime_NVIDIA-H200_2026-11-28_final.json",
                            RESULTS / "runtime" / "runtime_NVIDIA-H200_2026-11-28_arrays.json"],
                   help="runtime result files; a later file's (algorithm, context) rows replace an earlier one's")
    p.add_argument("--out", type=Path, default=RESULTS / "speed_vs_context_NVIDIA-H200_2026-11-28.png")
    args = p.parse_args(argv)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = json.loads(args.kernels.read_text())
    files = [json.loads(f.read_text()) for f in args.runtime]
    merged = {}
    for d in files:
        for r in d["runs"]:
            if r.get("batch", 1) == 1:
                merged[(r["algorithm"], r["context"])] = r
    runtime = {"model": files[-1]["model"], "runs": list(merged.values())}
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
    for ax, batch in zip(axes[:2], (1, 8), strict=True):
        series = {}
        for r in rows:
            if r["batch"] != batch or r["op"] not in ("dense_sdpa", "ours_sparse", "naive_gather_sdpa"):
                continue
            label = "dense SDPA" if r["op"] == "dense_sdpa" else f"{r['op'].replace('_', ' ')} @ {r['budget']:g}"
            # one decode step's attention for the whole batch: tokens produced per second by attention alone
            series.setdefault(label, []).append((r["context_len"], batch / (r["median_ms"] / 1e3)))
        for label, pts in sorted(series.items()):
            pts.sort()
            style = "k-o" if label == "dense SDPA" else ("--x" if "naive" in label else "-o")
            ax.plot([c for c, _ in pts], [t for _, t in pts], style, label=label)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel("attention-only tokens/s (one layer)")
        ax.set_title(f"decode attention, batch {batch}, GQA 32/8, d=128, bf16")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    ax = axes[2]
    by_alg = {}
    for r in runtime["runs"]:
        if "error" in r:
            continue
        by_alg.setdefault(r["algorithm"], []).append((r["context"], steady_tokens_per_s(r)))
    for alg, pts in sorted(by_alg.items()):
        pts.sort()
        ax.plot([c for c, _ in pts], [t for _, t in pts], "-o", label=alg)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("end-to-end decode tokens/s (mean step after the 1st)")
    ax.set_ylim(bottom=0)
    ax.set_title(f"runtime, {runtime['model']} (16 layers), batch 1, CUDA graphs")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.suptitle(f"{rows[0]['card']}, {rows[0]['date']} (from {args.kernels.name} and {', '.join(f.name for f in args.runtime)})", fontsize=9)
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
