"""Checks shared by the TensorRT-for-RTX build tests: build a rewritten model for an RTX target and
compare what TensorRT for RTX inferred with what ONNX Runtime computes on the same graph.

Output shapes are checked at concrete points: the model's inputs are fixed to the profile's min and
max shapes (``fixed_inputs``), TensorRT for RTX parses that copy (its plugin layers' shape inference
then runs on constants and the outputs come back concrete), and ONNX Runtime runs the rewritten model
(the UCM nodes through their function bodies) on valid inputs of the same shapes.
"""

from __future__ import annotations

import collections

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper

from trt_plugins.build import EngineBuildConfig, profile_shapes, split_counters_length, stamp_split_plan
from trt_plugins.rtx import RtxBuildConfig, RtxBuildResult, build_rtx_engine, parse_rtx_network
from trt_plugins.spec import plugin_spec
from ucm_trt.graph.schemas import DOMAIN

# numpy dtype of an ONNX Runtime output -> TensorRT DataType name
TRT_DTYPE = {"float32": "FLOAT", "float16": "HALF", "int32": "INT32", "int64": "INT64", "bool": "BOOL"}


def ucm_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    return [n for n in model.graph.node if n.domain == DOMAIN]


def node_fields(node: onnx.NodeProto) -> dict[str, object]:
    """The plugin field values of a UCM node, as the parser converts them (int32, float32, str)."""
    spec = plugin_spec(node.op_type)
    return spec.attribute_values({a.name: helper.get_attribute_value(a) for a in node.attribute})


