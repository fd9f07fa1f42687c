"""Build half of the TensorRT tier on TensorRT for RTX's builder, which runs without a GPU.

TensorRT for RTX (``tensorrt-rtx-cu12-libs`` + ``tensorrt-rtx-cu12-bindings``, import name
``tensorrt_rtx_bindings``) parses ONNX and builds and serializes engines for an RTX target
(SM75 .. SM121) on a machine without a GPU. It has no ``tensorrt.plugin`` (QDP) module and its
Python ``INetworkDefinition`` has no ``add_plugin*`` method, but its ONNX parser imports a node
as an ``IPluginV3`` whose creator (``IPluginCreatorV3One``) is in the plugin registry -- and a
creator written in Python is accepted. This module registers one such creator per UCM op,
generated from the op's :class:`~trt_plugins.spec.PluginSpec` (the same schema the TensorRT QDPs
read: fields, output shapes from the schema's symbols, dtypes, I/O formats) and applies the same
attribute checks as the TensorRT plugins (``trt_plugins.ops.module(op).check``).

The plugins have **no kernels**: ``enqueue`` raises. An engine built here proves that TensorRT for
RTX accepts the rewritten graph and its plugin layers (parse, shape and type inference, format
negotiation, two optimization profiles, serialization); it says nothing about running on TensorRT
proper or on a GPU, and it is never labelled TensorRT.

One packaging defect is handled explicitly: the 1.7 wheels ship ``libtensorrt_rtx.so.1`` only,
while the ONNX parser ``dlopen``\\ s the unversioned ``libtensorrt_rtx.so`` the first time it
imports a plugin node. When that fails, the parser throws inside a ``noexcept`` function and the
process ends with ``terminate called without an active exception``. :func:`require_tensorrt_rtx`
refuses to go on (one-line error naming the fix) unless that name resolves.
"""

from __future__ import annotations

import functools
import os
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

import numpy as np

from trt_plugins.build import (
    PROFILE_NAMES,
    EngineBuildConfig,
    EngineBuildError,
    _split_nodes,
    check_ucm_nodes,
    profile_shapes,
    resolve_sms,
    stamp_split_plan,
)
from trt_plugins.spec import PluginSpec, all_plugin_specs, check_input_dims, fixed_type, output_shape

__all__ = [
    "RTX_MODULE",
    "RTX_INSTALL_HINT",
    "UNVERSIONED_LIBRARY",
    "TensorRTRtxUnavailableError",
    "require_tensorrt_rtx",
    "unversioned_library_fix",
    "link_unversioned_library",
    "register_rtx_plugins",
    "RtxBuildConfig",
    "RtxNetwork",
    "RtxBuildResult",
    "parse_rtx_network",
    "build_rtx_engine",
]

RTX_MODULE = "tensorrt_rtx_bindings"
RTX_INSTALL_HINT = 'pip install "ucm-trt[trt-rtx]"'
UNVERSIONED_LIBRARY = "libtensorrt_rtx.so"
_VERSIONED_LIBRARY = "libtensorrt_rtx.so.1"

# Schema element types -> TensorRT DataType member names; schema kinds -> PluginFieldType names.
_TRT_TYPE = {"float": "FLOAT", "float16": "HALF", "bfloat16": "BF16", "int32": "INT32"}
_FIELD_TYPE = {"int": ("INT32", np.int32), "float": ("FLOAT32", np.float32)}


class TensorRTRtxUnavailableError(ImportError):
    """TensorRT for RTX cannot be imported, or its ONNX parser could not import a plugin node."""


def _libs_dir() -> Path:
    """The installed ``tensorrt_rtx_libs`` folder (the ONNX parser's ``$ORIGIN``)."""
    try:
        import tensorrt_rtx_libs
    except Exception as exc:
        raise TensorRTRtxUnavailableError(
            f"TensorRT for RTX's libraries are not installed (`import tensorrt_rtx_libs` failed: "
            f"{type(exc).__name__}: {exc}); install them with {RTX_INSTALL_HINT}"
        ) from None
    return Path(tensorrt_rtx_libs.__file__).resolve().parent


