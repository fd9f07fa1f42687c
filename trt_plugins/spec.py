"""Plugin specs derived from the UCM op schemas (``ucm_trt.graph.schemas``) -- no TensorRT needed.

Nothing about an op's interface is restated here: names, inputs, outputs, attributes and their
types come from the one schema. This module only maps them onto TensorRT's conventions:

* plugin id ``"<plugin_namespace>::<op name>"``; TensorRT's ONNX parser finds the creator by
  ``op_type`` (= plugin name), the node attribute ``plugin_namespace`` and ``plugin_version``;
* plugin fields = the schema's own attributes (``plugin_namespace`` / ``plugin_version`` route
  the node and are not fields). Schema kinds map to QDP annotations ``int`` / ``float`` / ``str``;
  the parser converts ONNX INT -> INT32, FLOAT -> FLOAT32, STRING -> CHAR (+ trailing NUL);
* output shapes from the schema's symbolic shapes: a symbol is read from the first input that
  carries it, or from the attribute that defines it (``SYMBOL_ATTRIBUTES``), or -- the split
  attention variants' ``split_partials`` -- from the kernel's launch rule (``DERIVED_SYMBOLS``);
* an output whose schema allows one element type (``split_partials``: fp32) has that type; the other
  float outputs take the float inputs' type.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from ucm_trt.graph import schemas as _schemas

__all__ = [
    "PluginSpec",
    "PluginAttr",
    "plugin_spec",
    "all_plugin_specs",
    "SYMBOL_ATTRIBUTES",
    "ROUTING_ATTRIBUTES",
    "parser_field_value",
    "reserved_op_names",
    "output_shape",
    "check_input_dims",
    "fixed_type",
    "DERIVED_SYMBOLS",
]

# Node attributes that route an ONNX node to a plugin creator; they are not plugin fields.
ROUTING_ATTRIBUTES = ("plugin_namespace", "plugin_version")

# Shape symbols of the schemas that an attribute defines (the attribute docs say so: "Hq, query heads").
SYMBOL_ATTRIBUTES: Mapping[str, str] = {
    "Hq": "num_q_heads",
    "Hkv": "num_kv_heads",
    "D": "head_dim",
    "block_size": "block_size",
}

# Output symbols that no input or attribute defines: the plugin's launch rule computes them from the
# other symbols and the field values (ints or shape expressions; ``maximum`` = max of two of them).
DERIVED_SYMBOLS = ("split_partials",)

_KIND_TO_PY = {"int": int, "float": float, "string": str}
# ONNX attribute type the parser must see for each schema kind (onnx.AttributeProto enum names).
_KIND_TO_ONNX = {"int": "INT", "float": "FLOAT", "string": "STRING"}
# TensorRT dtype names (AutoTuneCombination strings) of the schema's element types.
_TYPE_TO_TRT = {"float": "FP32", "float16": "FP16", "bfloat16": "BF16", "int32": "INT32"}


@dataclass(frozen=True)
class PluginAttr:
    name: str
    kind: str  # schema kind: int / float / string
    py_type: type
    onnx_type: str


@dataclass(frozen=True)
class PluginSpec:
    """How one UCM op appears to TensorRT."""

    schema: _schemas.OpSchema
    namespace: str
    name: str
    version: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    attrs: tuple[PluginAttr, ...]

    @property
    def plugin_id(self) -> str:
        return f"{self.namespace}::{self.name}"

    @property
    def attr_names(self) -> tuple[str, ...]:
        return tuple(a.name for a in self.attrs)

    def io_type_combinations(self) -> str:
        """AutoTuneCombination type string: float I/O share one dtype, integer I/O are INT32."""
        parts = []
        for t in (*self.schema.inputs, *self.schema.outputs):
            if set(t.types) <= {"int32"}:
                parts.append("INT32")
            else:
                parts.append("|".join(_TYPE_TO_TRT[x] for x in t.types))
        # '|' = dependent alternatives (all float I/O take the same one); a single type is fixed.
        return ",".join(parts)

    def attribute_values(self, values: Mapping[str, object]) -> dict[str, object]:
        """Plugin field values (registration order, exact Python types) from node attribute values."""
        out: dict[str, object] = {}
        for a in self.attrs:
            if a.name not in values:
                raise ValueError(f"{self.name}: attribute {a.name!r} is required by the plugin (QDP fields have no defaults)")
            out[a.name] = parser_field_value(a, values[a.name])
        return out


def parser_field_value(attr: PluginAttr, value: object) -> object:
    """The value a QDP attribute receives for an ONNX attribute ``value``, as TensorRT converts it.

    INT attributes are narrowed to int32 by the parser (values outside int32 are an error here);
    FLOAT to float32; STRING arrives with a trailing NUL, which the plugin strips.
    """
    import numpy as np

    if attr.kind == "int":
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise TypeError(f"attribute {attr.name} must be an int, got {value!r}")
        if not -(2**31) <= int(value) < 2**31:
            raise ValueError(f"attribute {attr.name} = {value} does not fit int32 (TensorRT's parser narrows INT to INT32)")
        return int(np.int32(value))
    if attr.kind == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float, np.floating)):
            raise TypeError(f"attribute {attr.name} must be a float, got {value!r}")
        return float(np.float32(value))
    if isinstance(value, bytes):
        value = value.decode()
    if not isinstance(value, str):
        raise TypeError(f"attribute {attr.name} must be a string, got {value!r}")
    return value.rstrip("\x00")


def plugin_spec(op_name: str) -> PluginSpec:
    """The :class:`PluginSpec` of UCM op ``op_name`` (read from its schema)."""
    schema = _schemas.get_schema(op_name)
    ns = schema.attribute("plugin_namespace").default
    if ns != _schemas.PLUGIN_NAMESPACE:
        raise ValueError(f"{op_name}: plugin_namespace default {ns!r} differs from {_schemas.PLUGIN_NAMESPACE!r}")
    if schema.version != "1":
        # tensorrt.plugin registers every QDP creator as version "1".
        raise ValueError(f"{op_name}: plugin_version {schema.version!r} cannot be served by a QDP (always version '1')")
    attrs = []
    for a in schema.attributes:
        if a.name in ROUTING_ATTRIBUTES:
            continue
        if a.kind not in _KIND_TO_PY:
            raise ValueError(f"{op_name}.{a.name}: attribute kind {a.kind!r} has no TensorRT plugin field mapping")
        if a.name in ("outputs", "stream", "tactic"):
            raise ValueError(f"{op_name}.{a.name}: {a.name!r} is not allowed as a QDP attribute name")
        attrs.append(PluginAttr(a.name, a.kind, _KIND_TO_PY[a.kind], _KIND_TO_ONNX[a.kind]))
    return PluginSpec(
        schema=schema,
        namespace=ns,
        name=schema.name,
        version=schema.version,
        inputs=tuple(t.name for t in schema.inputs),
        outputs=tuple(t.name for t in schema.outputs),
        attrs=tuple(attrs),
    )


def all_plugin_specs() -> dict[str, PluginSpec]:
    return {name: plugin_spec(name) for name in _schemas.SCHEMAS}


def fixed_type(t: _schemas.TensorSpec) -> str | None:
    """The one element type a tensor of the schema must have (``int32`` indices, ``float`` for the
    split partials), or None where it takes the op's float type."""
    return t.types[0] if len(t.types) == 1 else None


