"""Aggregate the quality JSON files into tables (markdown) for docs/quality.md.

Every number printed here is computed from a :class:`~ucm_trt.eval.results.ResultStore` file;
nothing is typed in by hand.

Definitions
-----------
* recall: mean attention-mass recall of the evaluated decode queries (``recall_curve``);
* oracle: the oracle's recall at the same number of blocks per query and KV head;
* relative: recall / oracle per (prompt, layer) cell, then averaged (DESIGN §5 target: >= 0.95);
* diffuse (rollback) layer: the oracle's recall at ``Budget.ratio(rollback_ratio)``, averaged over
  the prompts, is below ``rollback_threshold`` (from the recall run's config). Diffuse layers run
  dense, so they are reported separately and left out of the sparse-layer averages.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable
from typing import Any

from ucm_trt.eval.methods import METHOD_LABELS
from ucm_trt.eval.results import ResultStore

__all__ = [
    "detect_rollback_layers",
    "recall_summary",
    "layer_table",
    "accuracy_summary",
    "passkey_grid",
    "markdown_table",
    "render_quality_tables",
]


def _mean(xs: Iterable[float]) -> float:
    xs = list(xs)
    return sum(xs) / len(xs) if xs else float("nan")


def _fmt(x: Any, nd: int = 3) -> str:
    if x is None:
        return "–"
    if isinstance(x, float):
        if math.isnan(x):
            return "–"
        return f"{x:.{nd}f}"
    return str(x)


def _cfg(store: ResultStore) -> dict[str, Any]:
    cfg = store.meta.get("config")
    if not isinstance(cfg, dict):
        raise ValueError(f"{store.path}: meta.config is missing; it is written by run_recall_sweep's caller")
    return cfg


def complete_recall_cells(store: ResultStore) -> list[dict[str, Any]]:
    """Recall cells of the prompts that finished every (layer, block size, selection) cell; a prompt
    whose sweep was interrupted is left out so every average covers the same prompts."""
    cells = store.cells("recall")
    per: dict[tuple[str, int], int] = defaultdict(int)
    for c in cells:
        per[(c["prompt"], c["sample"])] += 1
    if not per:
        return []
    full = max(per.values())
    keep = {k for k, n in per.items() if n == full}
    return [c for c in cells if (c["prompt"], c["sample"]) in keep]


def recall_prompts(store: ResultStore) -> list[str]:
    """``prompt#sample`` of the complete prompts (see :func:`complete_recall_cells`)."""
    return sorted({f"{c['prompt']}#{c['sample']}" for c in complete_recall_cells(store)})


def _rollback_label(cfg: dict[str, Any]) -> str:
    return f"ratio={float(cfg['rollback_ratio']):g}"


def detect_rollback_layers(
    store: ResultStore, *, block_size: int, selection: str, threshold: float | None = None
) -> dict[str, Any]:
    """Diffuse layers at a block size and selection mode: ``{"layers", "oracle", "ratio", "threshold"}``
    where ``oracle[layer]`` is the oracle's recall at the rollback budget averaged over prompts.
    ``threshold`` overrides the run's ``rollback_threshold``."""
    cfg = _cfg(store)
    if threshold is not None and (isinstance(threshold, bool) or not isinstance(threshold, (int, float))
                                  or not 0 <= threshold <= 1):
        raise ValueError(f"threshold must be a number in [0, 1] or None, got {threshold!r}")
    label = _rollback_label(cfg)
    per_layer: dict[int, list[float]] = defaultdict(list)
    for c in complete_recall_cells(store):
        if c["block_size"] != block_size or c["selection"] != selection:
            continue
        for r in c["rows"]:
            if r["method"] == "oracle" and r["budget"] == label:
                per_layer[c["layer"]].append(r["recall"])
    if not per_layer:
        raise ValueError(
            f"{store.path} has no recall cells with block_size={block_size}, selection={selection!r} "
            f"and an oracle row at {label}"
        )
    oracle = {layer: _mean(v) for layer, v in sorted(per_layer.items())}
    thr = float(cfg["rollback_threshold"]) if threshold is None else float(threshold)
    return {
        "layers": [layer for layer, v in oracle.items() if v < thr],
        "oracle": oracle,
        "ratio": float(cfg["rollback_ratio"]),
        "threshold": thr,
    }


