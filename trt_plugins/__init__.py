"""TensorRT plugins for ucm-trt: one QDP (``tensorrt.plugin``) per UCM op, read from the op schemas.

This package is imported only by the TensorRT backend and the engine builder (DESIGN §2). Its
modules import without TensorRT (specs, PTX compilation, kernels); :func:`register_plugins`
needs TensorRT >= 10.9 and otherwise raises a one-line :class:`TensorRTUnavailableError` that
names the extra to install (``pip install "ucm-trt[trt]"``).

Plugins (namespace ``ucm``, version ``"1"``), each built from its schema (``ops.module(name)``):

* ``UcmPagedSparseAttention``, ``UcmPagedReRoPEAttention`` and their split-K variants
  ``UcmPagedSparseAttentionSplitK``, ``UcmPagedReRoPEAttentionSplitK`` (the scratch as I/O: what the
  rewriter emits; AOT = the split kernel for ``num_sms``) -- ``_attention.py`` (one builder; the
  schemas' attributes decide the kernel geometry)
* ``UcmSelectAllBlocks``       -- ``ucm_select_all_blocks.py``

Each has ``register`` (output shapes/dtypes from the schema's symbols), ``impl`` (JIT: Triton
through torch on TensorRT's stream), ``aot_impl`` (the same Triton kernel as PTX, one launch,
int32 extras) and ``autotune`` (one float dtype for all float I/O, INT32 indices, LINEAR,
tactics). A JIT engine needs :func:`register_plugins` called in the process that deserializes
it; an AOT engine needs no Python.
"""

from __future__ import annotations

import functools

from trt_plugins._tensorrt import INSTALL_HINT, TensorRTUnavailableError, require_tensorrt, torch_dtype

__all__ = ["register_plugins", "TensorRTUnavailableError", "require_tensorrt", "torch_dtype", "INSTALL_HINT"]


@functools.cache
def register_plugins() -> tuple[str, ...]:
    """Register every UCM plugin with TensorRT's plugin registry (once per process).

    Returns the plugin ids (``"ucm::<Op>"``). Raises :class:`TensorRTUnavailableError` when
    TensorRT >= 10.9 is not importable.
    """
    require_tensorrt()
    from trt_plugins import ops

    missing = ops.missing_plugin_modules()
    if missing:
        raise RuntimeError(f"UCM ops without a TensorRT plugin module: {missing}")
    return tuple(ops.define(name) for name in sorted(ops.OP_MODULES))
