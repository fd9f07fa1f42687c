"""Session-scoped tiny models and their ONNX exports (exported once per test session).

Tiny random configs: 2 layers, hidden 64, 4 query heads, 2 KV heads, head_dim 16, vocab 1000.
Exports (torch 2.13): legacy opset 17 for every architecture; dynamo opset 20 (decomposed)
and 23 (``Attention``) for a subset, because each dynamo export costs ~7 s on 2 cores.
"""

from __future__ import annotations

import pytest

from tests.graph._graph_models import ARCHS, make_tiny
from ucm_trt.graph.export import ExportConfig, export_hf_model


@pytest.fixture(scope="session")
def tiny_models():
    return {a: make_tiny(a) for a in ARCHS}


@pytest.fixture(scope="session")
def exported(tiny_models, tmp_path_factory):
    """(arch, exporter, opset) -> path of the exported ONNX; exported lazily, once."""
    root = tmp_path_factory.mktemp("exports")
    cache: dict[tuple[str, str, int], str] = {}

    def get(arch: str, exporter: str, opset: int) -> str:
        key = (arch, exporter, opset)
        if key not in cache:
            path = root / f"{arch}_{exporter}{opset}.onnx"
            export_hf_model(tiny_models[arch], path, config=ExportConfig(exporter=exporter, opset=opset))
            cache[key] = str(path)
        return cache[key]

    return get
