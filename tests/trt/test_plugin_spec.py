"""CPU tier: schema -> plugin mapping and the ONNX node attributes TensorRT's parser needs."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from trt_plugins import INSTALL_HINT, TensorRTUnavailableError, ops
from trt_plugins.spec import (
    ROUTING_ATTRIBUTES,
    all_plugin_specs,
    check_input_dims,
    output_shape,
    parser_field_value,
    plugin_spec,
    reserved_op_names,
)
from ucm_trt.graph.functions import make_single_op_model
from ucm_trt.graph.schemas import DOMAIN, PLUGIN_NAMESPACE, SCHEMAS

_ATTRS = {
    "UcmPagedSparseAttention": dict(num_q_heads=4, num_kv_heads=2, head_dim=32, block_size=16, scale=0.125),
    "UcmPagedReRoPEAttention": dict(num_q_heads=4, num_kv_heads=2, head_dim=32, block_size=16, scale=0.125,
                                    rope_theta=10000.0, rerope_window=8, logn_training_length=16),
    "UcmSelectAllBlocks": dict(num_kv_heads=2),
}  # fmt: skip
_ATTRS["UcmPagedSparseAttentionSplitK"] = dict(_ATTRS["UcmPagedSparseAttention"], num_sms=132)
_ATTRS["UcmPagedReRoPEAttentionSplitK"] = dict(_ATTRS["UcmPagedReRoPEAttention"], num_sms=132)


def test_every_schema_has_a_plugin_module_and_spec():
    assert ops.missing_plugin_modules() == []
    assert set(all_plugin_specs()) == set(SCHEMAS) == set(ops.OP_MODULES)
    for name in SCHEMAS:
        assert ops.module(name).SPEC == plugin_spec(name)
    with pytest.raises(ValueError, match="no TensorRT plugin module"):
        ops.module("UcmNoSuchOp")


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_spec_reads_the_schema(name):
    schema, spec = SCHEMAS[name], plugin_spec(name)
    assert spec.plugin_id == f"{PLUGIN_NAMESPACE}::{name}"
    assert spec.inputs == tuple(t.name for t in schema.inputs)
    assert spec.outputs == tuple(t.name for t in schema.outputs)
    # plugin fields = the op's own attributes, in schema order; routing attributes are not fields
    assert spec.attr_names == tuple(a.name for a in schema.attributes if a.name not in ROUTING_ATTRIBUTES)
    kinds = {"int": int, "float": float, "string": str}
    for a in spec.attrs:
        assert a.py_type is kinds[schema.attribute(a.name).kind]
        assert a.name not in ("outputs", "stream", "tactic")  # forbidden QDP attribute names


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_op_name_collides_with_no_builtin(name):
    assert name not in reserved_op_names()
    assert not name.startswith("TRT_")
    assert {"Attention", "RotaryEmbedding", "TRT_Attention"} <= reserved_op_names()


# The plugin fields each op's QDP declares, written out by hand from the op docs (docs/graph.md): name,
# registration order and the Python annotation tensorrt.plugin gives the field. Independent of
# trt_plugins.spec, so a spec that reorders, drops or retypes a field fails against it.
_FIELDS = {
    "UcmPagedSparseAttention": {"num_q_heads": int, "num_kv_heads": int, "head_dim": int, "block_size": int,
                                "scale": float},
    "UcmPagedReRoPEAttention": {"num_q_heads": int, "num_kv_heads": int, "head_dim": int, "block_size": int,
                                "scale": float, "rope_theta": float, "rerope_window": int, "logn_training_length": int},
    "UcmSelectAllBlocks": {"num_kv_heads": int},
}  # fmt: skip
# the split-K variants: the v1 fields, then num_sms; the v1 tensors, then the counters
_FIELDS["UcmPagedSparseAttentionSplitK"] = {**_FIELDS["UcmPagedSparseAttention"], "num_sms": int}
_FIELDS["UcmPagedReRoPEAttentionSplitK"] = {**_FIELDS["UcmPagedReRoPEAttention"], "num_sms": int}
_TENSORS = {
    "UcmPagedSparseAttention": ("q", "k", "v", "kv_pool", "block_table", "seq_lens", "selection"),
    "UcmPagedReRoPEAttention": ("q", "k", "v", "kv_pool", "block_table", "seq_lens", "selection"),
    "UcmSelectAllBlocks": ("block_table",),
}
_TENSORS["UcmPagedSparseAttentionSplitK"] = (*_TENSORS["UcmPagedSparseAttention"], "split_counters")
_TENSORS["UcmPagedReRoPEAttentionSplitK"] = (*_TENSORS["UcmPagedReRoPEAttention"], "split_counters")
# TensorRT's ONNX parser: INT -> INT32 field, FLOAT -> FLOAT32 field, STRING -> CHAR + NUL
# (shared/reference/tensorrt.md §1). The ONNX side of each pair is checked against the enum onnx assigns.
_ONNX_TYPE_OF_FIELD = {int: onnx.AttributeProto.INT, float: onnx.AttributeProto.FLOAT}
_INT32 = np.iinfo(np.int32)


def _onnx_stored(name: str, value: object) -> object:
    """What an ONNX AttributeProto holds for ``value`` (FLOAT is a 32-bit proto field), read back."""
    return onnx.helper.get_attribute_value(onnx.helper.make_attribute(name, value))


def _onnx_stored_type(name: str, value: object) -> int:
    """The AttributeProto type onnx assigns to a Python ``value``."""
    return onnx.helper.make_attribute(name, value).type


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_onnx_node_carries_what_the_parser_needs(name):
    """op_type = plugin name, plugin_namespace / plugin_version as STRING attributes, every plugin field
    with the ONNX type onnx itself gives a Python value of the field's type; ONNX Runtime accepts the
    node; the values the plugin receives equal what the serialized proto holds, in the QDP's types."""
    spec = plugin_spec(name)
    model = onnx.load_from_string(make_single_op_model(name, **_ATTRS[name]).SerializeToString())
    onnx.checker.check_model(model)
    # ONNX Runtime refuses a node whose attribute types do not match the function's (an INT scale, say)
    ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    (node,) = [n for n in model.graph.node if n.domain == DOMAIN]
    assert node.op_type == name
    attrs = {a.name: a for a in node.attribute}
    assert attrs["plugin_namespace"].type == _onnx_stored_type("ns", "ucm") == onnx.AttributeProto.STRING
    assert attrs["plugin_namespace"].s == b"ucm"
    assert attrs["plugin_version"].type == onnx.AttributeProto.STRING
    assert attrs["plugin_version"].s == b"1"
    assert any(o.domain == DOMAIN for o in model.opset_import)
    fields = _FIELDS[name]
    for field, py_type in fields.items():
        assert field in attrs, f"node lacks plugin field {field}"
        assert attrs[field].type == _ONNX_TYPE_OF_FIELD[py_type] == _onnx_stored_type(field, py_type(1))
    # what the plugin receives after the parser's INT->INT32 / FLOAT->FLOAT32 conversion
    got = spec.attribute_values({k: onnx.helper.get_attribute_value(v) for k, v in attrs.items()})
    assert list(got) == list(fields)
    for k, v in got.items():
        assert type(v) is fields[k], (k, type(v))
        assert v == _onnx_stored(k, fields[k](_ATTRS[name][k])), k


