"""Main-thread CPU time of the engine's plan per decode step, as a distribution, for A/B runs of two
checkouts on a noisy shared CPU (issue 13: the offload step is host-bound on the GPU box).

``bench_step_host.py`` reports the plan's mean CPU time by step kind; on this 2-core VM the mean moves
~40 % between runs. This wraps the same run (``bench_step_host.main`` with the arguments given, its
own output silenced) and records the thread CPU time of every ``Engine._make_plan`` call after the
first ``--skip`` (warm-up) calls, then prints one line: median, quartile, minimum and mean in ms.
Run it in each checkout, alternating, several times, and compare medians::

    for i in 1 2 3; do for wt in /path/before /path/after; do
      (cd $wt && PYTHONPATH=python:. python /path/after/benchmarks/plan_cpu_ab.py --json /tmp/ab.jsonl \\
         --algorithms esa --turnovers realistic --layers 32 --pool-blocks 4352 --batches 6 --context 131072 \\
         --decode-steps 48 --retrieval-threads 1 --stagger --profile-top 0 --out /tmp/x.json)
    done; done

Run it from the root of the checkout under test: it loads that checkout's ``benchmarks/bench_step_host.py``
(which puts that checkout's ``python/`` first on the path). The library is not changed for it: the
engine's bound method is wrapped on the instance that ``bench_capacity.make_engine`` returns.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys
import time
from pathlib import Path

import numpy as np


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], add_help=True)
    p.add_argument("--skip", type=int, default=12, help="plans not counted (warm-up), default 12")
    p.add_argument("--json", type=Path, default=None, help="append one JSON line with the times here")
    p.add_argument("--parts", action="store_true",
                   help="also the CPU time per plan of its parts (the engine's, the KV manager's and the policy's "
                        "steps of a decode plan, each timed where it is called inside a counted plan)")
    args, rest = p.parse_known_args(argv)
    if args.skip < 0:
        p.error(f"--skip must be >= 0, got {args.skip}")
    # the checkout under test is the working folder: its benchmarks and (through them) its library
    here = Path.cwd() / "benchmarks"
    if not (here / "bench_step_host.py").is_file():
        p.error(f"run it from a checkout's root: {here / 'bench_step_host.py'} does not exist")
    sys.path.insert(0, str(here))
    import bench_step_host as bsh

    bc = bsh.bc  # the capacity module bench_step_host loaded (and its engines come from)
    times: list[float] = []
    make = bc.make_engine

    def make_engine(*a, **k):
        engine = make(*a, **k)
        plan = engine._make_plan

        def timed(views):
            t0 = time.thread_time()
            try:
                return plan(views)
            finally:
                times.append(time.thread_time() - t0)

        engine._make_plan = timed
        return engine

    bc.make_engine = make_engine
    parts: dict[str, float] = {}
    if args.parts:
        _time_parts(times, args.skip, parts)
    with contextlib.redirect_stdout(io.StringIO()):
        rc = bsh.main(rest)
    t = np.asarray(times[args.skip :]) * 1e3
    if rc or not t.size:
        print(f"bench_step_host returned {rc} with {t.size} plans counted", file=sys.stderr)
        return rc or 1
    row = {"checkout": os.getcwd(), "argv": rest, "n": int(t.size), "median_ms": float(np.median(t)),
           "p25_ms": float(np.percentile(t, 25)), "min_ms": float(t.min()), "mean_ms": float(t.mean())}
    print(f"{row['checkout']:24s} plan CPU ms: n={row['n']} median {row['median_ms']:.2f} p25 {row['p25_ms']:.2f} "
          f"min {row['min_ms']:.2f} mean {row['mean_ms']:.2f}")
    if parts:
        row["parts_ms_per_plan"] = {k: 1e3 * v / t.size for k, v in parts.items()}
        print("  parts, ms per plan: " + ", ".join(f"{k} {v:.2f}" for k, v in row["parts_ms_per_plan"].items()))
    if args.json is not None:
        with args.json.open("a") as f:
            f.write(json.dumps(row) + "\n")
    return 0


#: the steps of a decode plan timed by --parts: (class path, method); nested ones count inside their caller too
PARTS = (("ucm_trt.runtime.engine.Engine", "_block_arrays"), ("ucm_trt.runtime.engine.Engine", "_write_selections"),
         ("ucm_trt.runtime.engine.Engine", "_write_mirror"), ("ucm_trt.runtime.engine.Engine", "_check_selections"),
         ("ucm_trt.runtime.engine.Engine", "_write_slots"), ("ucm_trt.runtime.kv.KVManager", "plan_step"),
         ("ucm_trt.runtime.kv.KVManager", "_plan_batched"), ("ucm_trt.runtime.kv.KVManager", "_note_standing"),
         ("ucm_trt.runtime.kv.KVManager", "_write_tables"),
         ("ucm_trt.sparse.policies._offload.OffloadPolicy", "plan"))


def _time_parts(plans: list[float], skip: int, out: dict[str, float]) -> None:
    """Wrap the classes' methods in ``PARTS`` (this process only) so that their thread CPU time adds up in
    ``out`` while a counted ``Engine._make_plan`` runs (the plans after ``skip``; ``plans`` is the list the
    plan timer appends to). The engine's ``_make_plan`` is wrapped on the instance, so a part runs inside
    a counted plan when ``len(plans) >= skip`` and the plan has started (``inside``)."""
    import importlib

    from ucm_trt.runtime.engine import Engine

    inside = [False]
    make_plan = Engine._make_plan

    def plan_wrapper(self, views):
        inside[0] = len(plans) >= skip
        try:
            return make_plan(self, views)
        finally:
            inside[0] = False

    Engine._make_plan = plan_wrapper
    for path, name in PARTS:
        mod, cls_name = path.rsplit(".", 1)
        cls = getattr(importlib.import_module(mod), cls_name)
        raw = cls.__dict__[name]
        static = isinstance(raw, staticmethod)
        fn = raw.__func__ if static else raw

        def timed(*a, _fn=fn, _key=f"{cls_name}.{name}", **k):
            if not inside[0]:
                return _fn(*a, **k)
            t0 = time.thread_time()
            try:
                return _fn(*a, **k)
            finally:
                out[_key] = out.get(_key, 0.0) + time.thread_time() - t0

        setattr(cls, name, staticmethod(timed) if static else timed)


if __name__ == "__main__":
    raise SystemExit(main())
