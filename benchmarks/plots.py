#!/usr/bin/env python
"""Plots (PNG) and markdown tables from the quality JSON files (issue 7).

    PYTHONPATH=python .venv/bin/python benchmarks/plots.py [--results benchmarks/results/quality]
                                                          [--tables-out benchmarks/results/quality/tables.md]

Reads recall.json, accuracy.json, accuracy_rollback.json and runtime_passkey.json (whichever exist)
and writes next to them:

- recall_vs_budget.png      mean recall of the sparse layers vs kept fraction, per representation,
                            one panel per block size (per-head and shared selection rows)
- relative_vs_budget.png    recall / oracle at the same budget (DESIGN §5 target 0.95)
- layers_oracle.png         oracle recall at the rollback budget per layer and block size (diffuse layers)
- layers_relative.png       recall / oracle per layer x representation (block size 32, ratio 0.1)
- ppl_vs_sparsity.png       perplexity vs budget per method (real sparse attention)
- passkey_heatmap.png       passkey accuracy, length x depth, per method (rows) and budget (columns)
- runtime_passkey.png       passkey accuracy through ucm_trt.runtime per algorithm and budget
- tables.md                 the markdown tables of docs/quality.md
"""

from __future__ import annotations

import argparse
import math
import sys
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from ucm_trt.eval.methods import METHOD_LABELS  # noqa: E402
from ucm_trt.eval.report import (  # noqa: E402
    accuracy_summary,
    detect_rollback_layers,
    layer_table,
    markdown_table,
    passkey_grid,
    recall_summary,
    render_quality_tables,
)
from ucm_trt.eval.results import ResultStore  # noqa: E402

METHOD_ORDER = ["mean/dot", "minmax/quest", "hash/hamming", "first/dot", "weighted_mean/dot", "subblock/kvstar_vote"]
COLORS = dict(zip(METHOD_ORDER, ["C0", "C1", "C2", "C3", "C4", "C5"], strict=False))


def _ratio(label: str) -> float | None:
    return float(label.split("=")[1]) if label.startswith("ratio=") else None


