"""Host time of the offload planner per decode step (issue 13): ``KVManager.plan_step`` (+ the
``issue_deferred`` and ``write_back`` bookkeeping) at the capacity bench's shapes, on the CPU.

What runs: a :class:`~ucm_trt.runtime.kv.KVManager` with the Llama-3.2-1B layer count (16), ``B``
offloaded requests of ``context`` tokens, block ``block_size``; each step plans one new token for
every request. Per (request, layer) the step needs sink + local window + ``ratio`` of the other
blocks (the bench_capacity working set, one selection shared by the KV heads); every ``stride``
steps a retrieval replaces the selection with a new array: ``realistic`` turnover replaces
``--turnover`` (13.7%, measured on SmolLM2 at 8K) of the chosen blocks, ``random`` draws them
anew. Between retrievals the same array objects are passed (as the engine does). The device
pool holds the working sets plus one prompt (the capacity bench's sizing), so the overlapped
schedule's old + new sets may press on it (then layers take the sequential path).

The copies themselves are not run: on CUDA they are asynchronous launches on a side stream, and a
CPU memcpy of a block store would measure the memory bus, not the planner. ``_copy_layers`` is
replaced by its bookkeeping (a generation per layer), so the times are the planner's host work.
Both wall time and the planning thread's CPU time are recorded (this box is shared).

BEFORE/AFTER: ``--before PATH`` also plans with another copy of ``kv.py`` (e.g. main's:
``git show main:python/ucm_trt/runtime/kv.py > /tmp/kv_before.py``), each case alternating
before / after ``--repeat`` times in the same process, so both see the same load; a row reports
the fastest repeat (``plan_ms_per_step``) and every repeat's mean (``repeats_ms``). ``--kv-module``
replaces the "after" module.

Example::

    git show main:python/ucm_trt/runtime/kv.py > /tmp/kv_before.py
    python benchmarks/bench_plan.py --before /tmp/kv_before.py --out benchmarks/results/cpu/plan_<box>.json
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))

from ucm_trt.runtime import kv as kv_after  # noqa: E402

TURNOVERS = ("realistic", "random")


def load_kv_module(path: Path | None):
    if path is None:
        return kv_after
    spec = importlib.util.spec_from_file_location("ucm_trt.runtime._kv_bench_other", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def stub_copies(kv) -> None:
    """Keep the copies' bookkeeping (one generation per layer), skip the data movement."""
    L = kv.layout.num_layers

    def copy_layers(copies, *, to_device, after_forward_start=False):
        gens = [0] * L
        for layer in range(L):
            if copies[layer]:
                phys = np.concatenate([p for _, p in copies[layer]]).astype(np.int64)
                gens[layer] = kv._next_gen(layer, phys, "load" if to_device else "write_back")
        return gens

    kv._copy_layers = copy_layers


class Selections:
    """Per (layer, row) the chosen blocks (excluding sink and local window), changed every stride."""

    def __init__(self, rng, *, layers: int, batch: int, candidates: int, k: int, turnover: str, fraction: float):
        self.rng, self.candidates, self.k = rng, candidates, k
        self.turnover, self.fraction = turnover, fraction
        self.chosen = [[self._draw() for _ in range(batch)] for _ in range(layers)]

    def _draw(self) -> np.ndarray:
        return np.sort(self.rng.choice(self.candidates, self.k, replace=False)) + 1  # after the sink block

    def retrieve(self) -> None:
        for per in self.chosen:
            for row, s in enumerate(per):
                if self.turnover == "random":
                    per[row] = self._draw()
                    continue
                n = int(round(self.fraction * self.k))
                keep = self.rng.choice(s, self.k - n, replace=False)
                free = np.setdiff1d(np.arange(1, self.candidates + 1), s)
                per[row] = np.sort(np.concatenate([keep, self.rng.choice(free, n, replace=False)]))


def row_needed(chosen: np.ndarray, nb: int, local: int) -> np.ndarray:
    """Sink + chosen + local window of a sequence of ``nb`` blocks (unique int64)."""
    return np.unique(np.concatenate([[0], chosen, np.arange(max(0, nb - local), nb)])).astype(np.int64)


