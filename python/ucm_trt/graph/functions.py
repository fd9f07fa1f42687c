"""ONNX model-local function bodies of the UCM ops, in standard ONNX ops only.

ONNX Runtime inlines these, so a rewritten model runs with no custom-op library; TensorRT
(>= 10.15, or with ENABLE_PLUGIN_OVERRIDE) takes the plugin instead because the nodes carry
``plugin_namespace``. Signatures (inputs, outputs, attribute names) come from ``schemas.py``;
only the computation is written here. Bodies use ops whose semantics are unchanged from
opset 15 to 23, and each function imports the default domain at the model's opset.

Body layout (sparse and ReRoPE):
  gather the pool by block table -> past K/V [B, Hkv, M*bs, D]; concatenate the chunk -> [B, Hkv, L, D]
  visible(i, p) = past p: p < past_len and block p//bs selected;  chunk p: p <= i
  scores [B, Hkv, G, T, L] = q grouped by KV head @ K^T * scale, masked to -inf, softmax, @ V.
"""

from __future__ import annotations

import itertools

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ucm_trt.graph.schemas import (
    DOMAIN,
    PAGED_REROPE_ATTENTION,
    PAGED_SPARSE_ATTENTION,
    SELECT_ALL_BLOCKS,
    SPLIT_OPS,
    OpSchema,
    get_schema,
)

__all__ = ["build_function", "MIN_OPSET"]

# Shape(start, end) needs opset 15; everything else in the bodies is stable from there to 23.
MIN_OPSET = 15


class _Body:
    """Collects nodes of one function body with unique value names."""

    def __init__(self, prefix: str) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self._ids = itertools.count()
        self._prefix = prefix

    def _name(self, hint: str) -> str:
        return f"{self._prefix}_{hint}_{next(self._ids)}"

    def op(self, op_type: str, *inputs: str, hint: str | None = None, **attrs) -> str:
        out = self._name(hint or op_type.lower())
        self.nodes.append(helper.make_node(op_type, list(inputs), [out], **attrs))
        return out

    def const(self, value, dtype=np.int64, hint: str = "c") -> str:
        arr = np.asarray(value, dtype=dtype)
        out = self._name(hint)
        self.nodes.append(helper.make_node("Constant", [], [out], value=numpy_helper.from_array(arr, out)))
        return out

    def attr_const(self, attr: str, kind: str) -> str:
        """A Constant whose value is the function attribute ``attr`` (a scalar)."""
        out = self._name(attr)
        field = {"float": "value_float", "int": "value_int"}[kind]
        node = helper.make_node("Constant", [], [out])
        a = onnx.AttributeProto()
        a.name = field
        a.ref_attr_name = attr
        a.type = onnx.AttributeProto.FLOAT if kind == "float" else onnx.AttributeProto.INT
        node.attribute.append(a)
        self.nodes.append(node)
        return out

    def dim(self, x: str, axis: int) -> str:
        """Size of ``x`` along ``axis`` as an int64 tensor of shape [1]."""
        return self.op("Shape", x, start=axis, end=axis + 1, hint="dim")

    def scalar(self, x1: str) -> str:
        return self.op("Squeeze", x1, self.const([0]), hint="scalar")

    def arange(self, n1: str) -> str:
        """int64 arange(n) from a [1]-shaped size."""
        return self.op("Range", self.const(0), self.scalar(n1), self.const(1), hint="arange")