def fixed_inputs(model: onnx.ModelProto, shapes: dict[str, tuple[int, ...]]) -> onnx.ModelProto:
    """A copy of ``model`` whose graph inputs have the concrete ``shapes``."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for vi in out.graph.input:
        if vi.name not in shapes:
            continue
        dims = vi.type.tensor_type.shape.dim
        if len(dims) != len(shapes[vi.name]):
            raise ValueError(f"input {vi.name} has rank {len(dims)}, shape {shapes[vi.name]} given")
        for d, v in zip(dims, shapes[vi.name], strict=True):
            d.Clear()
            d.dim_value = int(v)
    return out


def valid_feeds(model: onnx.ModelProto, shapes: dict[str, tuple[int, ...]], block_size: int) -> dict[str, np.ndarray]:
    """Inputs of the given shapes that a rewritten model accepts: a chunk of T tokens with no past
    (``seq_lens = T``), in-range block tables, selections of the chunk's blocks (-1 padded)."""
    elem = {vi.name: helper.tensor_dtype_to_np_dtype(vi.type.tensor_type.elem_type) for vi in model.graph.input}
    feeds = {}
    b, t = shapes["input_ids"]
    for name, shape in shapes.items():
        if name == "input_ids":
            feeds[name] = np.zeros(shape, elem[name])
        elif name == "position_ids":
            feeds[name] = np.broadcast_to(np.arange(t), shape).astype(elem[name])
        elif name == "seq_lens":
            feeds[name] = np.full(shape, t, elem[name])
        elif name == "block_table":
            n = shapes[next(k for k in shapes if k.startswith("kv_pool"))][0]
            feeds[name] = (np.arange(shape[0] * shape[1]).reshape(shape) % n).astype(elem[name])
        elif name.startswith("kv_pool"):
            feeds[name] = np.random.default_rng(0).standard_normal(shape).astype(elem[name])
        elif name == "attn_split_counters":  # the split-K counters: zeros (the function bodies ignore them)
            feeds[name] = np.zeros(shape, elem[name])
        elif name.startswith("selection"):
            used = -(-t // block_size)
            ids = np.where(np.arange(shape[2]) < used, np.arange(shape[2]), -1)
            feeds[name] = np.broadcast_to(ids, shape).astype(elem[name])
        else:
            raise ValueError(f"no feed rule for input {name!r}")
    return feeds


class OrtOutputs:
    """ONNX Runtime's output shapes and dtypes of ``model`` (one session, any input shapes)."""

    def __init__(self, model: onnx.ModelProto) -> None:
        so = ort.SessionOptions()
        so.intra_op_num_threads = 2
        so.log_severity_level = 3
        self.model = model
        self.sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
        self.names = [o.name for o in self.sess.get_outputs()]

    def __call__(self, feeds: dict[str, np.ndarray]) -> dict[str, tuple[tuple[int, ...], str]]:
        outs = self.sess.run(None, feeds)
        return {n: (tuple(v.shape), TRT_DTYPE[str(v.dtype)]) for n, v in zip(self.names, outs, strict=True)}


def check_shapes_against_ort(ort_outputs: OrtOutputs, shapes: dict[str, tuple[int, ...]], block_size: int,
                             sms: int | None = None) -> None:  # fmt: skip
    """TensorRT for RTX's concrete output shapes/dtypes for inputs of ``shapes`` equal ONNX Runtime's
    (``sms``: stamped on split attention nodes, as the builders do)."""
    want = ort_outputs(valid_feeds(ort_outputs.model, shapes, block_size))
    got = parse_rtx_network(fixed_inputs(ort_outputs.model, shapes), sms=sms).outputs
    assert got == want, f"inputs {shapes}:\n  TensorRT for RTX {got}\n  ONNX Runtime     {want}"


def check_rtx_build(model: onnx.ModelProto, engine: EngineBuildConfig, block_size: int,
                    compute_capability: str = "SM89") -> RtxBuildResult:  # fmt: skip
    """Build ``model`` for ``compute_capability`` and check plugin layers, profiles, outputs against
    ONNX Runtime at the profiles' min and max shapes, and the serialized plugin fields."""
    result = build_rtx_engine(model, RtxBuildConfig(engine=engine, compute_capability=compute_capability))
    nodes = ucm_nodes(model)
    assert nodes, "the model has no UCM node"
    # every UCM node is a plugin layer of its own op (none imported through its function body)
    assert result.network.plugin_layers == dict(collections.Counter(n.op_type for n in nodes))
    assert result.compute_capability == compute_capability
    # both optimization profiles, exactly the TensorRT builder's
    assert result.profiles == profile_shapes(model, engine)
    prefill, decode = result.profiles
    assert prefill["input_ids"][2] == (engine.max_batch, engine.max_prefill_tokens)
    assert decode["input_ids"][0][1] == decode["input_ids"][2][1] == 1

    # outputs: names and dtypes of the dynamic network; -1 only where a dim is dynamic
    points = {"min": {n: s[0] for n, s in prefill.items()}, "prefill max": {n: s[2] for n, s in prefill.items()},
              "decode max": {n: s[2] for n, s in decode.items()}}  # fmt: skip
    out_names = [o.name for o in model.graph.output]
    assert list(result.network.outputs) == out_names
    ort_outputs = OrtOutputs(model)
    concrete = ort_outputs(valid_feeds(model, points["decode max"], block_size))
    for name, (dims, dtype) in result.network.outputs.items():
        want_dims, want_dtype = concrete[name]
        assert dtype == want_dtype and len(dims) == len(want_dims), (name, dims, dtype, concrete[name])
        assert all(d in (-1, w) for d, w in zip(dims, want_dims, strict=True)), (name, dims, want_dims)
    for shapes in points.values():
        check_shapes_against_ort(ort_outputs, shapes, block_size, sms=engine.sms)
    # split-K attention: one counters input of the builder's length, fed to every attention node; each
    # node's partials consumed by nothing and not an output
    splits = [n for n in nodes if n.op_type.endswith("SplitK")]
    if splits:
        n_cnt = split_counters_length(model, engine)
        assert prefill["attn_split_counters"] == decode["attn_split_counters"] == ((n_cnt,),) * 3
        assert all(n.input[7] == "attn_split_counters" for n in splits)
        readers = {i for n in model.graph.node for i in n.input}
        assert all(n.output[1] not in readers and n.output[1] not in out_names for n in splits)

    # serialization: a non-empty plan naming every plugin; every plugin serialized exactly its node's fields
    assert len(result.engine) > 0
    for op in {n.op_type for n in nodes}:
        assert op.encode() in result.engine, f"{op} is not named in the serialized engine"
    serialized = {(op, tuple(sorted(f.items()))) for op, f in result.serialized_fields}
    stamped = ucm_nodes(stamp_split_plan(model, engine.sms)) if splits else nodes  # num_sms = the build's
    expected = {(n.op_type, tuple(sorted(node_fields(n).items()))) for n in stamped}
    assert serialized == expected
    return result