def needed_arrays(sel: Selections, nb: list[int], local: int) -> list[list[np.ndarray]]:
    """What the engine hands the plan: per layer, per row, the row's needed blocks."""
    return [[row_needed(s, n, local) for s, n in zip(per, nb, strict=True)] for per in sel.chosen]


def run_case(mod, *, batch: int, context: int, turnover: str, args) -> dict:
    L, bs = args.layers, args.block_size
    layout = mod.KVLayout(num_layers=L, num_kv_heads=1, head_dim=1, block_size=bs, dtype=torch.float16,
                          device=torch.device("cpu"))
    prompt_blocks = context // bs
    steps = args.warmup + args.steps
    max_blocks = -(-(context + steps + 1) // bs)
    candidates = prompt_blocks - 1 - args.local_blocks
    k = max(1, int(args.ratio * candidates))
    decode_blocks = max_blocks - prompt_blocks
    ws = 1 + args.local_blocks + k + decode_blocks + args.cache_blocks + 1
    pool = 1 + max_blocks + batch * ws + args.pool_slack
    kv = mod.KVManager(layout, max_batch=batch, max_blocks=max_blocks, num_device_blocks=pool, offload=True,
                       num_host_blocks=batch * max_blocks, cache_blocks=args.cache_blocks, overlap=not args.no_overlap)
    stub_copies(kv)
    rng = np.random.default_rng(args.seed)
    rids = [f"r{i}" for i in range(batch)]
    sel = Selections(rng, layers=L, batch=batch, candidates=candidates, k=k, turnover=turnover,
                     fraction=args.turnover)
    lens = {}
    for row, rid in enumerate(rids):  # prefill each request, then its first plan shrinks it to its working set
        kv.add_request(rid)
        tr = mod.StepTransfer()
        kv.plan_step([rid], [context], [[None]] * L, tr)
        kv.issue_deferred(tr)
        kv.write_back([rid], tr)
        lens[rid] = context
        one = [[row_needed(sel.chosen[layer][row], prompt_blocks, args.local_blocks)] for layer in range(L)]
        kv.plan_step([rid], [1], one, tr)
        kv.issue_deferred(tr)
        kv.write_back([rid], tr)
        lens[rid] += 1
    wall, cpu, wb_wall, counts = [], [], [], []
    needed = None
    for step in range(steps):
        nb = [-(-lens[r] // bs) for r in rids]
        if step % args.stride == 0:
            sel.retrieve()
            needed = needed_arrays(sel, nb, args.local_blocks)
        elif any(n != -(-(lens[r] - 1) // bs) for r, n in zip(rids, nb, strict=True)):
            needed = needed_arrays(sel, nb, args.local_blocks)  # a block opened: the engine extends the selection
        tr = mod.StepTransfer()
        t0, c0 = time.perf_counter(), time.thread_time()
        kv.plan_step(rids, [1] * batch, needed, tr)
        kv.issue_deferred(tr)
        t1, c1 = time.perf_counter(), time.thread_time()
        kv.write_back(rids, tr)
        t2 = time.perf_counter()
        for r in rids:
            lens[r] += 1
        if step >= args.warmup:
            wall.append(1e3 * (t1 - t0))
            cpu.append(1e3 * (c1 - c0))
            wb_wall.append(1e3 * (t2 - t1))
            counts.append((tr.blocks_loaded, tr.stale_layers, tr.sync_switches))
    n = len(wall)
    return {
        "batch": batch, "context_len": context, "turnover": turnover, "layers": L, "block_size": bs,
        "selected_blocks": k, "pool_blocks": pool, "stride": args.stride, "overlap": not args.no_overlap,
        "steps": n,
        "plan_ms_per_step": statistics.mean(wall), "plan_ms_median": statistics.median(wall),
        "plan_cpu_ms_per_step": statistics.mean(cpu),
        "plan_ms_retrieval_steps": statistics.mean(wall[(-args.warmup) % args.stride :: args.stride]),
        "write_back_ms_per_step": statistics.mean(wb_wall),
        "plan_us_per_pair": 1e3 * statistics.mean(wall) / (batch * L),
        "blocks_loaded_per_step": sum(c[0] for c in counts) / n,
        "stale_pairs_per_step": sum(c[1] for c in counts) / n,
        "sync_switches_per_step": sum(c[2] for c in counts) / n,
    }


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", nargs="+", default=["32768:1", "32768:8", "32768:56", "131072:9"],
                   help="CONTEXT:BATCH pairs")
    p.add_argument("--turnovers", nargs="+", default=list(TURNOVERS), choices=TURNOVERS)
    p.add_argument("--turnover", type=float, default=0.137, help="realistic: fraction of chosen blocks replaced")
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--block-size", type=int, default=32)
    p.add_argument("--ratio", type=float, default=0.125)
    p.add_argument("--local-blocks", type=int, default=2)
    p.add_argument("--cache-blocks", type=int, default=2)
    p.add_argument("--stride", type=int, default=4)
    p.add_argument("--pool-slack", type=int, default=0, help="extra device blocks per layer")
    p.add_argument("--no-overlap", action="store_true")
    p.add_argument("--warmup", type=int, default=8)
    p.add_argument("--steps", type=int, default=24)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--kv-module", type=Path, default=None, help="plan with this copy of kv.py instead of the package's")
    p.add_argument("--label", default="after", help="label of the --kv-module (or package) rows")
    p.add_argument("--before", type=Path, default=None, help="also plan with this copy of kv.py, rows labelled 'before'")
    p.add_argument("--repeat", type=int, default=3, help="runs per case and module (alternating); the fastest is kept")
    p.add_argument("--box", default=None, help="machine name for the JSON (default: host, CPU count)")
    p.add_argument("--out", type=Path, default=None, help="JSON file: rows are merged (same label+case replaced)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(1)
    mods = [(args.label, load_kv_module(args.kv_module))]
    if args.before is not None:
        mods.insert(0, ("before", load_kv_module(args.before)))
    box = args.box or f"{platform.node()} ({os.cpu_count()} CPU cores, {platform.processor() or platform.machine()})"
    rows = []
    for case in args.cases:
        context, batch = (int(x) for x in case.split(":"))
        for turnover in args.turnovers:
            runs: dict[str, list[dict]] = {label: [] for label, _ in mods}
            for _ in range(args.repeat):
                for label, mod in mods:
                    runs[label].append(run_case(mod, batch=batch, context=context, turnover=turnover, args=args))
            for label, _ in mods:
                best = min(runs[label], key=lambda r: r["plan_ms_per_step"])
                row = {"label": label, **best, "repeats_ms": [r["plan_ms_per_step"] for r in runs[label]],
                       "repeats_cpu_ms": [r["plan_cpu_ms_per_step"] for r in runs[label]]}
                rows.append(row)
                print(f"{label:7s} ctx {context:6d} batch {batch:3d} {turnover:9s} plan {row['plan_ms_per_step']:8.2f} "
                      f"ms/step (cpu {row['plan_cpu_ms_per_step']:.2f}, retrieval steps "
                      f"{row['plan_ms_retrieval_steps']:.2f}, {row['plan_us_per_pair']:.1f} us/pair; repeats "
                      f"{', '.join(f'{x:.1f}' for x in row['repeats_ms'])}), write-back "
                      f"{row['write_back_ms_per_step']:.2f} ms, loaded {row['blocks_loaded_per_step']:.0f}/step, "
                      f"stale {row['stale_pairs_per_step']:.0f}, sync {row['sync_switches_per_step']:.0f}", flush=True)
    if args.out is not None:
        doc = json.loads(args.out.read_text()) if args.out.exists() else {"rows": []}
        keys = {(r["label"], r["context_len"], r["batch"], r["turnover"]) for r in rows}
        doc["rows"] = [r for r in doc["rows"] if (r["label"], r["context_len"], r["batch"], r["turnover"]) not in keys]
        doc["rows"] += rows
        doc.update(box=box, benchmark="bench_plan.py", note=(
            "host time of KVManager.plan_step + issue_deferred per decode step, copies stubbed (bookkeeping only); "
            "wall and thread CPU ms, fastest of the repeats (before/after alternating in one process); a shared box, "
            "so times carry other jobs' load"))
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(doc, indent=1) + "\n")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