def _paged_common(b: _Body):
    """Shared front half: past K/V gathered from the pool, positions and the visibility mask.

    Returns a dict of value names.
    """
    B, Hq, T, D = (b.dim("q", i) for i in range(4))
    Hkv = b.dim("k", 1)
    G = b.op("Div", Hq, Hkv, hint="group")
    bs = b.dim("kv_pool", 3)
    # [B, M, 2, Hkv, bs, D] -> K, V each [B, Hkv, M*bs, D]
    g = b.op("Gather", "kv_pool", b.op("Cast", "block_table", to=TensorProto.INT64), axis=0, hint="blocks")
    past_shape = b.op("Concat", B, Hkv, b.const([-1]), D, axis=0, hint="past_shape")
    kp = b.op("Reshape", b.op("Transpose", b.op("Gather", g, b.const(0), axis=2), perm=[0, 2, 1, 3, 4]), past_shape)
    vp = b.op("Reshape", b.op("Transpose", b.op("Gather", g, b.const(1), axis=2), perm=[0, 2, 1, 3, 4]), past_shape)
    k_all = b.op("Concat", kp, "k", axis=2, hint="k_all")
    v_all = b.op("Concat", vp, "v", axis=2, hint="v_all")
    Lp = b.dim(kp, 2)
    p = b.arange(Lp)  # logical positions of the gathered past slots
    past_len = b.op("Sub", b.op("Cast", "seq_lens", to=TensorProto.INT64), b.scalar(T), hint="past_len")  # [B]
    in_past = b.op(
        "Less", b.op("Unsqueeze", p, b.const([0])), b.op("Unsqueeze", past_len, b.const([1])), hint="in_past"
    )  # [B, Lp]
    # selection -> per-block flag [B, Hkv, M] -> per-slot flag [B, Hkv, Lp]
    M = b.dim("block_table", 1)
    hit = b.op(
        "Equal",
        b.op("Unsqueeze", b.op("Cast", "selection", to=TensorProto.INT64), b.const([3])),
        b.arange(M),
        hint="hit",
    )  # [B, Hkv, S, M]
    hits = b.op("ReduceSum", b.op("Cast", hit, to=TensorProto.INT32), b.const([2]), keepdims=0)
    blk_sel = b.op("Greater", hits, b.const(0, np.int32), hint="blk_sel")  # [B, Hkv, M]
    slot_sel = b.op("Gather", blk_sel, b.op("Div", p, b.scalar(bs)), axis=2, hint="slot_sel")  # [B, Hkv, Lp]
    vis_past = b.op("And", slot_sel, b.op("Unsqueeze", in_past, b.const([1])), hint="vis_past")
    one = b.const([1])
    vis_past = b.op(
        "Expand",
        b.op("Unsqueeze", vis_past, b.const([2, 3])),
        b.op("Concat", B, Hkv, one, T, Lp, axis=0),
        hint="vis_past5",
    )  # [B, Hkv, 1, T, Lp]
    t = b.arange(T)
    causal = b.op(
        "LessOrEqual", b.op("Unsqueeze", t, b.const([0])), b.op("Unsqueeze", t, b.const([1])), hint="causal"
    )  # [T(query), T(key)]: key j <= query i
    causal = b.op("Expand", causal, b.op("Concat", B, Hkv, one, T, T, axis=0), hint="causal5")
    mask = b.op("Concat", vis_past, causal, axis=4, hint="mask")  # [B, Hkv, 1, T, L]
    q5_shape = b.op("Concat", B, Hkv, G, T, D, axis=0, hint="q5_shape")
    out_shape = b.op("Concat", B, Hq, T, D, axis=0, hint="out_shape")
    return dict(
        B=B, Hq=Hq, T=T, D=D, Hkv=Hkv, k_all=k_all, v_all=v_all, p=p, past_len=past_len, t=t,
        mask=mask, q5_shape=q5_shape, out_shape=out_shape,
    )  # fmt: skip


def _softmax_pv(b: _Body, scores: str, c: dict) -> str:
    """Mask, softmax over keys, multiply by V; returns output [B, Hq, T, D]."""
    neg = b.op("CastLike", b.const(-np.inf, np.float32), scores, hint="neg_inf")
    probs = b.op("Softmax", b.op("Where", c["mask"], scores, neg), axis=-1, hint="probs")
    o = b.op("MatMul", probs, b.op("Unsqueeze", c["v_all"], b.const([2])), hint="pv")  # [B, Hkv, G, T, D]
    b.nodes.append(helper.make_node("Reshape", [o, c["out_shape"]], ["output"]))
    return "output"


def _scaled(b: _Body, x: str) -> str:
    return b.op("Mul", x, b.op("CastLike", b.attr_const("scale", "float"), x), hint="scaled")


