"""ONNX graph rewriting: UCM op schemas + function bodies, pattern rules, paged-I/O rewiring, driver.

Public API::

    from ucm_trt.graph import rewrite_model, RewriteConfig, export_hf_model, ExportConfig
    model, report = rewrite_model("model.onnx", config=RewriteConfig(algorithm="esa", block_size=16))

See docs/graph.md for the op schemas, the supported patterns and the rewritten model's I/O.
This package never imports tensorrt.
"""

from __future__ import annotations

from ucm_trt._lazy import lazy_exports

# name -> module that defines it, imported on first use (PEP 562): the CLI reads ExportConfig and
# checks its flags before onnx (driver, functions) is imported.
_EXPORTS = {
    "ALGORITHMS": "ucm_trt.graph.driver",
    "RewriteConfig": "ucm_trt.graph.driver",
    "RewriteError": "ucm_trt.graph.driver",
    "RewriteReport": "ucm_trt.graph.driver",
    "load_model": "ucm_trt.graph.driver",
    "rewrite_model": "ucm_trt.graph.driver",
    "save_model": "ucm_trt.graph.driver",
    "ExportConfig": "ucm_trt.graph.export",
    "export_hf_model": "ucm_trt.graph.export",
    "load_hf_model": "ucm_trt.graph.export",
    "build_function": "ucm_trt.graph.functions",
    "make_single_op_model": "ucm_trt.graph.functions",
    "SCHEMAS": "ucm_trt.graph.schemas",
    "get_schema": "ucm_trt.graph.schemas",
}

__all__ = list(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