def unversioned_library_fix(libs_dir: Path) -> str:
    """The shell command that adds the missing unversioned library name next to the parser."""
    return f"ln -s {_VERSIONED_LIBRARY} {libs_dir / UNVERSIONED_LIBRARY}"


def _unversioned_library_reachable(libs_dir: Path) -> bool:
    """Whether the parser's ``dlopen("libtensorrt_rtx.so")`` finds a file: its RPATH is ``$ORIGIN``
    (the libs folder), then ``LD_LIBRARY_PATH`` as read at process start."""
    dirs = [libs_dir, *(Path(p) for p in os.environ.get("LD_LIBRARY_PATH", "").split(os.pathsep) if p)]
    return any((d / UNVERSIONED_LIBRARY).exists() for d in dirs)


@functools.cache
def require_tensorrt_rtx() -> ModuleType:
    """The ``tensorrt_rtx_bindings`` module, or :class:`TensorRTRtxUnavailableError` (one line)."""
    try:
        import tensorrt_rtx_bindings as trt
    except Exception as exc:
        raise TensorRTRtxUnavailableError(
            f"TensorRT for RTX is not available (`import {RTX_MODULE}` failed: {type(exc).__name__}: {exc}); "
            f"install it with {RTX_INSTALL_HINT}"
        ) from None
    libs = _libs_dir()
    if not _unversioned_library_reachable(libs):
        raise TensorRTRtxUnavailableError(
            f"TensorRT for RTX {trt.__version__}: its ONNX parser dlopens {UNVERSIONED_LIBRARY!r} when it imports "
            f"a plugin node, but the wheel ships only {_VERSIONED_LIBRARY!r} (in {libs}); without it the process "
            f"aborts ('terminate called without an active exception'). Fix: {unversioned_library_fix(libs)}"
        )
    return trt


def link_unversioned_library() -> Path:
    """Create ``libtensorrt_rtx.so -> libtensorrt_rtx.so.1`` in the installed ``tensorrt_rtx_libs``
    folder (an explicit install step, run by ``make``: ``python -m trt_plugins.rtx --link-library``).
    Idempotent; returns the link's path. Raises ``FileNotFoundError`` when the versioned library is absent."""
    libs = _libs_dir()
    target, link = libs / _VERSIONED_LIBRARY, libs / UNVERSIONED_LIBRARY
    if not target.is_file():
        raise FileNotFoundError(f"{target} does not exist: is tensorrt-rtx-cu12-libs installed completely?")
    if not link.exists():
        link.symlink_to(_VERSIONED_LIBRARY)
    return link


# ---- plugin fields <-> values ---------------------------------------------------------------


def _field_value(trt, spec: PluginSpec, field) -> object:
    """The value of a plugin field as the parser delivered it; its type must be the one the schema's
    kind maps to (the parser converts ONNX INT -> INT32, FLOAT -> FLOAT32, STRING -> CHAR)."""
    name = field.name
    kind = next((a.kind for a in spec.attrs if a.name == name), None)
    if kind is None:
        raise ValueError(f"{spec.name}: the parser passed field {name!r}, which is not one of {list(spec.attr_names)}")
    want = getattr(trt.PluginFieldType, "CHAR" if kind == "string" else _FIELD_TYPE[kind][0])
    if field.type != want:
        raise TypeError(f"{spec.name}: field {name!r} ({kind}) arrived as {field.type}, expected {want}")
    arr = np.asarray(field.data)
    if kind == "string":
        return bytes(arr.astype(np.uint8)).decode().rstrip("\x00")
    if arr.size != 1:
        raise ValueError(f"{spec.name}: field {name!r} must hold one value, got {arr.size}")
    return int(arr.reshape(-1)[0]) if kind == "int" else float(arr.reshape(-1)[0])


