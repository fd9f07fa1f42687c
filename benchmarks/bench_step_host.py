"""Host cost of one decode step at large batch (issue 13), on the CPU, split by component.

What runs: the capacity bench's engine (``bench_capacity.make_engine``: ``FilledPrefillBackend``
prompts, the real ``Engine`` decode step, the policies' real retrieval schedule and worker) with a
model of the Llama-3.2-1B *layer and head structure* (16 layers, 32 q / 8 KV heads) but tiny
dimensions (head_dim 2, hidden 64, MLP 128, vocab 1024), so the model's and the attention's
arithmetic is negligible and what a step costs is the host work around it: the engine's plan, the
forward's Python, the policy's ``after_step`` and retrieval hand-off, the write-back bookkeeping.
The block geometry is the capacity bench's 32K case (block 64, 511 prompt blocks + 1 decode
block, ratio 1/8, stride 4, 2 cache blocks) and the device pool is the H100 run's (4352 blocks per
layer: the 8.5 GiB budget of ``capacity_NVIDIA-H100-80GB-HBM3_2026-12-06.json``), so ESA's
working sets at batch 56 press on it as they do there. Turnover ``realistic`` / ``random`` as
``bench_capacity`` drives it (QueryDrift calibrated to the SmolLM2 measurement, or the model's
own queries).

Per step (the measured steps after the warm-up; wall ms, main thread), by wrapping the engine's
and the policy's methods with timers (the library is not changed for it):

The engine runs with ``RuntimeConfig.plan_ahead=False`` (the serial order), so each host part is timed
on its own; with it on (the default) the GPU runs the forward while the host makes the next plan.

* ``plan``: everything before the forward is launched (``StepRecord.plan_seconds``: policy plan,
  block arrays, ``KVManager.plan_step``, selection / slot uploads);
* ``forward``: the backend forward (Python + the tiny ops). The paged attention is replaced by a
  stand-in of one op per layer (``--attention torch`` keeps the CPU attention, which reads every
  token of the sequence and would swamp the rest at 32K); on the GPU the whole forward is a CUDA
  graph replay, so this part of the CPU figure is not host cost there;
* ``retrieval``: inside ``after_step``, the time in the policy's retrieval submit / collect
  methods (query copies, task creation, waiting for the worker, installing the result);
  ``retrieval_wait`` (part of it) is the time the step blocked on unfinished tasks;
* ``after_step``: the rest of the policy's ``after_step`` (its per-request loop, representations);
* the block copies (host store <-> pool) keep their bookkeeping (copy generations, as
  ``bench_plan.py``) but move no data (``--real-copies`` moves them): on CUDA they are asynchronous
  launches on the side stream, and a CPU memcpy would measure this box's memory bus;
* ``other``: the step's remainder (write-back and deferred-load bookkeeping, the token copy,
  sampling, emitting, metrics).

The plan's own main-thread CPU time is ``plan_cpu_ms`` (wall time on this shared box carries other
jobs' load), and ``plan_by_step_kind`` splits the plan by step: ``retrieval`` (new selections from the
policy), ``switch`` (the step after, where the overlapped schedule's stale pairs switch to them) and
``between`` (the selections stand: the plan should be nearly free there). ``--layers 32`` gives the
8B shape's layer count (same heads).

The retrieval tasks themselves run on the worker threads (``--retrieval-threads``, 2 = this
box's cores); their CPU time is reported as ``retrieval_task_ms`` (worker busy time per step).
A cProfile of the main thread over the measured steps gives the top functions by cumulative time.

Example::

    python benchmarks/bench_step_host.py --out benchmarks/results/cpu/step_host_2core-epyc_<date>.json --label before
"""

from __future__ import annotations

import argparse
import cProfile
import dataclasses
import gc
import importlib.util
import io
import json
import os
import platform
import pstats
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

_HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(_HERE.parent / "python"))


