"""benchmarks/profile_decode.py: its kernel table (per-step device time by kernel name) and its argument checks."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

_BENCH = Path(__file__).resolve().parents[2] / "benchmarks"
sys.path.insert(0, str(_BENCH))  # profile_decode imports bench_capacity as a sibling module
_spec = importlib.util.spec_from_file_location("profile_decode", _BENCH / "profile_decode.py")
pd = importlib.util.module_from_spec(_spec)
sys.modules["profile_decode"] = pd
_spec.loader.exec_module(pd)


def _ev(name, device_type, us):
    return SimpleNamespace(name=name, device_type=device_type, device_time=us)


def test_kernel_table_sums_device_time_per_kernel_and_step():
    events = [_ev("gemm", "DeviceType.CUDA", 50.0), _ev("gemm", "DeviceType.CUDA", 30.0),
              _ev("attn", "DeviceType.CUDA", 120.0), _ev("aten::mm", "DeviceType.CPU", 999.0),
              _ev("Memcpy HtoD", "DeviceType.CUDA", 0.0), SimpleNamespace(name="no device", device_time=5.0)]
    total_us, rows = pd.kernel_table(SimpleNamespace(events=lambda: events), steps=2)
    assert total_us == pytest.approx((50 + 30 + 120) / 2)  # CPU events and events without a device left out
    assert [r["kernel"] for r in rows] == ["attn", "gemm", "Memcpy HtoD"]  # by device time
    attn, gemm, memcpy = rows
    assert attn["us_per_step"] == 60.0 and attn["launches_per_step"] == 0.5 and attn["share"] == pytest.approx(0.6)
    assert gemm["us_per_step"] == 40.0 and gemm["launches_per_step"] == 1.0 and gemm["share"] == pytest.approx(0.4)
    assert memcpy["us_per_step"] == 0.0 and memcpy["share"] == 0.0


def test_kernel_table_reads_the_older_cuda_time_field():
    events = [SimpleNamespace(name="k", device_type="DeviceType.CUDA", cuda_time=8.0)]
    total_us, rows = pd.kernel_table(SimpleNamespace(events=lambda: events), steps=4)
    assert total_us == 2.0 and rows[0]["us_per_step"] == 2.0


@pytest.mark.parametrize(("argv", "message"), [
    (["--steps", "0"], "--steps must be >= 1, got 0"),
    (["--warmup-steps", "0"], "--warmup-steps must be >= 1, got 0"),
    (["--top", "-1"], "--top must be >= 1, got -1"),
    (["--batch", "-2"], "--batch must be >= 0"),
    (["--algorithms", "quest"], "invalid choice"),
])
def test_bad_arguments_are_refused_by_name(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        pd.parse_args(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err
