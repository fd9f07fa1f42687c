"""Where a decode step's GPU time goes: the capacity bench's engine under ``torch.profiler`` (issue 13).

``bench_capacity.py`` measures tokens/s and splits the step's *host* time (plan, sync, after_step); this
script answers the question it cannot: which kernels fill the GPU part. For each algorithm it builds
the capacity bench's engine (same model shape, device budget, host store and settings:
``bench_capacity.make_engine``), prefills ``--batch`` sequences of the plan's context, runs
``--warmup-steps`` decode steps (loads, compilation, CUDA-graph capture), then profiles
``--steps`` decode steps with CPU and CUDA activity and reports, per algorithm:

* the step's wall time (mean of the profiled steps, as the engine records it) and the GPU kernel
  time per step (sum of the CUDA kernels' device time over the profiled steps / steps; kernels of
  the side streams, loads and retrieval included, so it can exceed the wall time when they overlap);
* the top ``--top`` kernels by device time: name, launches per step, us per step, share.

Random turnover (the model's own queries) unless ``--realistic``: this is about the kernels of a
step, not the number of loads. A CUDA-graph replay shows its kernels one by one (CUPTI sees them).

    python benchmarks/profile_decode.py --context 131072 --batch 1 --algorithms dense gsa-on-device
    python benchmarks/profile_decode.py --context 131072 --batch 6 --algorithms kvstar-gpu-reps --out out/
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_capacity as bc  # noqa: E402

from ucm_trt.runtime import SamplingParams  # noqa: E402


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="llama8b", choices=sorted(bc.SHAPES))
    p.add_argument("--context", type=int, default=131072, help="tokens per sequence (bench_capacity's --contexts)")
    p.add_argument("--algorithms", nargs="+", default=["dense", "gsa-on-device"], choices=bc.ALGORITHMS)
    p.add_argument("--batch", type=int, default=1, help="rows per step (0: the plan's largest batch per algorithm)")
    p.add_argument("--steps", type=int, default=8, help="profiled decode steps")
    p.add_argument("--warmup-steps", type=int, default=8)
    p.add_argument("--top", type=int, default=12)
    p.add_argument("--host-gib", type=float, default=108.0)
    p.add_argument("--kv-budget-gib", type=float, default=None, help="default: bench_capacity's (dense batch 2)")
    p.add_argument("--realistic", action="store_true", help="drive the queries with the realistic-turnover model")
    p.add_argument("--out", type=Path, default=None, help="folder for profile_<card>_<date>.json")
    args = p.parse_args(argv)
    for name in ("steps", "warmup_steps", "top"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.batch < 0:
        p.error(f"--batch must be >= 0 (0: the plan's largest), got {args.batch}")
    return args


def kernel_table(prof, steps: int) -> tuple[float, list[dict]]:
    """(GPU kernel us per step, rows by device time) from a finished profiler's events."""
    per: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
    for ev in prof.events():
        dev = getattr(ev, "device_type", None)
        if dev is None or "CUDA" not in str(dev):
            continue
        us = float(getattr(ev, "device_time", None) or getattr(ev, "cuda_time", 0.0) or 0.0)
        per[ev.name][0] += 1
        per[ev.name][1] += us
    total = sum(v[1] for v in per.values())
    rows = [{"kernel": name[:120], "launches_per_step": n / steps, "us_per_step": us / steps,
             "share": us / total if total else 0.0}
            for name, (n, us) in sorted(per.items(), key=lambda kv: -kv[1][1])]
    return total / steps, rows