def _qk(b: _Body, q4: str, k4: str, c: dict) -> str:
    q5 = b.op("Reshape", q4, c["q5_shape"], hint="q5")
    kt = b.op("Transpose", b.op("Unsqueeze", k4, b.const([2])), perm=[0, 1, 2, 4, 3], hint="kt")
    return b.op("MatMul", q5, kt, hint="qk")  # [B, Hkv, G, T, L]


def _sparse_body(b: _Body) -> None:
    c = _paged_common(b)
    _softmax_pv(b, _scaled(b, _qk(b, "q", c["k_all"], c)), c)


def _rope(b: _Body, x: str, pos: str, inv_freq: str) -> str:
    """NeoX RoPE of x [..., n, D] at int64 positions broadcastable to x.shape[:-1]."""
    ang = b.op(
        "Mul", b.op("Unsqueeze", b.op("CastLike", pos, inv_freq), b.const([-1])), inv_freq, hint="ang"
    )  # [..., D/2]
    ang = b.op("Concat", ang, ang, axis=-1)
    cos = b.op("CastLike", b.op("Cos", ang), x)
    sin = b.op("CastLike", b.op("Sin", ang), x)
    half = b.op("Div", b.op("Shape", x, start=-1), b.const([2]), hint="half")
    x1 = b.op("Slice", x, b.const([0]), half, b.const([-1]), hint="x1")
    x2 = b.op("Slice", x, half, b.const([np.iinfo(np.int64).max]), b.const([-1]), hint="x2")
    rot = b.op("Concat", b.op("Neg", x2), x1, axis=-1, hint="rot_half")
    return b.op("Add", b.op("Mul", x, cos), b.op("Mul", rot, sin), hint="roped")


def _rerope_body(b: _Body) -> None:
    c = _paged_common(b)
    # inv_freq = theta ** (-arange(0, D, 2) / D), in float32
    d_f = b.op("Cast", b.scalar(c["D"]), to=TensorProto.FLOAT)
    evens = b.op("Cast", b.op("Range", b.const(0), b.scalar(c["D"]), b.const(2)), to=TensorProto.FLOAT)
    inv_freq = b.op("Pow", b.attr_const("rope_theta", "float"), b.op("Neg", b.op("Div", evens, d_f)), hint="inv_freq")
    pos_q = b.op(
        "Add", b.op("Unsqueeze", c["past_len"], b.const([1])), b.op("Unsqueeze", c["t"], b.const([0])), hint="pos_q"
    )  # [B, T]
    Lp = b.dim(c["p"], 0)
    pos_past = b.op("Expand", b.op("Unsqueeze", c["p"], b.const([0])), b.op("Concat", c["B"], Lp, axis=0))
    pos_k = b.op("Concat", pos_past, pos_q, axis=1, hint="pos_k")  # [B, L]
    # log-n scaling of q: max(1, log(pos+1)/log(L)) when logn_training_length > 0
    lt = b.attr_const("logn_training_length", "int")
    pos_qf = b.op("Cast", pos_q, to=TensorProto.FLOAT)
    ratio = b.op(
        "Div",
        b.op("Log", b.op("Add", pos_qf, b.const(1.0, np.float32))),
        b.op("Log", b.op("Cast", lt, to=TensorProto.FLOAT)),
    )
    factor = b.op("Max", ratio, b.const(1.0, np.float32))
    factor = b.op("Where", b.op("Greater", lt, b.const(0)), factor, b.const(1.0, np.float32), hint="logn")
    q = b.op("Mul", "q", b.op("CastLike", b.op("Unsqueeze", factor, b.const([1, 3])), "q"), hint="q_logn")
    q_in = _rope(b, q, b.op("Unsqueeze", pos_q, b.const([1])), inv_freq)  # [B, Hq, T, D]
    window = b.attr_const("rerope_window", "int")
    q_out = _rope(b, q, window, inv_freq)
    k_in = _rope(b, c["k_all"], b.op("Unsqueeze", pos_k, b.const([1])), inv_freq)
    s_in = _qk(b, q_in, k_in, c)
    s_out = _qk(b, q_out, c["k_all"], c)
    rel = b.op(
        "Sub", b.op("Unsqueeze", pos_q, b.const([2])), b.op("Unsqueeze", pos_k, b.const([1])), hint="rel"
    )  # [B, T, L]
    inside = b.op("Less", b.op("Unsqueeze", rel, b.const([1, 2])), window, hint="inside")  # [B, 1, 1, T, L]
    _softmax_pv(b, _scaled(b, b.op("Where", inside, s_in, s_out)), c)