def output_shape(
    spec: PluginSpec,
    output_index: int,
    input_shapes: Sequence[Sequence[object]],
    attrs: Mapping[str, object],
    const: Callable[[int], object] = lambda v: v,
    maximum: Callable[[object, object], object] = max,
) -> list[object]:
    """Output ``output_index``'s shape from the schema's symbols.

    ``input_shapes`` hold per-input dims (ints or TensorRT shape expressions); a symbol takes the
    dim of the first input that carries it, else the value of the attribute that defines it,
    else a literal integer, else (``DERIVED_SYMBOLS``) the plugin's launch rule
    (``trt_plugins._attention.partials_len``). ``const`` wraps attribute/literal ints (e.g. into a
    shape expression); ``maximum`` is the max of two dims (``tensorrt.plugin.max`` for expressions).
    """
    if len(input_shapes) != len(spec.inputs):
        raise ValueError(f"{spec.name} takes {len(spec.inputs)} inputs, got {len(input_shapes)} shapes")
    symbols: dict[str, object] = {}
    for t, dims in zip(spec.schema.inputs, input_shapes, strict=True):
        if len(dims) != len(t.shape):
            raise ValueError(f"{spec.name} input {t.name} must have rank {len(t.shape)} {t.shape}, got rank {len(dims)}")
        for sym, d in zip(t.shape, dims, strict=True):
            if not sym.isdigit():
                symbols.setdefault(sym, d)
    out = []
    for sym in spec.schema.outputs[output_index].shape:
        if sym in symbols:
            out.append(symbols[sym])
        elif sym in SYMBOL_ATTRIBUTES and SYMBOL_ATTRIBUTES[sym] in attrs:
            out.append(const(int(attrs[SYMBOL_ATTRIBUTES[sym]])))  # type: ignore[arg-type]
        elif sym.isdigit():
            out.append(const(int(sym)))
        elif sym in DERIVED_SYMBOLS:
            from trt_plugins._attention import partials_len

            out.append(partials_len(symbols, attrs, spec=spec, maximum=maximum))
        else:
            raise ValueError(f"{spec.name}: output symbol {sym!r} is defined by no input and no attribute")
    return out