def _fields(trt, spec: PluginSpec, values: Mapping[str, object] | None):
    """A ``PluginFieldCollection`` of ``values`` (or, for ``None``, the creator's field declaration)."""
    out = []
    for a in spec.attrs:
        if a.kind == "string":
            data = np.frombuffer(str(values[a.name]).encode() + b"\x00", np.int8) if values else np.zeros(0, np.int8)
            out.append(trt.PluginField(a.name, data, trt.PluginFieldType.CHAR))
        else:
            type_name, np_type = _FIELD_TYPE[a.kind]
            data = np.array([values[a.name]] if values else [], dtype=np_type)
            out.append(trt.PluginField(a.name, data, getattr(trt.PluginFieldType, type_name)))
    return trt.PluginFieldCollection(out)


# ---- the plugin and its creator --------------------------------------------------------------


class _Dim:
    """An ``IDimensionExpr`` with Python arithmetic (``+ - * //`` with ints or dims, :meth:`maximum`), so
    that the launch rule's length expressions (``trt_plugins._attention.partials_len``), written for ints
    and ``tensorrt.plugin`` shape expressions, also build RTX dimension expressions."""

    def __init__(self, trt, builder, expr) -> None:
        self.trt, self.builder, self.expr = trt, builder, expr

    def _op(self, name: str, other) -> _Dim:
        rhs = other.expr if isinstance(other, _Dim) else self.builder.constant(int(other))
        return _Dim(self.trt, self.builder, self.builder.operation(getattr(self.trt.DimensionOperation, name), self.expr, rhs))

    def __add__(self, other):
        return self._op("SUM", other)

    def __sub__(self, other):
        return self._op("SUB", other)

    def __mul__(self, other):
        return self._op("PROD", other)

    def __floordiv__(self, other):
        return self._op("FLOOR_DIV", other)

    @staticmethod
    def maximum(a, b):
        return a._op("MAX", b) if isinstance(a, _Dim) else b._op("MAX", a)


class _Recorder:
    """What the plugin callbacks saw during one parse/build: the exceptions they raised (TensorRT
    only logs 'Exception caught in ...' and returns an error code) and the fields they serialized."""

    def __init__(self) -> None:
        self.errors: list[str] = []
        self.serialized: list[tuple[str, dict[str, object]]] = []
        self.created: list[str] = []

    def clear(self) -> None:
        self.errors.clear()
        self.serialized.clear()
        self.created.clear()


def _recorded(recorder: _Recorder, what: str, fn, *args):
    try:
        return fn(*args)
    except Exception as exc:
        recorder.errors.append(f"{what}: {type(exc).__name__}: {exc}")
        raise