def recall_summary(store: ResultStore) -> list[dict[str, Any]]:
    """One row per (block_size, selection, method, budget, layer group) with mean recall, oracle,
    relative (mean, min over cells), the share of cells with relative >= 0.95, and the kept fraction
    of blocks. ``group`` is ``"sparse"`` (non-diffuse layers) or ``"rollback"``."""
    cells = complete_recall_cells(store)
    keys = sorted({(c["block_size"], c["selection"]) for c in cells})
    out: list[dict[str, Any]] = []
    for bs, sel in keys:
        diffuse = set(detect_rollback_layers(store, block_size=bs, selection=sel)["layers"])
        acc: dict[tuple[str, str, str], list[dict[str, Any]]] = defaultdict(list)
        order: list[tuple[str, str]] = []
        for c in cells:
            if c["block_size"] != bs or c["selection"] != sel:
                continue
            group = "rollback" if c["layer"] in diffuse else "sparse"
            for r in c["rows"]:
                mk = (r["method"], r["budget"])
                if mk not in order:
                    order.append(mk)
                acc[(group, *mk)].append(r)
        for group in ("sparse", "rollback"):
            for method, budget in order:
                rows = acc.get((group, method, budget))
                if not rows:
                    continue
                rel = [r["relative"] for r in rows if r["relative"] is not None]
                out.append({
                    "block_size": bs, "selection": sel, "group": group, "method": method, "budget": budget,
                    "cells": len(rows), "recall": _mean(r["recall"] for r in rows),
                    "oracle": _mean(r["oracle_recall"] for r in rows),
                    "relative": _mean(rel), "relative_min": min(rel) if rel else float("nan"),
                    "share_ge_95": _mean(1.0 if x >= 0.95 else 0.0 for x in rel),
                    "kept_fraction": _mean(r["blocks"] / r["num_blocks"] for r in rows),
                })
    return out


def layer_table(store: ResultStore, *, block_size: int, selection: str, budget: str) -> list[dict[str, Any]]:
    """Per layer: oracle recall at the rollback budget, the sink+local recall, and each method's
    relative recall at ``budget`` (averaged over prompts)."""
    info = detect_rollback_layers(store, block_size=block_size, selection=selection)
    per: dict[int, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for c in complete_recall_cells(store):
        if c["block_size"] != block_size or c["selection"] != selection:
            continue
        for r in c["rows"]:
            if r["method"] == "sink+local":
                per[c["layer"]]["sink+local"].append(r["recall"])
            elif r["budget"] == budget:
                if r["method"] == "oracle":
                    per[c["layer"]]["oracle@budget"].append(r["recall"])
                elif r["relative"] is not None:
                    per[c["layer"]][r["method"]].append(r["relative"])
    rows = []
    for layer in sorted(per):
        row = {"layer": layer, "diffuse": layer in info["layers"], "oracle@rollback": info["oracle"].get(layer)}
        row.update({k: _mean(v) for k, v in per[layer].items()})
        rows.append(row)
    return rows


def complete_accuracy_cells(store: ResultStore, kind: str) -> list[dict[str, Any]]:
    """``ppl`` / ``passkey`` cells of the prompts for which every (method, ratio) finished, so all
    methods are compared on the same prompts (an interrupted prompt is left out)."""
    cells = store.cells(kind)
    variants = {(c["method"], float(c["ratio"])) for c in cells}
    cfg = store.meta.get("config")
    if isinstance(cfg, dict) and "methods" in cfg and "ratios" in cfg:  # the run's full variant set
        variants |= {("dense", 1.0)} | {(m, float(r)) for m in cfg["methods"] for r in cfg["ratios"]}
    prompt_of = (lambda c: (c["sample"],)) if kind == "ppl" else (lambda c: (c["length"], c["depth"], c["sample"]))
    per: dict[tuple, set] = defaultdict(set)
    for c in cells:
        per[prompt_of(c)].add((c["method"], float(c["ratio"])))
    keep = {p for p, v in per.items() if v == variants}
    return [c for c in cells if prompt_of(c) in keep]


def accuracy_summary(store: ResultStore) -> list[dict[str, Any]]:
    """Per (method, ratio): passkey accuracy (correct / total), perplexity exp(sum NLL / tokens),
    and the mean fraction of blocks read (density) over the ppl and passkey cells. Only prompts that
    every (method, ratio) finished are counted (:func:`complete_accuracy_cells`)."""
    agg: dict[tuple[str, float], dict[str, Any]] = {}
    for c in complete_accuracy_cells(store, "ppl") + complete_accuracy_cells(store, "passkey"):
        key = (c["method"], float(c["ratio"]))
        a = agg.setdefault(key, {"nll": 0.0, "tokens": 0, "correct": 0, "total": 0, "density": []})
        if c["kind"] == "ppl":
            a["nll"] += c["nll"]
            a["tokens"] += c["tokens"]
        else:
            a["correct"] += int(c["correct"])
            a["total"] += 1
        a["density"].append(c["density"])
    dense_ppl = None
    if ("dense", 1.0) in agg and agg[("dense", 1.0)]["tokens"]:
        dense_ppl = math.exp(agg[("dense", 1.0)]["nll"] / agg[("dense", 1.0)]["tokens"])
    out = []
    for (method, ratio), a in agg.items():
        ppl = math.exp(a["nll"] / a["tokens"]) if a["tokens"] else float("nan")
        out.append({
            "method": method, "ratio": ratio, "ppl": ppl,
            "ppl_delta": (ppl - dense_ppl) / dense_ppl if dense_ppl and a["tokens"] else float("nan"),
            "ppl_tokens": a["tokens"], "passkey_correct": a["correct"], "passkey_total": a["total"],
            "passkey_acc": a["correct"] / a["total"] if a["total"] else float("nan"),
            "density": _mean(a["density"]),
        })
    rank = {m: i for i, m in enumerate(["dense", "oracle", "streaming", "mean", "minmax", "hash", "first",
                                         "weighted_mean", "subblock"])}
    out.sort(key=lambda r: (rank.get(r["method"], 99), r["ratio"]))
    return out


def passkey_grid(store: ResultStore, *, method: str, ratio: float) -> dict[str, Any]:
    """``{"lengths", "depths", "acc": [[...]]}`` passkey accuracy per length (rows) x depth (columns)."""
    cells = [c for c in complete_accuracy_cells(store, "passkey")
             if c["method"] == method and float(c["ratio"]) == float(ratio)]
    lengths = sorted({c["length"] for c in cells})
    depths = sorted({c["depth"] for c in cells})
    acc = []
    for n in lengths:
        row = []
        for d in depths:
            sel = [c["correct"] for c in cells if c["length"] == n and c["depth"] == d]
            row.append(_mean(1.0 if x else 0.0 for x in sel))
        acc.append(row)
    return {"lengths": lengths, "depths": depths, "acc": acc}


def markdown_table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(_fmt(x) for x in r) + " |" for r in rows]
    return "\n".join(lines)