def check_input_dims(spec: PluginSpec, dims: Sequence[Sequence[int | None]], attrs: Mapping[str, object]) -> None:
    """Static checks a builder can make on the inputs' dims (``None`` = not known at build time): every
    input has the schema's rank, and every known dim that a literal or an attribute defines equals it
    (a clear error instead of a kernel reading out of bounds). Shared by the QDP and the RTX plugins."""
    if len(dims) != len(spec.inputs):
        raise ValueError(f"{spec.name} takes {len(spec.inputs)} inputs, got {len(dims)} shapes")
    for t, ds in zip(spec.schema.inputs, dims, strict=True):
        if len(ds) != len(t.shape):
            raise ValueError(f"{spec.name}: input {t.name} must have rank {len(t.shape)} {t.shape}, got {len(ds)}")
        for axis, (sym, d) in enumerate(zip(t.shape, ds, strict=True)):
            want = int(sym) if sym.isdigit() else attrs.get(SYMBOL_ATTRIBUTES.get(sym, ""))
            if want is not None and d is not None and d != want:
                raise ValueError(
                    f"{spec.name}: input {t.name} axis {axis} ({sym}) is {d} but the node's attributes say {want}"
                )
    if "split_counters" in spec.inputs:
        _check_counters(spec, dims, attrs)


def _check_counters(spec: PluginSpec, dims: Sequence[Sequence[int | None]], attrs: Mapping[str, object]) -> None:
    """A split variant's ``split_counters`` must hold a counter for every tile the kernel may run at the
    largest known ``B`` x ``T`` (a shorter buffer would be written out of bounds): checked where the
    three dims are build-time constants (``ucm-trt build`` fixes the counters' length per profile)."""
    from trt_plugins._attention import counters_needed

    by_name = dict(zip(spec.inputs, dims, strict=True))
    n, b, t = by_name["split_counters"][0], by_name["q"][0], by_name["q"][2]
    if n is None or b is None or t is None:
        return
    need = counters_needed(int(b), int(t), attrs, spec=spec)
    if n < need:
        raise ValueError(
            f"{spec.name}: input split_counters has {n} elements but a launch at B={b}, T={t} may use {need} "
            "(one int32 counter per row x KV head x query tile of the smallest query tile); feed a zeroed "
            "buffer at least that long (ucm-trt build sizes the attn_split_counters input)"
        )


def reserved_op_names() -> set[str]:
    """Op names a UCM plugin must not use: every ONNX schema (all domains, all versions) and
    TensorRT's own ONNX custom ops (``TRT_*``, e.g. ``TRT_Attention``)."""
    import onnx.defs

    names = {s.name for s in onnx.defs.get_all_schemas_with_history()}
    names |= {"TRT_Attention", "TRT_KVCacheUpdate", "TRT_MoE"}
    return names