@functools.cache
def _plugin_classes(trt: ModuleType):
    """The Python IPluginV3 class and its creator class (they derive from the bindings' types)."""

    class UcmRtxPlugin(trt.IPluginV3, trt.IPluginV3OneCore, trt.IPluginV3OneBuild, trt.IPluginV3OneRuntime):
        """One UCM op for TensorRT for RTX's builder: shapes, types and formats from the schema."""

        def __init__(self, spec: PluginSpec, values: Mapping[str, object], recorder: _Recorder) -> None:
            trt.IPluginV3.__init__(self)
            trt.IPluginV3OneCore.__init__(self)
            trt.IPluginV3OneBuild.__init__(self)
            trt.IPluginV3OneRuntime.__init__(self)
            self.plugin_name = spec.name
            self.plugin_namespace = spec.namespace
            self.plugin_version = spec.version
            self.num_outputs = len(spec.outputs)
            self.spec, self.values, self.recorder = spec, dict(values), recorder

        def _where(self, callback: str) -> str:
            return f"{self.spec.plugin_id} {callback}"

        # -- IPluginV3 --
        def get_capability_interface(self, type):
            return self

        def clone(self):
            return UcmRtxPlugin(self.spec, self.values, self.recorder)

        # -- build --
        def get_output_data_types(self, input_types):
            return _recorded(self.recorder, self._where("get_output_data_types"), self._output_types, list(input_types))

        def _output_types(self, input_types):
            schema = self.spec.schema
            if len(input_types) != len(schema.inputs):
                raise ValueError(f"{self.spec.name} takes {len(schema.inputs)} inputs, got {len(input_types)}")
            floats = set()
            for t, dt in zip(schema.inputs, input_types, strict=True):
                allowed = {getattr(trt.DataType, _TRT_TYPE[x]) for x in t.types}
                if dt not in allowed:
                    raise TypeError(f"{self.spec.name}: input {t.name} is {dt}, the schema allows {sorted(t.types)}")
                if "int32" not in t.types:
                    floats.add(dt)
            if len(floats) > 1:
                raise TypeError(f"{self.spec.name}: all float inputs must share one dtype, got {sorted(map(str, floats))}")
            float_type = next(iter(floats), None)
            return [float_type if fixed_type(t) is None else getattr(trt.DataType, _TRT_TYPE[fixed_type(t)])
                    for t in schema.outputs]  # fmt: skip

        def get_output_shapes(self, inputs, shape_inputs, expr_builder):
            return _recorded(self.recorder, self._where("get_output_shapes"), self._output_shapes, inputs, expr_builder)

        def _output_shapes(self, inputs, expr_builder):
            dims = [[d[i] for i in range(len(d))] for d in inputs]
            known = [[e.get_constant_value() if e.is_constant() else None for e in ds] for ds in dims]
            check_input_dims(self.spec, known, self.values)
            wrapped = [[_Dim(trt, expr_builder, e) for e in ds] for ds in dims]
            const = lambda v: _Dim(trt, expr_builder, expr_builder.constant(int(v)))  # noqa: E731
            return [trt.DimsExprs([d.expr for d in output_shape(self.spec, i, wrapped, self.values, const=const,
                                                                maximum=_Dim.maximum)])
                    for i in range(len(self.spec.outputs))]  # fmt: skip

        def supports_format_combination(self, pos, in_out, num_inputs):
            tensors = (*self.spec.schema.inputs, *self.spec.schema.outputs)
            desc = in_out[pos].desc
            t = tensors[pos]
            if desc.format != trt.TensorFormat.LINEAR:
                return False
            if desc.type not in {getattr(trt.DataType, _TRT_TYPE[x]) for x in t.types}:
                return False
            if fixed_type(t) is not None:  # int32 indices / counters, fp32 split partials
                return True
            # every float tensor takes the type of the first float tensor (as the QDP autotune says)
            first = next(i for i, s in enumerate(tensors) if "int32" not in s.types)
            return pos == first or desc.type == in_out[first].desc.type

        def configure_plugin(self, inp, out):
            pass

        def get_workspace_size(self, inp, out):
            return 0

        def get_valid_tactics(self):
            return []

        # -- runtime --
        def set_tactic(self, tactic):
            pass

        def on_shape_change(self, inp, out):
            pass

        def attach_to_context(self, context):
            return self.clone()

        def get_fields_to_serialize(self):
            self.recorder.serialized.append((self.spec.name, dict(self.values)))
            return _fields(trt, self.spec, self.values)

        def enqueue(self, input_desc, output_desc, inputs, outputs, workspace, stream):
            raise RuntimeError(
                f"{self.spec.plugin_id}: the TensorRT-RTX build tier has no kernels; its engines are built and "
                "serialized, never run (use the TensorRT plugins, trt_plugins.register_plugins, to run)"
            )

    class UcmRtxCreator(trt.IPluginCreatorV3One):
        def __init__(self, spec: PluginSpec, recorder: _Recorder) -> None:
            trt.IPluginCreatorV3One.__init__(self)
            self.name = spec.name
            self.plugin_namespace = spec.namespace
            self.plugin_version = spec.version
            self.field_names = _fields(trt, spec, None)
            self.spec, self.recorder = spec, recorder

        def create_plugin(self, name, fc, phase):
            return _recorded(self.recorder, f"{self.spec.plugin_id} create_plugin({name})", self._create, name, fc)

        def _create(self, name, fc):
            from trt_plugins import ops

            got = {f.name: _field_value(trt, self.spec, f) for f in fc}
            values = self.spec.attribute_values(got)  # every field present, exact types
            ops.module(self.spec.name).check(values)  # the TensorRT plugin's own attribute checks
            self.recorder.created.append(name)
            return UcmRtxPlugin(self.spec, values, self.recorder)

    return UcmRtxPlugin, UcmRtxCreator


