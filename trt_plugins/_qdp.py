"""Builds the ``tensorrt.plugin`` (QDP) functions of one UCM op from its :class:`PluginSpec`.

QDP validates decorated functions by ``inspect.signature``: tensors first, then attributes in
registration order, then ``outputs`` / ``stream`` / ``tactic``. The parameter lists are generated
from the schema (``__signature__``), so the op's interface is written in exactly one place.
Each op module supplies only the computation:

* ``check(descs, attrs)``          static checks at shape-inference time (optional);
* ``jit(tensors, attrs, outputs, stream, tactic)``   the JIT impl (torch tensors on ``stream``);
* ``aot(descs, attrs, outputs, tactic)``   -> ``(kernel_name, ptx, launch_params, extra_args)``;
* ``tactics``                      custom tactic ids advertised by ``autotune``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import List, Tuple, Union  # noqa: UP035 - QDP inspects typing.Tuple / Union annotations

import torch

from trt_plugins._tensorrt import require_tensorrt, torch_dtype
from trt_plugins.spec import DERIVED_SYMBOLS, PluginSpec, check_input_dims, fixed_type, output_shape

__all__ = ["OpImpl", "define_plugin", "parameter_names", "torch_view"]


@dataclass(frozen=True, kw_only=True)
class OpImpl:
    jit: Callable[..., None]
    aot: Callable[..., tuple] | None = None
    check: Callable[..., None] | None = None
    tactics: Sequence[int] | None = None


class _CudaArray:
    """Minimal ``__cuda_array_interface__`` over a raw device pointer (works for BF16 via int16)."""

    def __init__(self, ptr: int, shape: tuple[int, ...], typestr: str) -> None:
        self.__cuda_array_interface__ = {"shape": shape, "typestr": typestr, "data": (int(ptr), False),
                                         "version": 2, "strides": None}  # fmt: skip


_TYPESTR = {torch.float32: "<f4", torch.float16: "<f2", torch.bfloat16: "<i2", torch.int32: "<i4"}


def torch_view(tensor) -> torch.Tensor:
    """A torch CUDA tensor aliasing a ``trtp.Tensor`` (no copy). ``Tensor.__cuda_array_interface__``
    rejects BF16, so the view is built from ``data_ptr`` and the shape instead."""
    dtype = torch_dtype(tensor.dtype, what="a UCM plugin tensor")
    if dtype not in _TYPESTR:
        raise TypeError(f"a UCM plugin tensor has dtype {dtype}; the plugins handle fp32, fp16, bf16, int32")
    shape = tuple(int(s) for s in tensor.shape)
    if any(s == 0 for s in shape):
        return torch.empty(shape, dtype=dtype, device="cuda")
    t = torch.as_tensor(_CudaArray(tensor.data_ptr, shape, _TYPESTR[dtype]), device="cuda")
    return t.view(torch.bfloat16) if dtype == torch.bfloat16 else t


def _fn(name: str, params: list[inspect.Parameter], ret, body: Callable[[dict], object]):
    sig = inspect.Signature(params, return_annotation=ret)

    def fn(*args, **kwargs):
        bound = sig.bind(*args, **kwargs)
        return body(dict(bound.arguments))

    fn.__signature__ = sig  # type: ignore[attr-defined]
    fn.__name__ = fn.__qualname__ = name
    return fn


def parameter_names(spec: PluginSpec) -> dict[str, tuple[str, ...]]:
    """Parameter names of the four QDP functions, in the order ``tensorrt.plugin`` validates:
    tensors, then attributes in registration order, then ``outputs`` / ``stream`` / ``tactic``.
    ``impl`` and ``aot_impl`` declare every attribute: the AOT builder passes all of them
    positionally (shared/reference/tensorrt.md §1.7)."""
    t, a = tuple(spec.inputs), tuple(spec.attr_names)
    return {
        "register": t + a,
        "impl": t + a + ("outputs", "stream", "tactic"),
        "aot_impl": t + a + ("outputs", "tactic"),
        "autotune": t + ("outputs",),
    }


def _check_descs(spec: PluginSpec, descs: list, values: dict) -> None:
    """Static checks TensorRT can do at build time: one float dtype, INT32 indices, and every
    constant dim that an attribute defines equals that attribute (clear errors instead of a
    kernel reading out of bounds)."""
    trt, _ = require_tensorrt()
    float_types = {d.dtype for d, t in zip(descs, spec.schema.inputs, strict=True) if "int32" not in t.types}
    if len(float_types) > 1:
        raise TypeError(f"{spec.name}: all float inputs must share one dtype, got {sorted(str(x) for x in float_types)}")
    for d, t in zip(descs, spec.schema.inputs, strict=True):
        if t.types == ("int32",) and d.dtype != trt.int32:
            raise TypeError(f"{spec.name}: input {t.name} must be INT32, got {d.dtype}")
    known = [[None if (e.is_fake or not e.is_constant) else e.constant_value() for e in d.shape_expr] for d in descs]
    check_input_dims(spec, known, values)


def define_plugin(spec: PluginSpec, impl: OpImpl) -> None:
    """Register ``spec`` with TensorRT (non-lazy: the ONNX parser finds it in the registry)."""
    trt, trtp = require_tensorrt()
    P = inspect.Parameter
    kw = P.POSITIONAL_OR_KEYWORD
    tensors = list(spec.inputs)
    attrs = spec.attrs

    def tparams(annotation):
        return [P(n, kw, annotation=annotation) for n in tensors]

    aparams = [P(a.name, kw, annotation=a.py_type) for a in attrs]

    def split(args: dict):
        return {n: args[n] for n in tensors}, {a.name: args[a.name] for a in attrs}

    names = parameter_names(spec)

    def _checked(kind: str, params: list[inspect.Parameter]) -> list[inspect.Parameter]:
        if tuple(p.name for p in params) != names[kind]:
            raise RuntimeError(f"{spec.name}: generated {kind} parameters {[p.name for p in params]} != {names[kind]}")
        return params

    # ---- register: output shapes/dtypes from the schema's symbols -----------------------
    def register_body(args):
        descs, values = split(args)
        values = {k: (v.rstrip("\x00") if isinstance(v, str) else v) for k, v in values.items()}
        descs_list = [descs[n] for n in tensors]
        _check_descs(spec, descs_list, values)
        if impl.check is not None:
            impl.check(descs, values)
        float_in = next((d for d, t in zip(descs_list, spec.schema.inputs, strict=True) if "int32" not in t.types), None)
        # First pass (dtypes only): shape expressions are "fake"; give attribute-defined dims as fake
        # expressions too, so no ShapeExpr(int) touches an expression builder outside a shape pass.
        fake = any(e.is_fake for d in descs_list for e in d.shape_expr)
        const = (lambda v: trtp.ShapeExpr()) if fake else (lambda v: v)  # noqa: E731
        outs = []
        for i, t in enumerate(spec.schema.outputs):
            if fake and any(sym in DERIVED_SYMBOLS for sym in t.shape):
                dims = [trtp.ShapeExpr() for _ in t.shape]  # the launch rule's length: shape pass only
            else:
                dims = output_shape(spec, i, [d.shape_expr for d in descs_list], values, const=const,
                                    maximum=trtp.max)  # fmt: skip
            dtype = {None: float_in.dtype if float_in is not None else None, "int32": trt.int32,
                     "float": trt.float32}[fixed_type(t)]  # fmt: skip
            outs.append(trtp.from_shape_expr(tuple(dims), dtype=dtype))
        return outs[0] if len(outs) == 1 else tuple(outs)

    ret = trtp.TensorDesc if len(spec.outputs) == 1 else Tuple[tuple([trtp.TensorDesc] * len(spec.outputs))]  # noqa: UP006
    trtp.register(spec.plugin_id)(_fn(f"{spec.name}_register", _checked("register", tparams(trtp.TensorDesc) + aparams), ret,
                                       register_body))

    # ---- JIT impl -------------------------------------------------------------------------
    def impl_body(args):
        ts, values = split(args)
        impl.jit(ts, values, args["outputs"], args["stream"], args["tactic"])

    trtp.impl(spec.plugin_id)(
        _fn(f"{spec.name}_impl",
            _checked("impl", tparams(trtp.Tensor) + aparams + [P("outputs", kw), P("stream", kw, annotation=int),
                                                               P("tactic", kw, annotation=int)]),
            None, impl_body)  # fmt: skip
    )

    # ---- AOT impl (TensorRT >= 10.9 has aot_impl) ------------------------------------------
    if impl.aot is not None and hasattr(trtp, "aot_impl"):

        def aot_body(args):
            descs, values = split(args)
            return impl.aot(descs, values, args["outputs"], args["tactic"])

        aot_ret = Tuple[Union[str, bytes], Union[str, bytes], trtp.KernelLaunchParams, trtp.SymExprs]  # noqa: UP006,UP007
        trtp.aot_impl(spec.plugin_id)(
            _fn(f"{spec.name}_aot_impl",
                _checked("aot_impl", tparams(trtp.TensorDesc) + aparams + [P("outputs", kw), P("tactic", kw, annotation=int)]),
                aot_ret, aot_body)  # fmt: skip
        )

    # ---- autotune: one dtype for all float I/O, INT32 for index tensors, LINEAR, tactics ---
    combo = spec.io_type_combinations()
    tactics = list(impl.tactics) if impl.tactics else None

    def autotune_body(args):
        return [trtp.AutoTuneCombination(combo, "LINEAR", tactics)]

    trtp.autotune(spec.plugin_id)(
        _fn(f"{spec.name}_autotune", _checked("autotune", tparams(trtp.TensorDesc) + [P("outputs", kw)]),
            List[trtp.AutoTuneCombination], autotune_body)  # noqa: UP006
    )