def render_quality_tables(recall: ResultStore | None, accuracy: ResultStore | None,
                          accuracy_rollback: ResultStore | None = None) -> str:
    """The markdown tables of docs/quality.md."""
    parts: list[str] = []
    if accuracy is not None:
        parts.append(_accuracy_md(accuracy, "Accuracy vs sparsity (all layers sparse)"))
    if accuracy_rollback is not None:
        parts.append(_accuracy_md(accuracy_rollback, "Accuracy vs sparsity with the diffuse layers dense (rollback)"))
    if recall is not None:
        parts.append(_target_md(recall))
        parts.append(_rollback_md(recall))
        parts.append(_recall_md(recall))
    return "\n\n".join(parts) + "\n"


def _accuracy_md(store: ResultStore, title: str) -> str:
    cfg = store.meta.get("config", {})
    rows = accuracy_summary(store)
    body = [[METHOD_LABELS.get(r["method"], r["method"]),
             "dense" if r["method"] == "dense" else f"{r['ratio']:g}",
             f"{100 * r['density']:.0f}%",
             f"{r['passkey_correct']}/{r['passkey_total']}",
             r["ppl"], f"{100 * r['ppl_delta']:+.1f}%" if not math.isnan(r["ppl_delta"]) else "–",
             r["ppl_tokens"]]
            for r in rows]
    head = (f"### {title}\n\nBlock size {cfg.get('block_size')}, selection {cfg.get('selection')}, "
            f"sink {cfg.get('sink_blocks')} + local {cfg.get('local_blocks')} blocks, rollback layers "
            f"{cfg.get('rollback_layers') or 'none'}. Passkey: lengths {cfg.get('passkey_lengths')}, depths "
            f"{cfg.get('passkey_depths')}, {cfg.get('passkey_samples')} sample(s) each. Perplexity: "
            f"{cfg.get('ppl_samples')} essay window(s), {cfg.get('ppl_prefix')} dense prefix tokens + "
            f"{cfg.get('ppl_scored')} scored tokens, chunk {cfg.get('chunk')}.\n\n")
    return head + markdown_table(
        ["method", "budget ratio (of candidates)", "KV blocks read (sparse layers)", "passkey", "perplexity", "Δ ppl vs dense",
         "scored tokens"], body)