def _select_all_body(b: _Body) -> None:
    B = b.dim("block_table", 0)
    M = b.dim("block_table", 1)
    hkv = b.op("Unsqueeze", b.attr_const("num_kv_heads", "int"), b.const([0]))
    ids = b.op("Cast", b.arange(M), to=TensorProto.INT32)
    shape = b.op("Concat", B, hkv, M, axis=0)
    b.nodes.append(helper.make_node("Expand", [ids, shape], ["selection"]))


def _split_body(body):
    """The body of a split-K variant (``schemas.SPLIT_OPS``): ``body`` computes ``output`` exactly as
    for the v1 op (``split_counters`` is not read: the function has no splits); ``split_partials``,
    scratch that nothing consumes, is an empty fp32 tensor."""

    def build(b: _Body) -> None:
        body(b)
        empty = numpy_helper.from_array(np.zeros([0], dtype=np.float32), "split_partials")
        b.nodes.append(helper.make_node("Constant", [], ["split_partials"], value=empty))

    return build


_BODIES = {
    PAGED_SPARSE_ATTENTION.name: _sparse_body,
    PAGED_REROPE_ATTENTION.name: _rerope_body,
    SELECT_ALL_BLOCKS.name: _select_all_body,
    SPLIT_OPS[PAGED_SPARSE_ATTENTION.name].name: _split_body(_sparse_body),
    SPLIT_OPS[PAGED_REROPE_ATTENTION.name].name: _split_body(_rerope_body),
}


def build_function(op_name: str, *, opset: int) -> onnx.FunctionProto:
    """The model-local FunctionProto of UCM op ``op_name`` for a model at default-domain ``opset``."""
    schema: OpSchema = get_schema(op_name)
    if isinstance(opset, bool) or not isinstance(opset, int) or opset < MIN_OPSET:
        raise ValueError(f"opset must be an int >= {MIN_OPSET} for UCM function bodies, got {opset!r}")
    b = _Body(schema.name)
    _BODIES[schema.name](b)
    fn = helper.make_function(
        DOMAIN,
        schema.name,
        [t.name for t in schema.inputs],
        [t.name for t in schema.outputs],
        b.nodes,
        opset_imports=[helper.make_opsetid("", opset)],
        attributes=[a.name for a in schema.all_attributes],
        doc_string=schema.summary + " " + schema.semantics,
    )
    return fn


_ELEM = {"float": TensorProto.FLOAT, "float16": TensorProto.FLOAT16, "bfloat16": TensorProto.BFLOAT16,
         "int32": TensorProto.INT32}  # fmt: skip


def make_single_op_model(op_name: str, *, opset: int = 20, dtype: str = "float", **attrs) -> onnx.ModelProto:
    """A model holding one UCM node (all inputs dynamic) plus its function: for op-level tests
    and for checking a plugin against ONNX Runtime."""
    from ucm_trt.graph.schemas import node_attributes

    schema = get_schema(op_name)
    if dtype not in FLOAT_DTYPES:
        raise ValueError(f"dtype must be one of {FLOAT_DTYPES}, got {dtype!r}")
    full = node_attributes(schema, **attrs)

    def vi(t):
        elem = _ELEM[t.types[0]] if len(t.types) == 1 else _ELEM[dtype]  # one allowed type (int32, fp32 scratch)
        return helper.make_tensor_value_info(t.name, elem, list(t.shape))

    node = helper.make_node(schema.name, [t.name for t in schema.inputs], [t.name for t in schema.outputs],
                            domain=DOMAIN, **full)  # fmt: skip
    graph = helper.make_graph([node], schema.name, [vi(t) for t in schema.inputs], [vi(t) for t in schema.outputs])
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid(DOMAIN, 1)],
        functions=[build_function(op_name, opset=opset)],
    )
    model.ir_version = 10
    return model


FLOAT_DTYPES = ("float", "float16", "bfloat16")