def profile_one(model, name: str, plan, settings, *, batch: int, drift, args) -> dict:
    """``drift``: the realistic-turnover query model (``--realistic``), used by the offload algorithms only."""
    engine = bc.make_engine(model, name, plan, settings, max_batch=batch,
                            drift=drift if name in bc.OFFLOAD_ALGORITHMS else None)
    g = torch.Generator().manual_seed(0)
    total_steps = args.warmup_steps + args.steps
    params = SamplingParams(max_new_tokens=total_steps + 2)
    try:
        for _ in range(batch):
            engine.add_request(torch.randint(0, model.config.vocab_size, (plan.context_len,), generator=g), params)
        decoded = 0
        while decoded < args.warmup_steps:  # prefill chunks, then the warm-up decode steps
            seen = len(engine.metrics.steps)
            engine.step()
            decoded += any(r.kind == "decode" for r in engine.metrics.steps[seen:])
        torch.cuda.synchronize()
        first = len(engine.metrics.steps)
        acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
        t0 = time.perf_counter()
        with torch.profiler.profile(activities=acts) as prof:
            for _ in range(args.steps):
                engine.step()
            torch.cuda.synchronize()
        wall = time.perf_counter() - t0
        recs = [r for r in engine.metrics.steps[first:] if r.kind == "decode"]
        if len(recs) != args.steps or any(r.rows != batch for r in recs):
            raise RuntimeError(f"{name}: expected {args.steps} decode steps of {batch} rows, got "
                               f"{[(r.kind, r.rows) for r in engine.metrics.steps[first:]]}")
    finally:
        engine.abort_all()
        engine.close()
    gpu_us, rows = kernel_table(prof, args.steps)
    return {"algorithm": name, "batch": batch, "context_len": plan.context_len, "steps": args.steps,
            "step_ms_mean": 1e3 * sum(r.seconds for r in recs) / len(recs),
            "plan_ms_per_step": 1e3 * sum(r.plan_seconds for r in recs) / len(recs),
            # the next step's plan, made during this step's forward (RuntimeConfig.plan_ahead)
            "plan_ahead_ms_per_step": 1e3 * sum(r.plan_ahead_seconds for r in recs) / len(recs),
            "profiled_wall_ms_per_step": 1e3 * wall / args.steps,  # with the profiler's own overhead
            "gpu_kernel_ms_per_step": gpu_us / 1e3, "kernels": rows[: args.top],
            "kernels_not_shown_us_per_step": sum(r["us_per_step"] for r in rows[args.top:])}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("profile_decode.py needs a CUDA device (it profiles GPU kernels)", file=sys.stderr)
        return 2
    dtype = torch.bfloat16
    spec = bc.SHAPES[args.shape]
    settings = bc.Settings(warmup_steps=args.warmup_steps, decode_steps=args.warmup_steps + args.steps)
    budget = args.kv_budget_gib if args.kv_budget_gib is not None else bc.default_kv_budget_gib(
        spec, args.context, block_size=settings.block_size, dtype_bytes=2, dense_batch=2)
    plan = bc.plan_capacity(spec, sequence_len=args.context, decode_steps=settings.decode_steps, kv_budget_gib=budget,
                            host_gib=args.host_gib, sparse=settings.sparse_for("esa"),
                            cache_blocks=settings.cache_blocks, dtype_bytes=2)
    print(bc.format_plan(plan), flush=True)
    model = bc.build_model(spec, dtype=dtype, device="cuda", max_positions=args.context)
    drift = None
    if args.realistic and set(args.algorithms) & set(bc.OFFLOAD_ALGORITHMS):  # once, as bench_capacity does
        target = bc.measured_turnover(Path(__file__).resolve().parent / "results" / "runtime",
                                      block_size=settings.block_size, ratio=settings.ratio, stride=settings.stride)
        drift = bc.calibrate_turnover(plan, spec, settings.sparse_for("esa"), target[0], target[1], seed=0)
    results = []
    for name in args.algorithms:
        batch = args.batch or plan.max_batch[name]
        if batch > plan.max_batch[name]:
            print(f"{name}: batch {batch} exceeds the plan's {plan.max_batch[name]}; skipped", flush=True)
            continue
        res = profile_one(model, name, plan, settings, batch=batch, drift=drift, args=args)
        results.append(res)
        print(f"\n== {name} batch {batch} @ {plan.context_len}: step {res['step_ms_mean']:.2f} ms (plan "
              f"{res['plan_ms_per_step']:.2f}, ahead {res['plan_ahead_ms_per_step']:.2f}), GPU kernels {res['gpu_kernel_ms_per_step']:.2f} ms per step", flush=True)
        for r in res["kernels"]:
            print(f"  {r['us_per_step']:9.1f} us {r['share'] * 100:5.1f} % {r['launches_per_step']:7.1f}x  {r['kernel']}")
        bc._free_memory()
    if args.out is not None:
        card = torch.cuda.get_device_name().replace(" ", "-")
        args.out.mkdir(parents=True, exist_ok=True)
        path = args.out / f"profile_{card}_{time.strftime('%Y-%m-%d')}.json"
        path.write_text(json.dumps({"card": torch.cuda.get_device_name(), "torch": torch.__version__,
                                    "argv": sys.argv[1:] if argv is None else argv, "results": results},
                                   indent=1) + "\n")
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
