"""The one place that imports ``tensorrt``: a missing or too old TensorRT gives a one-line error.

TensorRT's Python package is an optional extra. ``require_tensorrt()`` returns the ``tensorrt``
module and its ``tensorrt.plugin`` (QDP) module, or raises :class:`TensorRTUnavailableError`
whose message names the extra to install. Nothing here falls back to anything else.
"""

from __future__ import annotations

import functools
from types import ModuleType

__all__ = ["MIN_TENSORRT", "TensorRTUnavailableError", "require_tensorrt", "tensorrt_version", "torch_dtype"]

# aot_impl (Python-free engines) and the QuickPluginCreationRequest closure API exist since 10.9.
MIN_TENSORRT = (10, 9)
INSTALL_HINT = 'pip install "ucm-trt[trt]"'


class TensorRTUnavailableError(ImportError):
    """TensorRT (>= 10.9, with ``tensorrt.plugin``) cannot be imported."""


def _parse_version(text: str) -> tuple[int, ...]:
    parts = []
    for p in text.split(".")[:3]:
        digits = "".join(ch for ch in p if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


@functools.cache
def require_tensorrt() -> tuple[ModuleType, ModuleType]:
    """``(tensorrt, tensorrt.plugin)``; raises :class:`TensorRTUnavailableError` (one line) otherwise."""
    try:
        import tensorrt as trt
    except Exception as exc:  # ImportError, or the PyPI stub wheels' RuntimeError
        raise TensorRTUnavailableError(
            f"TensorRT is not available (`import tensorrt` failed: {type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}); install it with {INSTALL_HINT} on a CUDA machine"
        ) from None
    version = getattr(trt, "__version__", "0")
    if _parse_version(version)[:2] < MIN_TENSORRT:
        raise TensorRTUnavailableError(
            f"TensorRT {version} is too old: ucm-trt's plugins need TensorRT >= "
            f"{MIN_TENSORRT[0]}.{MIN_TENSORRT[1]} (tensorrt.plugin with aot_impl); upgrade with {INSTALL_HINT}"
        )
    try:
        import tensorrt.plugin as trtp
    except Exception as exc:
        raise TensorRTUnavailableError(
            f"TensorRT {version} has no usable tensorrt.plugin module ({type(exc).__name__}: {exc}); "
            f"reinstall with {INSTALL_HINT}"
        ) from None
    return trt, trtp


def tensorrt_version() -> tuple[int, ...]:
    """Installed TensorRT version as a tuple (raises like :func:`require_tensorrt`)."""
    trt, _ = require_tensorrt()
    return _parse_version(trt.__version__)


def torch_dtype(trt_dtype, *, what: str = "TensorRT tensor"):
    """The torch dtype of a TensorRT dtype: the one map of the project (engine I/O, plugin I/O).
    ``what`` names the tensor in the TypeError for a dtype with no torch twin here."""
    import torch

    trt, _ = require_tensorrt()
    table = {trt.float32: torch.float32, trt.float16: torch.float16, trt.bfloat16: torch.bfloat16,
             trt.int32: torch.int32, trt.int64: torch.int64, trt.int8: torch.int8, trt.bool: torch.bool}  # fmt: skip
    if trt_dtype not in table:
        known = ", ".join(str(d).replace("torch.", "") for d in table.values())
        raise TypeError(f"{what} has dtype {trt_dtype}, which has no torch dtype here (known: {known})")
    return table[trt_dtype]
