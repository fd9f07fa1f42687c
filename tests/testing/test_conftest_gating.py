"""tests/conftest.py gating: markers (not folder names) decide skips, and each skip says why."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest_plugins = ["pytester"]

CONFTEST = (Path(__file__).resolve().parents[1] / "conftest.py").read_text()
INI = """
[pytest]
markers =
    gpu: gpu
    trt: trt
    slow: slow
    perf: perf
"""


@pytest.fixture
def suite(pytester):
    pytester.makeini(INI)
    pytester.makeconftest(CONFTEST)
    # a folder named like a marker must not mark its tests
    pytester.mkdir("trt")
    pytester.makepyfile(
        **{
            "trt/test_unmarked.py": "def test_plain():\n    pass\n",
            "test_marked.py": (
                "import pytest\n"
                "@pytest.mark.gpu\ndef test_gpu():\n    pass\n"
                "@pytest.mark.slow\ndef test_slow():\n    pass\n"
                "@pytest.mark.perf\ndef test_perf():\n    pass\n"
                "def test_plain():\n    pass\n"
            ),
        }
    )
    return pytester


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the skips of a machine without CUDA")
def test_markers_skip_with_reasons_and_folders_do_not(suite):
    result = suite.runpytest("-rs", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=2, skipped=3)
    result.stdout.fnmatch_lines(
        [
            "*needs a CUDA GPU: torch.cuda.is_available() is False*",
            "*slow test: pass --run-slow or -m slow to run it*",
            "*performance measurement: pass --run-perf or -m perf to run it*",
        ]
    )


def test_run_slow_and_marker_selection_enable_slow_tests(suite):
    suite.runpytest("--run-slow", "-k", "slow").assert_outcomes(passed=1)
    suite.runpytest("-m", "slow").assert_outcomes(passed=1)
    # "not slow" in the expression deselects instead of enabling
    suite.runpytest("-m", "not slow and not gpu and not perf").assert_outcomes(passed=2)