@dataclass(frozen=True)
class _Registration:
    plugin_ids: tuple[str, ...]
    creators: tuple[object, ...]  # kept alive here: the registry holds them by pointer
    recorder: _Recorder


@functools.cache
def _registration() -> _Registration:
    trt = require_tensorrt_rtx()
    _, creator_cls = _plugin_classes(trt)
    recorder = _Recorder()
    registry = trt.get_plugin_registry()
    creators, ids = [], []
    for _, spec in sorted(all_plugin_specs().items()):
        creator = creator_cls(spec, recorder)
        if not registry.register_creator(creator, spec.namespace):
            raise RuntimeError(f"TensorRT for RTX refused to register the plugin creator {spec.plugin_id}")
        creators.append(creator)
        ids.append(spec.plugin_id)
    return _Registration(tuple(ids), tuple(creators), recorder)


def register_rtx_plugins() -> tuple[str, ...]:
    """Register one Python ``IPluginCreatorV3One`` per UCM op with TensorRT for RTX (once per process).
    Returns the plugin ids. Raises :class:`TensorRTRtxUnavailableError` when RTX is not usable."""
    return _registration().plugin_ids


# ---- parse and build -------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class RtxBuildConfig:
    """An RTX build: the TensorRT builder's shapes (prefill and decode profiles) and one target.

    engine:              the same :class:`EngineBuildConfig` the TensorRT builder takes (its
                         ``plugin_mode`` does not apply: RTX has no AOT/JIT Python plugins).
    compute_capability:  an RTX target, a ``tensorrt_rtx_bindings.ComputeCapability`` name
                         (SM75, SM80, SM86, SM89, SM120, SM121).
    """

    engine: EngineBuildConfig = field(default_factory=EngineBuildConfig)
    compute_capability: str = "SM89"

    def __post_init__(self) -> None:
        if not isinstance(self.engine, EngineBuildConfig):
            raise TypeError(f"RtxBuildConfig.engine must be an EngineBuildConfig, got {type(self.engine).__name__}")
        if not isinstance(self.compute_capability, str) or not self.compute_capability.startswith("SM"):
            raise ValueError(
                f"RtxBuildConfig.compute_capability must be a name like 'SM89', got {self.compute_capability!r}"
            )


@dataclass(frozen=True)
class RtxNetwork:
    """A parsed network: its plugin layers (per UCM op) and its outputs' shapes (-1 = dynamic) and dtypes."""

    plugin_layers: dict[str, int]
    outputs: dict[str, tuple[tuple[int, ...], str]]
    inputs: dict[str, tuple[tuple[int, ...], str]]


@dataclass(frozen=True)
class RtxBuildResult:
    """A serialized TensorRT-for-RTX engine (never a TensorRT engine) and what the build saw."""

    tensorrt_rtx_version: str
    compute_capability: str
    network: RtxNetwork
    profiles: list[dict[str, tuple[tuple[int, ...], ...]]]
    engine: bytes
    serialized_fields: list[tuple[str, dict[str, object]]]
    seconds: float


def _dtype_name(dt) -> str:
    return str(dt).rsplit(".", 1)[-1]