def plot_recall(store: ResultStore, out: Path) -> list[Path]:
    summary = [r for r in recall_summary(store) if r["group"] == "sparse"]
    block_sizes = sorted({r["block_size"] for r in summary})
    selections = [s for s in ("per_head", "shared") if any(r["selection"] == s for r in summary)]
    written = []
    for name, key, ylabel in (("recall_vs_budget.png", "recall", "attention-mass recall"),
                              ("relative_vs_budget.png", "relative", "recall / oracle (same budget)")):
        fig, axes = plt.subplots(len(selections), len(block_sizes), figsize=(4.2 * len(block_sizes), 3.6 * len(selections)),
                                 squeeze=False, sharey=True)
        for i, sel in enumerate(selections):
            for j, bs in enumerate(block_sizes):
                ax = axes[i][j]
                rows = [r for r in summary if r["block_size"] == bs and r["selection"] == sel]
                methods = (["oracle"] if key == "recall" else []) + [m for m in METHOD_ORDER if any(r["method"] == m for r in rows)]
                for m in methods:
                    pts = sorted((r["kept_fraction"], r[key]) for r in rows
                                 if r["method"] == m and _ratio(r["budget"]) is not None)
                    if pts:
                        style = dict(color="k", lw=2.2) if m == "oracle" else dict(color=COLORS.get(m), lw=1.4)
                        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3, label=m, **style)
                if key == "recall":
                    sl = [r["recall"] for r in rows if r["method"] == "sink+local"]
                    if sl:
                        ax.axhline(sl[0], color="grey", ls=":", label="sink+local only")
                else:
                    ax.axhline(0.95, color="red", ls="--", lw=1, label="target 0.95")
                diffuse = detect_rollback_layers(store, block_size=bs, selection=sel)["layers"]
                ax.set_title(f"block {bs}, {sel} (rollback layers {diffuse})", fontsize=9)
                ax.set_xlabel("fraction of KV blocks kept")
                if j == 0:
                    ax.set_ylabel(ylabel)
                ax.grid(alpha=0.3)
        axes[0][-1].legend(fontsize=7, loc="lower right")
        fig.suptitle(f"{ylabel} vs budget (non-diffuse layers)", fontsize=10)
        fig.tight_layout()
        path = out / name
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)

    # per-layer oracle at the rollback budget
    fig, ax = plt.subplots(figsize=(8, 3.6))
    thr = None
    for bs in block_sizes:
        sel = "per_head" if "per_head" in selections else selections[0]
        info = detect_rollback_layers(store, block_size=bs, selection=sel)
        layers = sorted(info["oracle"])
        ax.plot(layers, [info["oracle"][x] for x in layers], marker="o", ms=3, label=f"block {bs}")
        thr = info["threshold"]
        ratio = info["ratio"]
    if thr is not None:
        ax.axhline(thr, color="red", ls="--", lw=1, label=f"diffuse threshold {thr:g}")
        ax.set_title(f"oracle recall at ratio {ratio:g} per layer (below the line: rollback / dense)", fontsize=10)
    ax.set_xlabel("layer")
    ax.set_ylabel("oracle recall")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = out / "layers_oracle.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    written.append(path)

    # per-layer relative heatmap
    bs = 32 if 32 in block_sizes else block_sizes[0]
    sel = "per_head" if "per_head" in selections else selections[0]
    budget = "ratio=0.1"
    rows = layer_table(store, block_size=bs, selection=sel, budget=budget)
    methods = [m for m in METHOD_ORDER if any(m in r for r in rows)]
    if rows and methods:
        data = [[r.get(m, math.nan) for m in methods] for r in rows]
        fig, ax = plt.subplots(figsize=(7, 0.22 * len(rows) + 1.6))
        im = ax.imshow(data, aspect="auto", cmap="RdYlGn", vmin=0.8, vmax=1.0)
        ax.set_xticks(range(len(methods)), methods, rotation=30, ha="right", fontsize=8)
        ax.set_yticks(range(len(rows)), [f"{r['layer']}{' (diffuse)' if r['diffuse'] else ''}" for r in rows],
                      fontsize=7)
        for y, row in enumerate(data):
            for x, v in enumerate(row):
                if not math.isnan(v):
                    ax.text(x, y, f"{v:.2f}", ha="center", va="center", fontsize=6)
        fig.colorbar(im, ax=ax, label="recall / oracle")
        ax.set_title(f"recall / oracle per layer, block {bs}, {sel}, {budget}", fontsize=10)
        fig.tight_layout()
        path = out / "layers_relative.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def plot_accuracy(store: ResultStore, out: Path, suffix: str = "") -> list[Path]:
    written = []
    summary = accuracy_summary(store)
    dense = [r for r in summary if r["method"] == "dense"]
    methods = []
    for r in summary:
        if r["method"] != "dense" and r["method"] not in methods:
            methods.append(r["method"])
    if any(r["ppl_tokens"] for r in summary):
        fig, ax = plt.subplots(figsize=(6.5, 4))
        for m in methods:
            pts = sorted((r["density"], r["ppl"]) for r in summary if r["method"] == m and r["ppl_tokens"])
            style = dict(color="k", lw=2.2) if m == "oracle" else dict(ls="--") if m == "streaming" else {}
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3, label=METHOD_LABELS.get(m, m), **style)
        if dense and dense[0]["ppl_tokens"]:
            ax.axhline(dense[0]["ppl"], color="grey", ls=":", label="dense")
        ax.set_xlabel("fraction of KV blocks read")
        ax.set_ylabel("perplexity (sparse continuation)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        ax.set_title("perplexity vs sparsity, real sparse attention", fontsize=10)
        fig.tight_layout()
        path = out / f"ppl_vs_sparsity{suffix}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    ratios = sorted({r["ratio"] for r in summary if r["method"] != "dense"})
    if store.cells("passkey") and ratios:
        rows = ["dense"] + methods
        fig, axes = plt.subplots(len(rows), len(ratios), figsize=(2.2 * len(ratios) + 1, 1.5 * len(rows) + 0.6),
                                 squeeze=False)
        for i, m in enumerate(rows):
            for j, ratio in enumerate(ratios):
                ax = axes[i][j]
                g = passkey_grid(store, method=m, ratio=1.0 if m == "dense" else ratio)
                if g["lengths"] and (m != "dense" or j == 0):
                    ax.imshow(g["acc"], cmap="RdYlGn", vmin=0, vmax=1, aspect="auto")
                    ax.set_xticks(range(len(g["depths"])), [f"{d:g}" for d in g["depths"]], fontsize=6)
                    ax.set_yticks(range(len(g["lengths"])), [str(n) for n in g["lengths"]], fontsize=6)
                    for y, row in enumerate(g["acc"]):
                        for x, v in enumerate(row):
                            ax.text(x, y, f"{v:.0%}" if not math.isnan(v) else "–", ha="center", va="center", fontsize=6)
                else:
                    ax.axis("off")
                if i == 0 and j == 0:
                    ax.set_title("dense (all blocks)", fontsize=8)
                elif i == 1:
                    ax.set_title(f"budget ratio {ratio:g}", fontsize=8)
                if j == 0:
                    ax.set_ylabel(m, fontsize=8)
        fig.suptitle("passkey accuracy: prompt length (rows) x needle depth (columns)", fontsize=9)
        fig.tight_layout()
        path = out / f"passkey_heatmap{suffix}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def runtime_summary(store: ResultStore) -> list[dict]:
    """Correct / total per (algorithm, ratio), over the prompts every variant finished."""
    cells = store.cells("runtime_passkey")
    variants = {(c["algorithm"], float(c["ratio"])) for c in cells}
    per: dict[tuple, set] = defaultdict(set)
    for c in cells:
        per[(c["length"], c["depth"], c["sample"])].add((c["algorithm"], float(c["ratio"])))
    done = {p for p, v in per.items() if v == variants}
    agg: dict[tuple[str, float], list[bool]] = defaultdict(list)
    for c in (c for c in cells if (c["length"], c["depth"], c["sample"]) in done):
        agg[(c["algorithm"], float(c["ratio"]))].append(bool(c["correct"]))
    return [{"algorithm": a, "ratio": r, "correct": sum(v), "total": len(v)} for (a, r), v in sorted(agg.items())]


def _runtime_prompts(store: ResultStore) -> list[tuple]:
    cells = store.cells("runtime_passkey")
    variants = {(c["algorithm"], float(c["ratio"])) for c in cells}
    per: dict[tuple, set] = defaultdict(set)
    for c in cells:
        per[(c["length"], c["depth"], c["sample"])].add((c["algorithm"], float(c["ratio"])))
    return sorted(p for p, v in per.items() if v == variants)


def plot_runtime(store: ResultStore, out: Path) -> list[Path]:
    rows = runtime_summary(store)
    if not rows:
        return []
    algs = []
    for r in rows:
        if r["algorithm"] not in algs:
            algs.append(r["algorithm"])
    ratios = sorted({r["ratio"] for r in rows if r["algorithm"] != "dense"})
    data = []
    for a in algs:
        line = []
        for ratio in ratios:
            hit = [r for r in rows if r["algorithm"] == a and (r["ratio"] == ratio or a == "dense")]
            line.append(hit[0]["correct"] / hit[0]["total"] if hit else math.nan)
        data.append(line)
    fig, ax = plt.subplots(figsize=(1.6 * len(ratios) + 2.5, 0.5 * len(algs) + 1.4))
    ax.imshow(data, cmap="RdYlGn", vmin=0, vmax=1, aspect="auto")
    ax.set_xticks(range(len(ratios)), [f"ratio {r:g}" for r in ratios])
    ax.set_yticks(range(len(algs)), algs)
    for y, line in enumerate(data):
        for x, _v in enumerate(line):
            hit = [r for r in rows if r["algorithm"] == algs[y] and (r["ratio"] == ratios[x] or algs[y] == "dense")]
            ax.text(x, y, f"{hit[0]['correct']}/{hit[0]['total']}" if hit else "–", ha="center", va="center", fontsize=8)
    ax.set_title("passkey through ucm_trt.runtime (dense prefill, sparse decode)", fontsize=9)
    fig.tight_layout()
    path = out / "runtime_passkey.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]


def runtime_table(store: ResultStore) -> str:
    cfg = store.meta.get("config", {})
    rows = runtime_summary(store)
    head = (f"### Passkey through the generation runtime (`ucm_trt.runtime.Engine`, TorchBackend)\n\n"
            f"Prompts counted (every variant finished): "
            f"{', '.join(sorted({f'{c[0]} tok / depth {c[1]:g}' for c in _runtime_prompts(store)}))}; block size "
            f"{cfg.get('block_size')}, retrieval stride {cfg.get('retrieval_stride')}; the runtime prefills densely and "
            f"decodes {cfg.get('max_new_tokens')} tokens with the algorithm's policy.\n\n")
    return head + markdown_table(["algorithm", "budget ratio", "passkey"],
                                 [[r["algorithm"], "dense" if r["algorithm"] == "dense" else f"{r['ratio']:g}",
                                   f"{r['correct']}/{r['total']}"] for r in rows])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", type=Path, default=Path("benchmarks/results/quality"))
    p.add_argument("--tables-out", type=Path, default=None, help="default RESULTS/tables.md")
    p.add_argument("--docs", type=Path, default=None, metavar="DOC.md",
                   help="also replace the text between the GENERATED TABLES markers of this markdown file")
    args = p.parse_args(argv)
    res = args.results
    if not res.is_dir():
        print(f"plots.py: error: --results {str(res)!r} is not a directory", file=sys.stderr)
        return 2
    stores = {name: ResultStore(res / f"{name}.json") for name in
              ("recall", "accuracy", "accuracy_rollback", "runtime_passkey") if (res / f"{name}.json").is_file()}
    if not stores:
        print(f"plots.py: error: no result JSON in {res}", file=sys.stderr)
        return 2
    written: list[Path] = []
    if "recall" in stores:
        written += plot_recall(stores["recall"], res)
    if "accuracy" in stores:
        written += plot_accuracy(stores["accuracy"], res)
    if "accuracy_rollback" in stores:
        written += plot_accuracy(stores["accuracy_rollback"], res, suffix="_rollback")
    if "runtime_passkey" in stores:
        written += plot_runtime(stores["runtime_passkey"], res)
    tables = render_quality_tables(stores.get("recall"), stores.get("accuracy"), stores.get("accuracy_rollback"))
    if "runtime_passkey" in stores:
        tables += "\n" + runtime_table(stores["runtime_passkey"]) + "\n"
    out = args.tables_out or res / "tables.md"
    out.write_text(tables)
    written.append(out)
    if args.docs is not None:
        doc = args.docs.read_text()
        begin, end = "<!-- BEGIN GENERATED TABLES -->", "<!-- END GENERATED TABLES -->"
        if begin not in doc or end not in doc:
            print(f"plots.py: error: {args.docs} lacks the {begin} / {end} markers", file=sys.stderr)
            return 2
        head, rest = doc.split(begin, 1)
        _, tail = rest.split(end, 1)
        args.docs.write_text(f"{head}{begin}\n\n{tables}\n{end}{tail}")
        written.append(args.docs)
    for w in written:
        print(w)
    return 0


if __name__ == "__main__":
    sys.exit(main())
