"""Print a short table of bench_runtime.py result files (the last thing gpu_suite.sh prints).

tok/s is the steady state: rows x 1000 / mean decode step (ms) after warm-up (it counts the heavy
retrieval steps of offload policies); "step ms" is the median step (the steps between retrievals);
"1st ms" is the first decode step, which compiles Triton kernels for new shapes and captures the graph.

    python benchmarks/runtime_table.py benchmarks/results/runtime/*.json

Files of ``bench_capacity.py`` (``capacity_*.json``) print its capacity-wall table instead
(``--markdown``: as the Markdown table of docs/runtime.md).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def _fmt(x, spec: str = ".1f") -> str:
    return "-" if x is None else format(x, spec)


def steady_tokens_per_s(r: dict) -> float | None:
    """Rows per mean decode step after warm-up. Files from before ``decode_step_ms_mean_steady``
    existed: the mean over every step but the first, from the totals; else the whole-run rate."""
    mean = r.get("decode_step_ms_mean_steady")
    if mean is None and r.get("decode_step_ms_first") is not None and r.get("decode_steps", 0) > 1:
        mean = (1e3 * r["decode_seconds"] - r["decode_step_ms_first"]) / (r["decode_steps"] - 1)
    return r["batch"] * 1e3 / mean if mean else r.get("decode_tokens_per_s")


def main(paths: list[str]) -> int:
    markdown = "--markdown" in paths
    paths = [p for p in paths if p != "--markdown"]
    if not paths:
        print("usage: runtime_table.py [--markdown] RESULT.json [...]", file=sys.stderr)
        return 2
    print(f"{'file':<34} {'algorithm':<14} {'ctx':>7} {'B':>2} {'graph':>5} {'tok/s':>7} {'step ms':>8} {'1st ms':>7} "
          f"{'dev KV MiB':>10} {'H2D MiB/st':>10} {'overlap':>7}")
    for p in paths:
        d = json.loads(Path(p).read_text())
        name = Path(p).stem[-33:]
        if d.get("benchmark") == "capacity":
            from bench_capacity import markdown_table, table  # the same directory

            print(f"--- {Path(p).name} ({d['card']}, {d['date_utc']}): largest-batch tok/s (batch), capacity speedup")
            print(markdown_table(d["rows"]) if markdown else table(d["rows"]))
            continue
        if "max_concurrent_measured" in d:
            for r in d["runs"]:
                status = _fmt(r.get("decode_tokens_per_s")) + " tok/s" if r["ok"] else "PoolExhausted"
                print(f"{name:<34} capacity {r['algorithm']:<6} ctx {d['context']} budget {d['kv_budget_gb']} GiB: "
                      f"{r['sequences']} sequences -> {status}")
            continue
        for r in d.get("runs", []):
            if "error" in r:
                print(f"{name:<34} {r['algorithm']:<14} {r['context']:>7} error: {r['error'][:60]}")
                continue
            mb = (r.get("device_kv_bytes_last_decode") or 0) / 2**20
            steady = steady_tokens_per_s(r)
            h2d = (r.get("decode_bytes_h2d_per_step") or 0) / 2**20
            print(f"{name:<34} {r['algorithm']:<14} {r['context']:>7} {r['batch']:>2} "
                  f"{r.get('cuda_graph_mode', '-'):>5} {_fmt(steady):>7} "
                  f"{_fmt(r.get('decode_step_ms_median'), '.2f'):>8} {_fmt(r.get('decode_step_ms_first'), '.0f'):>7} {mb:>10.0f} {h2d:>10.1f} "
                  f"{_fmt(r.get('retrieval_overlap'), '.2f'):>7}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
