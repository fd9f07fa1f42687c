"""ONNX graph rewriting: UCM op schemas + function bodies, pattern rules, paged-I/O rewiring, driver.

Public API::

    from ucm_trt.graph import rewrite_model, RewriteConfig, export_hf_model, ExportConfig
    model, report = rewrite_model("model.onnx", config=RewriteConfig(algorithm="esa", block_size=16))

See docs/graph.md for the op schemas, the supported patterns and the rewritten model's I/O.
This package never imports tensorrt.
"""

from __future__ import annotations

from ucm_trt._lazy import lazy_exports

# module -> the public names it defines, imported on first use (PEP 562): the CLI reads ExportConfig and
# checks its flags before onnx (driver, functions) is imported.
_names, __getattr__, __dir__ = lazy_exports(
    __name__,
    {
        "ucm_trt.graph.driver": (
            "ALGORITHMS",
            "RewriteConfig",
            "RewriteError",
            "RewriteReport",
            "load_model",
            "rewrite_model",
            "save_model",
        ),
        "ucm_trt.graph.export": ("ExportConfig", "export_hf_model", "load_hf_model"),
        "ucm_trt.graph.functions": ("build_function", "make_single_op_model"),
        "ucm_trt.graph.schemas": ("SCHEMAS", "get_schema"),
    },
    globals(),
)
__all__ = _names