def test_parser_field_conversion():
    """INT fields are int32 (np.iinfo bounds, both ends); FLOAT fields carry exactly the float32 the ONNX
    proto stores; STRING fields arrive with a trailing NUL that the plugin strips."""
    spec = plugin_spec("UcmPagedReRoPEAttention")
    a = {x.name: x for x in spec.attrs}
    for v in (8, 0, -1, int(_INT32.min), int(_INT32.max), np.int64(5)):
        assert parser_field_value(a["rerope_window"], v) == int(v)
        assert type(parser_field_value(a["rerope_window"], v)) is int
    for v in (int(_INT32.max) + 1, int(_INT32.min) - 1, 2**40):
        with pytest.raises(ValueError, match="does not fit int32"):
            parser_field_value(a["rerope_window"], v)
    for v in (0.1, 1 / 96**0.5, 10000.0, 1e-40, 3.0e38, 2):
        got = parser_field_value(a["scale"], v)
        assert type(got) is float and got == _onnx_stored("scale", float(v)), v
    assert parser_field_value(a["scale"], 0.1) != 0.1  # rounded through float32, as TensorRT delivers it
    with pytest.raises(TypeError, match="rerope_window"):
        parser_field_value(a["rerope_window"], 8.0)
    from trt_plugins.spec import PluginAttr

    stored = _onnx_stored("mode", "abc")  # bytes, as the proto holds a STRING attribute
    assert parser_field_value(PluginAttr("mode", "string", str, "STRING"), stored + b"\x00") == "abc"
    with pytest.raises(ValueError, match="required by the plugin"):
        spec.attribute_values({"num_q_heads": 4})


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_output_shapes_from_schema_symbols(name):
    spec = plugin_spec(name)
    dims = {"B": 3, "Hq": 4, "Hkv": 2, "T": 5, "D": 32, "num_blocks": 11, "2": 2, "block_size": 16,
            "max_blocks": 7, "S": 6, "split_counters": 100}  # fmt: skip
    shapes = [[dims[s] for s in t.shape] for t in spec.schema.inputs]
    out = output_shape(spec, 0, shapes, _ATTRS[name])
    want = {"UcmPagedSparseAttention": [3, 4, 5, 32], "UcmPagedReRoPEAttention": [3, 4, 5, 32],
            "UcmSelectAllBlocks": [3, 2, 7], "UcmPagedSparseAttentionSplitK": [3, 4, 5, 32],
            "UcmPagedReRoPEAttentionSplitK": [3, 4, 5, 32]}[name]  # fmt: skip
    assert out == want
    if name.endswith("SplitK"):
        # partials, by hand: the launch rule wants 132 SMs x programs_per_sm programs; the decode tactic's
        # 16-row tile holds 8 tokens of group 2, so T = 5 is one query tile: 3 x 2 = 6 tiles, and
        # ceil(132 * pps / 6) splits of 16 rows x (32 + 1) fp32 each; the prefill tactic's 64-row tile
        # (32 tokens: the same 6 tiles and splits, 4x the rows) is the largest candidate
        from ucm_trt.kernels.attention import DEFAULT_LAUNCH

        splits = -(-132 * DEFAULT_LAUNCH.programs_per_sm // 6)
        assert output_shape(spec, 1, shapes, _ATTRS[name]) == [6 * splits * 64 * 33]
    with pytest.raises(ValueError, match="rank"):
        output_shape(spec, 0, [s[:-1] for s in shapes], _ATTRS[name])


def test_input_dims_checked_against_rank_literals_and_attributes():
    spec = plugin_spec("UcmPagedSparseAttention")
    attrs = _ATTRS["UcmPagedSparseAttention"]
    ok = [[None, 4, None, 32], [None, 2, None, 32], [None, 2, None, 32], [None, 2, 2, 16, 32], [None, None], [None],
          [None, 2, None]]  # fmt: skip
    check_input_dims(spec, ok, attrs)
    check_input_dims(spec, [[None] * len(d) for d in ok], attrs)  # nothing known: nothing to contradict
    bad_q = [[2, 8, 3, 32], *ok[1:]]
    with pytest.raises(ValueError, match=r"input q axis 1 \(Hq\) is 8 but the node's attributes say 4"):
        check_input_dims(spec, bad_q, attrs)
    bad_pool = [*ok[:3], [None, 3, 2, 16, 32], *ok[4:]]
    with pytest.raises(ValueError, match=r"input kv_pool axis 1 \(2\) is 3 but the node's attributes say 2"):
        check_input_dims(spec, bad_pool, attrs)
    with pytest.raises(ValueError, match=r"input seq_lens must have rank 1 \('B',\), got 2"):
        check_input_dims(spec, [*ok[:5], [None, None], ok[6]], attrs)
    with pytest.raises(ValueError, match="takes 7 inputs, got 6 shapes"):
        check_input_dims(spec, ok[:6], attrs)


def test_plugin_geometry_rejects_bad_attributes():
    m = ops.module("UcmPagedSparseAttention")
    with pytest.raises(ValueError, match="num_q_heads"):
        m.check(dict(_ATTRS["UcmPagedSparseAttention"], num_q_heads=3))
    with pytest.raises(ValueError, match="block_size"):
        m.check(dict(_ATTRS["UcmPagedSparseAttention"], block_size=24))
    ops.module("UcmPagedReRoPEAttention").check(_ATTRS["UcmPagedReRoPEAttention"])


def test_register_without_tensorrt_is_one_line_error_naming_the_extra():
    import trt_plugins

    try:
        import tensorrt  # noqa: F401
    except Exception:
        pass
    else:
        pytest.skip("TensorRT is importable here; the missing-TensorRT message cannot be observed")
    with pytest.raises(TensorRTUnavailableError) as ei:
        trt_plugins.register_plugins()
    msg = str(ei.value)
    assert "\n" not in msg and INSTALL_HINT in msg


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_qdp_parameter_lists_follow_the_validated_schema(name):
    """tensorrt.plugin checks names and order: tensors, attributes (registration order), then
    outputs/stream/tactic; aot_impl must declare every attribute and end with (outputs, tactic).
    Expected lists are the hand-written interface above, not the spec's own fields."""
    from trt_plugins._qdp import parameter_names

    names = parameter_names(plugin_spec(name))
    tensors, fields = _TENSORS[name], tuple(_FIELDS[name])
    assert names == {
        "register": tensors + fields,
        "impl": tensors + fields + ("outputs", "stream", "tactic"),
        "aot_impl": tensors + fields + ("outputs", "tactic"),
        "autotune": tensors + ("outputs",),
    }
