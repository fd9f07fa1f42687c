"""The plugin of every UCM op, generated from its schema, and the glue from a plugin to ``tensorrt.plugin``.

Each op's :class:`OpPlugin` (``SPEC`` from the schema, ``TACTICS``, ``check``, ``jit_run`` on torch
tensors, ``aot_launch`` = PTX + launch rule) is built by a builder that takes the op's
:class:`~trt_plugins.spec.PluginSpec`: the two paged attention ops share one builder
(``trt_plugins._attention``; the schema's attributes fill the kernel geometry, so ReRoPE is the op
whose schema has ``rerope_window``), ``UcmSelectAllBlocks`` has its own
(``trt_plugins.ucm_select_all_blocks``). Building needs no TensorRT; only :func:`define` does.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from trt_plugins.spec import PluginSpec, plugin_spec
from ucm_trt.graph.schemas import SCHEMAS, node_attributes

__all__ = ["OP_MODULES", "OpPlugin", "check_attributes", "module", "define", "device_target"]

# UCM op name -> module whose ``plugin(spec)`` builds its OpPlugin. Every schema must have one (a test checks).
OP_MODULES = {
    "UcmPagedSparseAttention": "trt_plugins._attention",
    "UcmPagedReRoPEAttention": "trt_plugins._attention",
    "UcmPagedSparseAttentionSplitK": "trt_plugins._attention",
    "UcmPagedReRoPEAttentionSplitK": "trt_plugins._attention",
    "UcmSelectAllBlocks": "trt_plugins.ucm_select_all_blocks",
}


@dataclass(frozen=True)
class OpPlugin:
    """What the QDP glue needs of one op (upper-case names: the former per-op module constants)."""

    SPEC: PluginSpec
    TACTICS: tuple[int, ...] | None
    check: Callable[[Mapping[str, object]], None]
    jit_run: Callable[..., None]
    aot_launch: Callable[..., object]


def check_attributes(spec: PluginSpec, values: Mapping[str, object]) -> None:
    """The schema's attribute rules (types, minimums, GQA, log-n) on plugin field values."""
    node_attributes(spec.schema, **{n: values[n] for n in spec.attr_names})


@functools.cache
def module(op_name: str) -> OpPlugin:
    """The plugin of UCM op ``op_name``, built from its schema (once per process)."""
    if op_name not in OP_MODULES:
        known = ", ".join(sorted(OP_MODULES))
        raise ValueError(f"UCM op {op_name!r} has no TensorRT plugin module; plugins exist for: {known}")
    return importlib.import_module(OP_MODULES[op_name]).plugin(plugin_spec(op_name))


def missing_plugin_modules() -> list[str]:
    """Schemas without a plugin module (should be empty)."""
    return sorted(set(SCHEMAS) - set(OP_MODULES))


def device_target():
    """PTX target of the current CUDA device, ISA capped to the installed driver."""
    from trt_plugins.ptx import PtxTarget

    if not torch.cuda.is_available():
        raise RuntimeError("building an AOT plugin kernel needs a CUDA device (torch.cuda.is_available() is False)")
    major, minor = torch.cuda.get_device_capability()
    return PtxTarget.for_device(10 * major + minor)


def define(op_name: str) -> str:
    """Register the QDP of ``op_name`` with TensorRT; returns its plugin id."""
    from trt_plugins._qdp import OpImpl, define_plugin, torch_view
    from trt_plugins._tensorrt import require_tensorrt, torch_dtype
    from trt_plugins.aot import aot_launch

    _, trtp = require_tensorrt()
    mod = module(op_name)
    spec = mod.SPEC

    def jit(tensors, values, outputs, stream, tactic):
        with torch.cuda.stream(torch.cuda.ExternalStream(int(stream))):
            views = {n: torch_view(t) for n, t in tensors.items()}
            mod.jit_run(views, values, torch_view(outputs[0]), int(tactic))

    def aot(descs, values, outputs, tactic):
        float_desc = next((descs[t.name] for t in spec.schema.inputs if "int32" not in t.types), None)
        dtype = torch.int32 if float_desc is None else torch_dtype(float_desc.dtype)
        launch = aot_launch(op_name, values, dtype, int(tactic), device_target())
        shapes = {n: list(d.shape_expr) for n, d in descs.items()}
        gx, gy, gz = launch.grid(shapes, trtp.cdiv)
        lp = trtp.KernelLaunchParams()
        lp.grid_x, lp.grid_y, lp.grid_z = gx, gy, gz
        lp.block_x = launch.kernel.block_x
        lp.shared_mem = launch.kernel.shared_mem
        extras = trtp.SymIntExprs.from_tuple([trtp.SymInt32(e) for e in launch.extras(shapes)])
        return launch.kernel.name, launch.kernel.ptx, lp, extras

    def check(descs, values):
        mod.check(values)

    define_plugin(spec, OpImpl(jit=jit, aot=aot, check=check, tactics=mod.TACTICS))
    return spec.plugin_id