def _parse(trt, model, recorder: _Recorder):
    """``(builder, network, parser, logger)`` for the ONNX ``model`` (ModelProto), strongly typed."""
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(model.SerializeToString()):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise EngineBuildError(
            "TensorRT for RTX's ONNX parser failed: " + "; ".join(errors + recorder.errors)
        )
    return builder, network, parser, logger


def _describe(trt, network, ucm_nodes: int) -> RtxNetwork:
    counts: dict[str, int] = {}
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        if layer.type == trt.LayerType.PLUGIN_V3:
            layer.__class__ = trt.IPluginV3Layer
            core = layer.plugin.get_capability_interface(trt.PluginCapabilityType.CORE)
            counts[core.plugin_name] = counts.get(core.plugin_name, 0) + 1
        elif layer.type in (trt.LayerType.PLUGIN, trt.LayerType.PLUGIN_V2):
            counts["<non-V3 plugin>"] = counts.get("<non-V3 plugin>", 0) + 1
    if sum(counts.values()) < ucm_nodes:
        raise EngineBuildError(
            f"{ucm_nodes} UCM nodes but only {sum(counts.values())} plugin layers after parsing: TensorRT for RTX "
            "imported some UCM nodes through their ONNX function bodies instead of the plugins"
        )

    def tensors(get, n):
        out = {}
        for i in range(n):
            t = get(i)
            out[t.name] = (tuple(int(d) for d in t.shape), _dtype_name(t.dtype))
        return out

    return RtxNetwork(counts, tensors(network.get_output, network.num_outputs), tensors(network.get_input, network.num_inputs))


def _load(model_or_path):
    import onnx

    if isinstance(model_or_path, onnx.ModelProto):
        return model_or_path
    path = Path(model_or_path)
    if not path.is_file():
        raise FileNotFoundError(f"ONNX model {str(path)!r} does not exist")
    return onnx.load(str(path))


def parse_rtx_network(model_or_path, *, sms: int | None = None) -> RtxNetwork:
    """Parse a rewritten model with TensorRT for RTX and the UCM plugins; no build.

    With every input dim fixed (``onnx`` ``dim_value``), the plugin layers' shape inference runs on
    constants and the outputs' shapes come back concrete. ``sms``: stamped as ``num_sms`` on the split
    attention nodes first (as the builders do; their ``split_partials`` length needs it)."""
    trt = require_tensorrt_rtx()
    reg = _registration()
    model = _load(model_or_path)
    if sms is not None:
        model = stamp_split_plan(model, sms)
    ucm_nodes = check_ucm_nodes(model, trt.get_plugin_registry())
    reg.recorder.clear()
    _, network, _, _ = _parse(trt, model, reg.recorder)
    return _describe(trt, network, len(ucm_nodes))


