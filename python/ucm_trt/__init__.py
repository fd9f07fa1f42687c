"""ucm-trt: UCM-style sparse attention for TensorRT deployments of long-context decoder LLMs.

Subpackages (DESIGN §2): ``config`` (frozen keyword-only dataclasses), ``sparse`` (block
representations, scoring, selection, policies), ``reference`` (fp32 PyTorch ground truth),
``kernels`` (Triton), ``graph`` (ONNX rewriting), ``runtime`` (paged KV pool, retrieval, backends),
``models`` (the small trained test model and prompt builders) and ``testing`` (tolerances, timing).

Importing ``ucm_trt`` is cheap: it imports no subpackage, no ``tensorrt`` and no ``transformers``.
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__"]