def _load_capacity():
    spec = importlib.util.spec_from_file_location("bench_capacity", _HERE / "bench_capacity.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["bench_capacity"] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


bc = _load_capacity()
sys.path.insert(0, str(_HERE))
from bench_plan import stub_copies  # noqa: E402

from ucm_trt.runtime import SamplingParams  # noqa: E402
from ucm_trt.runtime.step import AttentionImpl  # noqa: E402

#: the 1B shape's layers and heads, tiny dimensions (the arithmetic is negligible)
HOST_SHAPE = bc.ModelSpec(name="host-1b-structure", layers=16, hidden=64, intermediate=128, q_heads=32, kv_heads=8,
                          head_dim=2, vocab=1024, tied_embeddings=True, rope_theta=500000.0)


def host_shape(layers: int) -> bc.ModelSpec:
    """``HOST_SHAPE`` with ``layers`` layers (``--layers 32``: the 8B shape's layer count; it has the
    1B's 32 q / 8 KV heads too, so only the layer count differs in the host work)."""
    if layers == HOST_SHAPE.layers:
        return HOST_SHAPE
    return dataclasses.replace(HOST_SHAPE, name=f"host-{layers}-layer-structure", layers=layers)
ALGORITHMS = ("esa", "gsa", "kvstar")
TURNOVERS = ("realistic", "random")
COMPONENTS = ("plan", "forward", "retrieval", "after_step", "other")
#: the H100 capacity run's device pool (8.5 GiB budget of the 1B shape at block 64), blocks per layer
H100_POOL_BLOCKS = 4352
#: engine / policy methods whose time is recorded (those that exist in the code under test)
ENGINE_TIMED = ("_decode_forward",)
POLICY_TIMED = ("after_step",)
RETRIEVAL_TIMED = ("_submit", "_collect", "_submit_batch", "_collect_batch")


class Timers:
    """Accumulates wall seconds per name while ``on``; nested calls of one name count once."""

    def __init__(self) -> None:
        self.on = False
        self.total: dict[str, float] = defaultdict(float)
        self.cpu: dict[str, float] = defaultdict(float)  # the main thread's CPU seconds
        self.depth: dict[str, int] = defaultdict(int)

    def wrap(self, obj, name: str, key: str | None = None) -> None:
        fn = getattr(obj, name, None)
        if fn is None:
            return
        key = key or name

        def timed(*a, **kw):
            if not self.on or self.depth[key]:
                return fn(*a, **kw)
            self.depth[key] += 1
            t0, c0 = time.perf_counter(), time.thread_time()
            try:
                return fn(*a, **kw)
            finally:
                self.total[key] += time.perf_counter() - t0
                self.cpu[key] += time.thread_time() - c0
                self.depth[key] -= 1

        setattr(obj, name, timed)


class PlanProbe:
    """Per decode step: the main thread's CPU seconds of the plan (from ``Engine._decode``'s entry to
    ``KVManager.mark_forward_start``, which the step calls right after its plan) and the step's kind:
    ``retrieval`` (the policy handed out a selection object it did not hand out at the last step),
    ``switch`` (the step after one: on the overlapped schedule the pairs that attended their old
    selection while the new blocks loaded switch now) or ``between`` (neither: the selections stand)."""

    def __init__(self, engine) -> None:
        self.cpu: list[float] = []
        self.kinds: list[str] = []
        self._t0: float | None = None
        self._last_ids: set[int] = set()
        self._new = False
        self._prev_new = False
        decode, mark, plan = engine._decode, engine.kv.mark_forward_start, engine.policy.plan

        def timed_decode(*a, **kw):
            self._t0 = time.thread_time()
            return decode(*a, **kw)

        def timed_mark(*a, **kw):
            if self._t0 is not None:
                self.cpu.append(time.thread_time() - self._t0)
                self.kinds.append("retrieval" if self._new else "switch" if self._prev_new else "between")
                self._t0 = None
            return mark(*a, **kw)

        def watched_plan(reqs):
            sels = plan(reqs)
            ids = {id(x) for per_row in sels for x in per_row if x is not None}
            self._prev_new, self._new = self._new, bool(ids - self._last_ids)
            self._last_ids = ids
            return sels

        engine._decode, engine.kv.mark_forward_start, engine.policy.plan = timed_decode, timed_mark, watched_plan


def _attention_stand_in(q, pool, table, seq_lens, selection, *, scale, **_):
    """One op per layer in place of the paged attention (on the GPU it is one kernel launch, or part
    of a graph replay): the CPU attention reads every token of the sequence (it masks the
    unselected blocks), which at 32K would swamp the host work this benchmark measures."""
    return q.float().clone()


def stand_in_attention() -> AttentionImpl:
    return AttentionImpl("stand-in", _attention_stand_in, _attention_stand_in, validate=None)


def make_plan(context: int, batch: int, block_size: int, ratio: float, stride: int, cache_blocks: int,
              dtype_bytes: int, pool_blocks: int, spec: bc.ModelSpec = HOST_SHAPE):
    bb = bc.block_bytes(spec, block_size, dtype_bytes)
    budget = pool_blocks * spec.layers * bb / bc.GIB
    host = spec.layers * batch * (context // block_size) * bb / bc.GIB
    sparse = bc.Settings(block_size=block_size, ratio=ratio, stride=stride).sparse_for("esa")
    return bc.plan_capacity(spec, sequence_len=context, decode_steps=min(32, block_size - 1), kv_budget_gib=budget,
                            host_gib=host * 1.0001, sparse=sparse, cache_blocks=cache_blocks, dtype_bytes=dtype_bytes)


def _profile_top(prof: cProfile.Profile, n: int, *restrict: str) -> list[str]:
    """The ``n`` functions with the most cumulative time (optionally only paths matching ``restrict``)."""
    s = io.StringIO()
    pstats.Stats(prof, stream=s).sort_stats("cumulative").print_stats(*restrict, n)
    lines = [ln.rstrip() for ln in s.getvalue().splitlines()]
    start = next((i for i, ln in enumerate(lines) if ln.lstrip().startswith("ncalls")), 0)
    return [ln.replace(str(_HERE.parent) + "/", "") for ln in lines[start:] if ln.strip()]


def run_case(model, alg: str, turnover: str, batch: int, args, drift) -> dict:
    settings = bc.Settings(block_size=args.block_size, ratio=args.ratio, stride=args.stride,
                           cache_blocks=args.cache_blocks, decode_steps=args.decode_steps,
                           warmup_steps=args.warmup_steps, fill_chunk=args.fill_chunk,
                           retrieval_threads=args.retrieval_threads, stagger=args.stagger, cuda_graph=False,
                           batch1=False,
                           # the serial order: its host parts are the ones timed here (on the CPU the forward
                           # is synchronous, so the next step's plan could not overlap it anyway)
                           runtime_options=(("plan_ahead", False),))
    shape = host_shape(args.layers)
    plan = make_plan(args.context, batch, args.block_size, args.ratio, args.stride, args.cache_blocks, 4,
                     args.pool_blocks, shape)
    engine = bc.make_engine(model, alg, plan, settings, max_batch=batch, drift=drift, seed=0)
    if args.attention == "stand-in":
        engine.backend.attention = stand_in_attention()
    if not args.real_copies:
        stub_copies(engine.kv)
    timers = Timers()
    probe = PlanProbe(engine)
    for name in ENGINE_TIMED:
        timers.wrap(engine, name)
    for name in POLICY_TIMED:
        timers.wrap(engine.policy, name)
    for name in RETRIEVAL_TIMED:
        timers.wrap(engine.policy, name, "retrieval")
    g = torch.Generator().manual_seed(0)
    params = SamplingParams(max_new_tokens=args.decode_steps + 1)
    t_fill = time.perf_counter()
    for _ in range(batch):
        engine.add_request(torch.randint(0, shape.vocab, (plan.context_len,), generator=g), params)
    prof = cProfile.Profile()
    decoded = 0
    first = None
    w0 = None
    cpu0 = 0.0
    prefill_s = 0.0
    try:
        while engine.has_work:
            seen = len(engine.metrics.steps)
            if decoded == args.warmup_steps and not timers.on:
                timers.on = True
                first = seen
                p0 = len(probe.cpu)
                w0 = engine.worker.stats()
                cpu0 = time.thread_time()
                if args.profile_top:
                    prof.enable()
            engine.step()
            new = engine.metrics.steps[seen:]
            if any(r.kind == "decode" for r in new):
                decoded += 1
                if decoded == 1:
                    prefill_s = time.perf_counter() - t_fill
                if decoded == args.decode_steps:
                    prof.disable()
                    cpu1 = time.thread_time()
                    timers.on = False
                    w1 = engine.worker.stats()
                    last = len(engine.metrics.steps)
                    p1 = len(probe.cpu)
    finally:
        prof.disable()
        stats = engine.stats()
        engine.close()
    recs = [r for r in engine.metrics.steps[first:last] if r.kind == "decode"]
    n = len(recs)
    if n != args.decode_steps - args.warmup_steps or any(r.rows != batch for r in recs):
        raise RuntimeError(f"measured {n} decode steps of rows {sorted({r.rows for r in recs})}, expected "
                           f"{args.decode_steps - args.warmup_steps} of {batch}")
    ms = {k: 1e3 * v / n for k, v in timers.total.items()}
    step = 1e3 * sum(r.seconds for r in recs) / n
    plan_ms = 1e3 * sum(r.plan_seconds for r in recs) / n
    fwd = ms.get("_decode_forward", 0.0)
    retr = ms.get("retrieval", 0.0)
    after = ms.get("after_step", 0.0) - retr
    parts = {"plan": plan_ms, "forward": fwd, "retrieval": retr, "after_step": after}
    parts["other"] = step - sum(parts.values())
    # the main thread's CPU time per component (this box is shared: wall time carries other jobs' load);
    # the plan's CPU time is the decode step's minus everything timed after the plan
    cms = {k: 1e3 * v / n for k, v in timers.cpu.items()}
    cpu_parts = {"forward": cms.get("_decode_forward", 0.0), "retrieval": cms.get("retrieval", 0.0),
                 "after_step": cms.get("after_step", 0.0) - cms.get("retrieval", 0.0)}
    cpu_step = 1e3 * (cpu1 - cpu0) / n
    for k, v in cpu_parts.items():
        parts[f"{k}_cpu"] = v
    parts["plan_and_other_cpu"] = cpu_step - sum(cpu_parts.values())
    wait = w1["retrieval_wait_ms"] - w0["retrieval_wait_ms"]
    busy = w1["retrieval_busy_ms"] - w0["retrieval_busy_ms"]
    tasks = w1["retrieval_tasks"] - w0["retrieval_tasks"]
    top = _profile_top(prof, args.profile_top) if args.profile_top else []
    top_ucm = _profile_top(prof, args.profile_top, "ucm_trt/") if args.profile_top else []
    pol = stats["policy"]
    if p1 - p0 != n:
        raise RuntimeError(f"the plan probe saw {p1 - p0} decode plans in {n} measured steps")
    by_kind = {}
    for kind in ("retrieval", "switch", "between"):
        idx = [i for i in range(n) if probe.kinds[p0 + i] == kind]
        by_kind[kind] = {"steps": len(idx),
                         "plan_ms": 1e3 * sum(recs[i].plan_seconds for i in idx) / len(idx) if idx else None,
                         "plan_cpu_ms": 1e3 * sum(probe.cpu[p0 + i] for i in idx) / len(idx) if idx else None}
    return {
        "label": args.label, "algorithm": alg, "turnover": turnover, "batch": batch, "context_len": plan.context_len,
        "sequence_len": plan.sequence_len, "layers": shape.layers, "kv_heads": shape.kv_heads,
        "head_dim": shape.head_dim, "attention": args.attention, "real_copies": args.real_copies, "block_size": args.block_size, "pool_blocks": plan.pool_blocks[alg],
        "measured_steps": n, "step_ms": step, "step_ms_median": 1e3 * statistics.median(r.seconds for r in recs),
        **{f"{k}_ms": v for k, v in parts.items()},
        "main_thread_cpu_ms": cpu_step, "plan_cpu_ms": 1e3 * sum(probe.cpu[p0:p1]) / n, "plan_by_step_kind": by_kind,
        "retrieval_wait_ms": wait / n, "retrieval_tasks_per_step": tasks / n, "retrieval_task_ms": busy / n,
        "stale_layers_per_step": sum(r.stale_layers for r in recs) / n,
        "sync_switches_per_step": sum(r.sync_switches for r in recs) / n,
        "blocks_loaded_per_step": sum(r.blocks_loaded for r in recs) / n,
        "topk_turnover": pol.get("topk_turnover"), "prefill_seconds": prefill_s,
        "profiled": bool(args.profile_top), "profile_top_cumtime": top, "profile_top_cumtime_ucm_trt": top_ucm,
    }


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--algorithms", nargs="+", default=list(ALGORITHMS), choices=ALGORITHMS)
    p.add_argument("--turnovers", nargs="+", default=list(TURNOVERS), choices=TURNOVERS)
    p.add_argument("--batches", type=int, nargs="+", default=[8, 32, 56])
    p.add_argument("--layers", type=int, default=HOST_SHAPE.layers,
                   help="model layers (16: the 1B shape's; 32: the 8B shape's, same heads)")
    p.add_argument("--context", type=int, default=32768, help="tokens per sequence at the end (bench_capacity's)")
    p.add_argument("--block-size", type=int, default=64)
    p.add_argument("--ratio", type=float, default=0.125)
    p.add_argument("--stride", type=int, default=4)
    p.add_argument("--cache-blocks", type=int, default=2)
    p.add_argument("--pool-blocks", type=int, default=H100_POOL_BLOCKS, help="device blocks per layer")
    p.add_argument("--decode-steps", type=int, default=32)
    p.add_argument("--warmup-steps", type=int, default=8)
    p.add_argument("--fill-chunk", type=int, default=16384)
    p.add_argument("--retrieval-threads", type=int, default=2)
    p.add_argument("--stagger", action="store_true",
                   help="RetrievalConfig.stagger: each request's retrieval schedule shifted to the least-used phase")
    p.add_argument("--realistic-turnover", type=float, default=None,
                   help="default: the SmolLM2 measurement bench_capacity reads")
    p.add_argument("--attention", default="stand-in", choices=("stand-in", "torch"),
                   help="stand-in: one op per layer instead of the CPU paged attention (which reads the whole "
                        "sequence); torch: the runtime's CPU attention")
    p.add_argument("--real-copies", action="store_true",
                   help="move the blocks (a CPU memcpy) instead of keeping only the copies' bookkeeping")
    p.add_argument("--profile-top", type=int, default=15,
                   help="cProfile's top functions per case (0: no profiler; it slows the Python it watches ~2x)")
    p.add_argument("--label", default="after")
    p.add_argument("--box", default=None)
    p.add_argument("--out", type=Path, default=None, help="JSON: rows merged (same label + case replaced)")
    p.add_argument("--table", type=Path, default=None, help="print the before -> after Markdown table of this JSON")
    return p.parse_args(argv)


def _case_key(r: dict) -> tuple:
    return r["label"], r["algorithm"], r["batch"], r["turnover"], r.get("layers", 16), r["context_len"]


def save(path: Path, rows: list[dict], args) -> None:
    """Merge ``rows`` into the JSON at ``path`` (same label + case replaced); called after every case."""
    doc = json.loads(path.read_text()) if path.exists() else {"rows": []}
    keys = {_case_key(r) for r in rows}
    doc["rows"] = [r for r in doc["rows"] if _case_key(r) not in keys]
    doc["rows"] += rows
    box = args.box or f"{platform.node()} ({os.cpu_count()} CPU cores, {platform.processor() or platform.machine()})"
    shapes = sorted({host_shape(r.get("layers", HOST_SHAPE.layers)).describe() for r in doc["rows"]})
    doc.update(box=box, benchmark="bench_step_host.py", shape="; ".join(shapes), note=(
        "host cost of one decode step (wall ms per measured step, main thread), split by wrapping the engine's "
        "and policy's methods with timers; tiny dimensions so the arithmetic is negligible; a shared 2-core box"))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=1) + "\n")