def build_rtx_engine(model_or_path, config: RtxBuildConfig = RtxBuildConfig()) -> RtxBuildResult:
    """Parse ``model_or_path`` (a rewritten ONNX model) with the UCM plugins, add the TensorRT
    builder's two optimization profiles (prefill, decode), and build and serialize an engine for
    ``config.compute_capability``. Raises :class:`EngineBuildError` naming what failed."""
    if not isinstance(config, RtxBuildConfig):
        raise TypeError(f"config must be an RtxBuildConfig, got {type(config).__name__}")
    t0 = time.perf_counter()
    trt = require_tensorrt_rtx()
    cc = getattr(trt.ComputeCapability, config.compute_capability, None)
    if cc is None or config.compute_capability in ("NONE", "CURRENT"):
        valid = [n for n in trt.ComputeCapability.__members__ if n not in ("NONE", "CURRENT")]
        raise ValueError(f"RtxBuildConfig.compute_capability {config.compute_capability!r} is not an RTX target; valid: {valid}")
    reg = _registration()
    model = _load(model_or_path)
    if _split_nodes(model):  # there is no CUDA device here: EngineBuildConfig.sms must be given
        model = stamp_split_plan(model, resolve_sms(config.engine))
    ucm_nodes = check_ucm_nodes(model, trt.get_plugin_registry())
    profiles = profile_shapes(model, config.engine)
    reg.recorder.clear()
    builder, network, _parser, _logger = _parse(trt, model, reg.recorder)
    described = _describe(trt, network, len(ucm_nodes))

    bconfig = builder.create_builder_config()
    bconfig.num_compute_capabilities = 1
    bconfig.set_compute_capability(cc, 0)
    if config.engine.workspace_bytes is not None:
        bconfig.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, config.engine.workspace_bytes)
    for p, shapes in enumerate(profiles):
        prof = builder.create_optimization_profile()
        for name, (lo, op, hi) in shapes.items():
            prof.set_shape(name, lo, op, hi)
        if bconfig.add_optimization_profile(prof) != p:
            raise EngineBuildError(f"TensorRT for RTX rejected optimization profile {p} ({PROFILE_NAMES[p]}): {shapes}")
    plan = builder.build_serialized_network(network, bconfig)
    if plan is None:
        raise EngineBuildError(
            f"TensorRT for RTX could not build the engine for {config.compute_capability}"
            + (": " + "; ".join(reg.recorder.errors) if reg.recorder.errors else " (see the TensorRT-RTX log above)")
        )
    return RtxBuildResult(
        tensorrt_rtx_version=trt.__version__,
        compute_capability=config.compute_capability,
        network=described,
        profiles=profiles,
        engine=bytes(plan),
        serialized_fields=list(reg.recorder.serialized),
        seconds=time.perf_counter() - t0,
    )


def main(argv: list[str] | None = None) -> int:
    """``python -m trt_plugins.rtx [--link-library] [--build MODEL.onnx --out ENGINE ...]``."""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m trt_plugins.rtx", description=__doc__.splitlines()[0])
    ap.add_argument("--link-library", action="store_true",
                    help=f"create the {UNVERSIONED_LIBRARY} link the ONNX parser needs (install step)")
    ap.add_argument("--build", metavar="MODEL.onnx", help="build a rewritten model for an RTX target")
    ap.add_argument("--out", metavar="ENGINE", help="where --build writes the serialized TensorRT-for-RTX engine")
    ap.add_argument("--compute-capability", default="SM89", help="RTX target (default SM89)")
    ap.add_argument("--max-batch", type=int, default=1)
    ap.add_argument("--max-prefill-tokens", type=int, default=1024)
    ap.add_argument("--max-blocks", type=int, default=64)
    ap.add_argument("--sms", type=int, default=None,
                    help="SM count of the target GPU, for the split-K attention (required: no CUDA device here)")
    args = ap.parse_args(argv)  # fmt: skip
    if (args.build is None) != (args.out is None):
        ap.error("--build and --out go together")
    try:
        if args.link_library:
            print(f"TensorRT for RTX: {link_unversioned_library()} -> {_VERSIONED_LIBRARY}")
        trt = require_tensorrt_rtx()
        print(f"TensorRT for RTX {trt.__version__}: usable; UCM plugins {', '.join(register_rtx_plugins())}")
        if args.build is not None:
            engine = EngineBuildConfig(max_batch=args.max_batch, max_prefill_tokens=args.max_prefill_tokens,
                                       max_blocks=args.max_blocks, sms=args.sms)  # fmt: skip
            result = build_rtx_engine(args.build, RtxBuildConfig(engine=engine, compute_capability=args.compute_capability))
            Path(args.out).write_bytes(result.engine)
            layers = ", ".join(f"{n} x{c}" for n, c in sorted(result.network.plugin_layers.items()))
            print(f"{args.out}: TensorRT-for-RTX engine for {result.compute_capability} ({len(result.engine) / 1e6:.1f} MB, "
                  f"plugin layers {layers}, profiles prefill + decode) in {result.seconds:.1f} s; it runs only on an "
                  "RTX GPU and its UCM plugins have no kernels")  # fmt: skip
    except (TensorRTRtxUnavailableError, FileNotFoundError, EngineBuildError, ValueError, TypeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
