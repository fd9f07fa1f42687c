"""benchmarks/bench_step_host.py at a small size: the components add up to the step, the copies and
the attention stand-in are in place, the JSON and the table come out."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_step_host.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_step_host", _PATH)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["bench_step_host"] = mod
    spec.loader.exec_module(mod)
    return mod


def test_small_run_splits_the_step_and_writes_json(bench, tmp_path):
    out = tmp_path / "host.json"
    rc = bench.main(["--algorithms", "esa", "kvstar", "--turnovers", "random", "--batches", "3", "--context", "2048",
                     "--block-size", "16", "--decode-steps", "10", "--warmup-steps", "2", "--stride", "2",
                     "--pool-blocks", "2048", "--label", "t", "--out", str(out)])
    assert rc == 0
    doc = json.loads(out.read_text())
    assert {(r["algorithm"], r["batch"]) for r in doc["rows"]} == {("esa", 3), ("kvstar", 3)}
    for r in doc["rows"]:
        assert r["measured_steps"] == 8 and r["attention"] == "stand-in" and not r["real_copies"]
        parts = sum(r[f"{k}_ms"] for k in bench.COMPONENTS)
        assert parts == pytest.approx(r["step_ms"], rel=1e-6)
        assert r["plan_ms"] > 0 and r["forward_ms"] > 0 and r["main_thread_cpu_ms"] > 0
        kinds = r["plan_by_step_kind"]
        assert sum(k["steps"] for k in kinds.values()) == 8 and kinds["retrieval"]["steps"] >= 3
        assert 0 < r["plan_cpu_ms"] <= r["main_thread_cpu_ms"]
        # one submission per retrieval step (stride 2): one task per worker thread, not one per request
        assert 0 < r["retrieval_tasks_per_step"] <= 2 / 2
        assert any("ucm_trt" in line for line in r["profile_top_cumtime_ucm_trt"])
    doc["rows"] += [{**r, "label": "before"} for r in doc["rows"]]
    for r in doc["rows"]:
        if r["label"] == "t":
            r["label"] = "after"
    table = bench.markdown_table(doc)
    assert table.count("\n") == 3 and "| esa | 3 | random |" in table
