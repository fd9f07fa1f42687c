"""TensorRT-for-RTX build tier (CPU): gating and the tiny models it builds.

These tests run in the CPU tier (``make test`` installs the ``trt-rtx`` extra). They are skipped only
where TensorRT for RTX cannot be imported (the wheels are not installed), with the import error as the
reason. Installed but unusable (the unversioned library link missing) is an error, not a skip: the
message names the fix.

The tiny models are the graph tests' export matrix (``tests/graph/_graph_models.py``) with
``head_dim=32``: the plugins apply the TensorRT plugins' geometry checks (``ucm_trt.limits``: head_dim a
multiple of 16 in [16, 256]; a head_dim outside it fails the build, see test_rtx_plugins.py).
"""

from __future__ import annotations

import pytest

from tests.graph._graph_models import ARCHS, make_tiny

HEAD_DIM = 32


@pytest.fixture(autouse=True, scope="session")
def tensorrt_rtx():
    """The ``tensorrt_rtx_bindings`` module: skip when not installed, fail when installed but unusable."""
    try:
        import tensorrt_rtx_bindings  # noqa: F401
    except Exception as exc:
        pytest.skip(
            f"needs TensorRT for RTX: `import tensorrt_rtx_bindings` failed ({type(exc).__name__}: {exc}); "
            'install the trt-rtx extra (pip install -e ".[trt-rtx]"; make test does)'
        )
    from trt_plugins.rtx import TensorRTRtxUnavailableError, require_tensorrt_rtx

    try:
        return require_tensorrt_rtx()
    except TensorRTRtxUnavailableError as exc:
        message = str(exc)
    pytest.fail(message, pytrace=False)


@pytest.fixture(scope="session")
def rtx_exported(tmp_path_factory):
    """(arch, exporter, opset) -> path of the exported tiny model (head_dim 32); exported lazily, once."""
    from ucm_trt.graph.export import ExportConfig, export_hf_model

    root = tmp_path_factory.mktemp("rtx_exports")
    models: dict[str, object] = {}
    cache: dict[tuple[str, str, int], str] = {}

    def get(arch: str, exporter: str, opset: int) -> str:
        if arch not in ARCHS:
            raise ValueError(f"arch must be one of {ARCHS}, got {arch!r}")
        key = (arch, exporter, opset)
        if key not in cache:
            if arch not in models:
                models[arch] = make_tiny(arch, head_dim=HEAD_DIM)
            path = root / f"{arch}_{exporter}{opset}.onnx"
            export_hf_model(models[arch], path, config=ExportConfig(exporter=exporter, opset=opset))
            cache[key] = str(path)
        return cache[key]

    return get
