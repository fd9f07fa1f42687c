"""ONNX graph rewriting: UCM op schemas + function bodies, pattern rules, paged-I/O rewiring, driver.

Public API::

    from ucm_trt.graph import rewrite_model, RewriteConfig, export_hf_model, ExportConfig
    model, report = rewrite_model("model.onnx", config=RewriteConfig(algorithm="esa", block_size=16))

See docs/graph.md for the op schemas, the supported patterns and the rewritten model's I/O.
This package never imports tensorrt.
"""

from ucm_trt.graph.driver import (
    ALGORITHMS,
    RewriteConfig,
    RewriteError,
    RewriteReport,
    load_model,
    rewrite_model,
    save_model,
)
from ucm_trt.graph.export import ExportConfig, export_hf_model, load_hf_model
from ucm_trt.graph.functions import build_function, make_single_op_model
from ucm_trt.graph.schemas import SCHEMAS, get_schema

__all__ = [
    "ALGORITHMS",
    "RewriteConfig",
    "RewriteError",
    "RewriteReport",
    "load_model",
    "rewrite_model",
    "save_model",
    "ExportConfig",
    "export_hf_model",
    "load_hf_model",
    "build_function",
    "make_single_op_model",
    "SCHEMAS",
    "get_schema",
]