def markdown_table(doc: dict, labels: tuple[str, str] = ("before", "after")) -> str:
    """Per case, ``labels[0]`` -> ``labels[1]``: wall ms per step and component, main-thread CPU ms."""
    rows = {_case_key(r): r for r in doc["rows"]}
    cases = sorted({k[1:] for k in rows}, key=lambda c: (c[3], c[4], ALGORITHMS.index(c[0]), c[1],
                                                         TURNOVERS.index(c[2])))
    head = ["layers", "context", "algorithm", "batch", "turnover", "step", *COMPONENTS, "main-thread CPU",
            "of it plan + other", "retrieval tasks/step"]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def cell(a, b, key, spec=".1f"):
        va = "-" if a is None else format(a[key], spec)
        vb = "-" if b is None else format(b[key], spec)
        return f"{va} -> {vb}"

    for c in cases:
        a, b = rows.get((labels[0], *c)), rows.get((labels[1], *c))
        cells = [str(c[3]), str(c[4]), c[0], str(c[1]), c[2], cell(a, b, "step_ms"),
                 *(cell(a, b, f"{k}_ms") for k in COMPONENTS),
                 cell(a, b, "main_thread_cpu_ms"), cell(a, b, "plan_and_other_cpu_ms"),
                 cell(a, b, "retrieval_tasks_per_step", ".1f")]
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.table is not None:
        print(markdown_table(json.loads(args.table.read_text())))
        return 0
    torch.set_num_threads(1)
    shape = host_shape(args.layers)
    model = bc.build_model(shape, dtype=torch.float32, device="cpu", max_positions=args.context)
    drift = None
    if "realistic" in args.turnovers:
        sparse = bc.Settings(block_size=args.block_size, ratio=args.ratio, stride=args.stride).sparse_for("esa")
        target = ((args.realistic_turnover, "--realistic-turnover") if args.realistic_turnover is not None else
                  bc.measured_turnover(_HERE / "results" / "runtime", block_size=args.block_size, ratio=args.ratio,
                                       stride=args.stride))
        plan = make_plan(args.context, max(args.batches), args.block_size, args.ratio, args.stride,
                         args.cache_blocks, 4, args.pool_blocks, shape)
        drift = bc.calibrate_turnover(plan, shape, sparse, target[0], target[1], seed=0)
        print(f"realistic turnover {target[0]:.3f} ({target[1]}): persistence {drift.persistence:.4f}", flush=True)
    rows = []
    for batch in args.batches:
        for alg in args.algorithms:
            for turnover in args.turnovers:
                row = run_case(model, alg, turnover, batch, args, drift if turnover == "realistic" else None)
                gc.collect()  # the timer wrappers make the engine a reference cycle: free its host store now
                rows.append(row)
                print(f"{args.label:7s} {alg:6s} b{batch:<3d} {turnover:9s} step {row['step_ms']:7.1f} ms = "
                      + " + ".join(f"{k} {row[k + '_ms']:.1f}" for k in COMPONENTS)
                      + " | CPU " + " + ".join(f"{k} {row[k + '_cpu_ms']:.1f}" for k in
                                               ("plan_and_other", "forward", "retrieval", "after_step"))
                      + f" (retrieval wait {row['retrieval_wait_ms']:.1f}, tasks {row['retrieval_tasks_per_step']:.1f}"
                      f"/step, worker {row['retrieval_task_ms']:.1f} ms/step; main CPU {row['main_thread_cpu_ms']:.1f};"
                      f" plan CPU {row['plan_cpu_ms']:.1f} = "
                      + ", ".join(f"{k} {v['plan_cpu_ms'] or 0:.1f} x{v['steps']}" for k, v in row["plan_by_step_kind"].items())
                      + f"; stale {row['stale_layers_per_step']:.0f}, sync {row['sync_switches_per_step']:.0f}, "
                      f"turnover {row['topk_turnover'] or 0:.3f})", flush=True)
                if batch == max(args.batches) and args.profile_top:
                    print("\n".join(row["profile_top_cumtime_ucm_trt"][: args.profile_top + 1]), flush=True)
                if args.out is not None:
                    save(args.out, [row], args)
    if args.out is not None:
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