def _recall_md(store: ResultStore) -> str:
    cfg = _cfg(store)
    summary = recall_summary(store)
    parts = []
    keys = sorted({(r["block_size"], r["selection"]) for r in summary})
    for bs, sel in keys:
        info = detect_rollback_layers(store, block_size=bs, selection=sel)
        rows = [r for r in summary if r["block_size"] == bs and r["selection"] == sel and r["group"] == "sparse"]
        budgets = []
        for r in rows:
            if r["budget"] != "-" and r["budget"] not in budgets:
                budgets.append(r["budget"])
        methods = []
        for r in rows:
            if r["method"] not in methods:
                methods.append(r["method"])
        body = []
        for m in methods:
            line: list[Any] = [m]
            for b in budgets:
                hit = [r for r in rows if r["method"] == m and r["budget"] == b]
                if not hit:
                    line.append("–")
                    continue
                h = hit[0]
                line.append(f"{h['recall']:.3f}" if m in ("oracle",) else f"{h['recall']:.3f} ({h['relative']:.3f})")
            body.append(line)
        sl = [r for r in rows if r["method"] == "sink+local"]
        kept = {b: _mean(r["kept_fraction"] for r in rows if r["budget"] == b and r["method"] == "oracle") for b in budgets}
        parts.append(
            f"#### block size {bs}, selection {sel}\n\n"
            f"Diffuse (rollback) layers — oracle recall at ratio {info['ratio']:g} below {info['threshold']:g}: "
            f"{info['layers'] or 'none'}. Sparse-layer averages below; sink+local only: "
            f"{_fmt(sl[0]['recall']) if sl else '–'}.\n\n"
            + markdown_table(["method \\ budget"] + [f"{b} (kept {100 * kept[b]:.0f}%)" if not math.isnan(kept[b]) else b
                                                      for b in budgets],
                             [r for r in body if r[0] != "sink+local"])
        )
    head = (f"### Attention-mass recall (cell: recall (recall / oracle))\n\n"
            f"Prompts averaged: {', '.join(recall_prompts(store))} (of {cfg.get('essay_samples')} essay + "
            f"{cfg.get('passkey_samples')} passkey prompt(s) configured), each of "
            f"{cfg.get('num_tokens')} tokens; the last {cfg.get('num_queries')} tokens are the decode queries; "
            f"sink {cfg.get('sink_blocks')} + local {cfg.get('local_blocks')} blocks forced.\n\n")
    return head + "\n\n".join(parts)


def _target_md(store: ResultStore) -> str:
    """DESIGN §5: worst (over the ratio budgets) mean recall/oracle of each method, sparse layers."""
    summary = [r for r in recall_summary(store) if r["group"] == "sparse" and r["budget"].startswith("ratio=")]
    keys = sorted({(r["block_size"], r["selection"]) for r in summary})
    methods = [m for m in ("mean/dot", "minmax/quest", "hash/hamming", "first/dot", "weighted_mean/dot",
                           "subblock/kvstar_vote") if any(r["method"] == m for r in summary)]
    body = []
    for m in methods:
        line: list[Any] = [m]
        for bs, sel in keys:
            vals = [(r["relative"], r["budget"]) for r in summary
                    if r["method"] == m and r["block_size"] == bs and r["selection"] == sel]
            if not vals:
                line.append("–")
                continue
            worst, at = min(vals)
            line.append(f"{worst:.3f}{' ✓' if worst >= 0.95 else ' ✗'} ({at.split('=')[1]})")
        body.append(line)
    return ("### DESIGN §5 target: recall >= 0.95 x oracle at the same budget\n\n"
            "Cell: the worst, over the ratio budgets, of the mean recall/oracle over the sparse "
            "(non-diffuse) layers and prompts; in brackets the budget ratio where it is worst; "
            "✓ = meets 0.95.\n\n"
            + markdown_table(["method"] + [f"block {bs}, {sel}" for bs, sel in keys], body))


def _rollback_md(store: ResultStore) -> str:
    cells = complete_recall_cells(store)
    keys = sorted({(c["block_size"], c["selection"]) for c in cells})
    body = []
    thr = ratio = None
    for bs, sel in keys:
        info = detect_rollback_layers(store, block_size=bs, selection=sel)
        thr, ratio = info["threshold"], info["ratio"]
        lowest = sorted(info["oracle"].items(), key=lambda kv: kv[1])[:4]
        body.append([f"block {bs}, {sel}", ", ".join(str(x) for x in info["layers"]) or "none",
                     ", ".join(f"L{layer}: {v:.2f}" for layer, v in lowest)])
    return (f"### Diffuse layers (rollback: run dense)\n\nA layer is diffuse when the oracle's recall at "
            f"ratio {ratio:g} (about 1/8 of the candidate blocks), averaged over the prompts, is below {thr:g}.\n\n"
            + markdown_table(["setting", "diffuse layers", "lowest oracle recall at the rollback budget"], body))
