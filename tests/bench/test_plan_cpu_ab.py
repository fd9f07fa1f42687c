"""benchmarks/plan_cpu_ab.py on a tiny shape (a subprocess: it wraps the engine's classes for its process)."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "plan_cpu_ab.py"
TINY = ["--skip", "4", "--algorithms", "esa", "--turnovers", "random", "--layers", "16", "--pool-blocks", "256",
        "--batches", "2", "--context", "4096", "--decode-steps", "12", "--retrieval-threads", "1", "--profile-top", "0"]


def _run(cwd, *args):
    env = {**os.environ, "PYTHONPATH": str(ROOT / "python")}
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=600)


def test_plan_cpu_times_and_parts_add_up_inside_the_counted_plans(tmp_path):
    """One JSON line per run: the counted plans (decode steps after the warm-up) and, with --parts, the CPU time
    of the plan's steps per plan. The engine-level parts are disjoint steps of the plan, so their sum cannot
    exceed the plan's mean (it would if parts of uncounted plans, e.g. the warm-up, were added in)."""
    out = tmp_path / "ab.jsonl"
    r = _run(ROOT, *TINY, "--parts", "--json", str(out), "--out", str(tmp_path / "host.json"))
    assert r.returncode == 0, r.stderr[-2000:]
    row = json.loads(out.read_text().splitlines()[-1])
    assert row["n"] >= 4 and 0 < row["min_ms"] <= row["median_ms"] and row["checkout"] == str(ROOT)
    parts = row["parts_ms_per_plan"]
    top = ("KVManager.plan_step", "Engine._write_selections", "OffloadPolicy.plan", "Engine._block_arrays",
           "Engine._write_slots")
    assert all(parts[k] > 0 for k in top)
    assert sum(parts[k] for k in top) <= row["mean_ms"] * 1.05
    assert parts["KVManager._plan_batched"] <= parts["KVManager.plan_step"] * 1.05


def test_refuses_to_run_outside_a_checkout(tmp_path):
    r = _run(tmp_path, *TINY)
    assert r.returncode == 2 and "run it from a checkout's root" in r.stderr
