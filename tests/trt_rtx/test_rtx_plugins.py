"""The UCM plugins on TensorRT for RTX, op by op: registration from the schemas, single-op models in
every float dtype (shapes and dtypes vs ONNX Runtime, format negotiation, engines for several RTX
targets), the TensorRT plugins' checks firing at build time, and what RTX lacks (recorded, so that a
future RTX that gains it fails here and the docs get updated)."""

from __future__ import annotations

import importlib.util

import numpy as np
import onnx
import pytest

from tests.trt_rtx._rtx_harness import OrtOutputs, fixed_inputs, node_fields, ucm_nodes
from trt_plugins._attention import counters_needed, geometry, scratch_bounds
from trt_plugins.build import EngineBuildConfig, EngineBuildError
from trt_plugins.rtx import (
    UNVERSIONED_LIBRARY,
    RtxBuildConfig,
    _plugin_classes,
    _Recorder,
    _unversioned_library_reachable,
    build_rtx_engine,
    link_unversioned_library,
    main,
    parse_rtx_network,
    register_rtx_plugins,
    unversioned_library_fix,
)
from trt_plugins.spec import all_plugin_specs, plugin_spec
from ucm_trt.graph.functions import make_single_op_model

ATTN = dict(num_q_heads=4, num_kv_heads=2, head_dim=32, block_size=16, scale=32**-0.5)
OPS = {
    "UcmPagedSparseAttention": ATTN,
    "UcmPagedReRoPEAttention": {**ATTN, "rope_theta": 10000.0, "rerope_window": 8, "logn_training_length": 64},
    "UcmSelectAllBlocks": {"num_kv_heads": 2},
}
OPS["UcmPagedSparseAttentionSplitK"] = OPS["UcmPagedSparseAttention"]
OPS["UcmPagedReRoPEAttentionSplitK"] = OPS["UcmPagedReRoPEAttention"]
SMS = 46  # the split variants' num_sms here (an RTX 4070's SM count)
# concrete dims of the single-op models' symbols (B=2, T=3, 5 pool blocks, 4 table columns, 3 selected,
# 64 split counters: more than the 2 x 2 x 3 tiles of the smallest query tile)
DIMS = {"B": 2, "Hq": 4, "Hkv": 2, "T": 3, "D": 32, "num_blocks": 5, "block_size": 16, "max_blocks": 4, "S": 3, "2": 2,
        "split_counters": 64}  # fmt: skip
TRT_DTYPE = {"float": "FLOAT", "float16": "HALF", "bfloat16": "BF16"}


def single_op(op: str, dtype: str = "float", **overrides) -> onnx.ModelProto:
    return make_single_op_model(op, dtype=dtype, **{**OPS[op], **overrides})


def concrete_shapes(model: onnx.ModelProto, dims=DIMS) -> dict[str, tuple[int, ...]]:
    out = {}
    for vi in model.graph.input:
        ds = vi.type.tensor_type.shape.dim
        out[vi.name] = tuple(d.dim_value if d.HasField("dim_value") else dims[d.dim_param] for d in ds)
    return out


def op_feeds(model: onnx.ModelProto, shapes: dict[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
    """Valid inputs: seq_lens = T (no past), an in-range block table, the chunk's blocks selected."""
    from onnx import helper

    rng = np.random.default_rng(0)
    feeds = {}
    for vi in model.graph.input:
        shape, dt = shapes[vi.name], helper.tensor_dtype_to_np_dtype(vi.type.tensor_type.elem_type)
        if vi.name == "block_table":
            feeds[vi.name] = (np.arange(np.prod(shape)).reshape(shape) % DIMS["num_blocks"]).astype(dt)
        elif vi.name == "seq_lens":
            feeds[vi.name] = np.full(shape, DIMS["T"], dt)
        elif vi.name == "selection":
            feeds[vi.name] = np.where(np.arange(shape[2]) < 1, np.arange(shape[2]), -1).astype(dt) * np.ones(shape, dt)
        elif vi.name == "split_counters":
            feeds[vi.name] = np.zeros(shape, dt)
        else:
            feeds[vi.name] = rng.standard_normal(shape).astype(dt)
    return feeds


def test_one_creator_per_schema_with_the_schema_fields(tensorrt_rtx):
    trt = tensorrt_rtx
    ids = register_rtx_plugins()
    specs = all_plugin_specs()
    assert sorted(ids) == sorted(s.plugin_id for s in specs.values())
    registry = trt.get_plugin_registry()
    for spec in specs.values():
        creator = registry.get_creator(spec.name, spec.version, spec.namespace)
        assert creator is not None, spec.plugin_id
        names = [f.name for f in creator.field_names]
        assert names == list(spec.attr_names)
        kinds = {f.name: f.type for f in creator.field_names}
        for a in spec.attrs:
            want = {"int": trt.PluginFieldType.INT32, "float": trt.PluginFieldType.FLOAT32,
                    "string": trt.PluginFieldType.CHAR}[a.kind]  # fmt: skip
            assert kinds[a.name] == want, (spec.name, a.name)


@pytest.mark.parametrize("dtype", ["float", "float16", "bfloat16"])
@pytest.mark.parametrize("op", sorted(OPS))
def test_single_op_shapes_dtypes_and_build(op, dtype):
    model = single_op(op, dtype)
    shapes = concrete_shapes(model)
    split = op.endswith("SplitK")
    net = parse_rtx_network(fixed_inputs(model, shapes), sms=SMS if split else None)
    assert net.plugin_layers == {op: 1}
    spec = plugin_spec(op)
    out_dtype = "INT32" if spec.schema.outputs[0].types == ("int32",) else TRT_DTYPE[dtype]
    name, (dims, got_dtype) = next(iter(net.outputs.items()))
    if dtype == "bfloat16":  # ONNX Runtime's CPU provider has no bf16 kernels for the function bodies
        want_dims = tuple(DIMS[s] if not s.isdigit() else int(s) for s in spec.schema.outputs[0].shape)
        assert (dims, got_dtype) == (want_dims, out_dtype)
    else:
        want = OrtOutputs(model)(op_feeds(model, shapes))
        assert net.outputs[name] == want[name] and want[name][1] == out_dtype
        # the split variants' function body returns empty partials (it has no splits); the plugin the
        # launch rule's length, fp32 whatever the op's dtype
        assert want.get("split_partials", ((0,), "FLOAT")) == ((0,), "FLOAT")
        assert net.outputs.keys() == want.keys()
    if split:
        bound = scratch_bounds(DIMS["B"], DIMS["T"], geometry(OPS[op], spec=spec), sms=SMS, maximum=max)[1]
        assert net.outputs["split_partials"] == ((bound,), "FLOAT") and bound > 0
    # a build negotiates formats/types for this dtype and serializes the node's fields
    fixed = {k: v for k, v in DIMS.items() if k not in ("B", "T", "max_blocks", "num_blocks", "S", "split_counters")}
    engine = EngineBuildConfig(max_batch=2, max_prefill_tokens=8, max_blocks=4, num_blocks=5, max_selected=3,
                               fixed_dims=fixed, sms=SMS)  # fmt: skip
    result = build_rtx_engine(model, RtxBuildConfig(engine=engine))
    assert result.network.plugin_layers == {op: 1} and len(result.engine) > 0
    want_fields = {tuple(sorted((node_fields(n) | ({"num_sms": SMS} if split else {})).items())) for n in ucm_nodes(model)}
    assert {tuple(sorted(f.items())) for _, f in result.serialized_fields} == want_fields
    if split:  # the builder sized the counters: the most tiles at the profile's largest B x T (2 x 8)
        need = counters_needed(2, 8, OPS[op], spec=spec)
        assert result.profiles[0]["split_counters"] == ((need,),) * 3 == result.profiles[1]["split_counters"]
        assert result.network.inputs["split_counters"] == ((-1,), "INT32")


@pytest.mark.parametrize("op", ["UcmPagedSparseAttentionSplitK", "UcmPagedReRoPEAttentionSplitK"])
def test_split_counters_shorter_than_the_tiles_fail(op):
    """A counters input shorter than the kernel's tiles at the known B x T would be written out of bounds:
    the plugins refuse it. Here the smallest query tile any tactic may take holds 16 rows / group 2 = 8
    tokens, so T = 3 is one tile: 2 rows x 2 KV heads x 1 tile = 4 counters."""
    model = single_op(op)
    need = counters_needed(DIMS["B"], DIMS["T"], OPS[op], spec=plugin_spec(op))
    assert need == 4
    assert counters_needed(DIMS["B"], 9, OPS[op], spec=plugin_spec(op)) == 8  # two tiles of 8 tokens
    parse_rtx_network(fixed_inputs(model, concrete_shapes(model, {**DIMS, "split_counters": need})), sms=SMS)
    with pytest.raises(EngineBuildError, match=rf"split_counters has {need - 1} elements but a launch at B=2, T=3 "
                                               rf"may use {need}"):  # fmt: skip
        parse_rtx_network(fixed_inputs(model, concrete_shapes(model, {**DIMS, "split_counters": need - 1})), sms=SMS)


def test_split_attention_needs_the_sm_count():
    """The split count is planned for the target's SMs: without ``num_sms`` (the rewriter writes 0) the
    plugins refuse to size the partials, and an RTX build (no CUDA device) without ``sms`` is refused."""
    model = single_op("UcmPagedSparseAttentionSplitK")
    with pytest.raises(EngineBuildError, match=r"UcmPagedSparseAttentionSplitK.num_sms is 0: the split count is planned"):
        parse_rtx_network(fixed_inputs(model, concrete_shapes(model)))
    fixed = {k: v for k, v in DIMS.items() if k not in ("B", "T", "max_blocks", "num_blocks", "S", "split_counters")}
    engine = EngineBuildConfig(max_batch=2, max_prefill_tokens=8, max_blocks=4, num_blocks=5, fixed_dims=fixed)
    with pytest.raises(EngineBuildError, match=r"EngineBuildConfig.sms is None and there is no CUDA device"):
        build_rtx_engine(model, RtxBuildConfig(engine=engine))


@pytest.mark.parametrize("target", ["SM75", "SM86", "SM120"])
def test_other_rtx_targets_build(target):
    model = single_op("UcmPagedSparseAttention", "float16")
    fixed = {k: v for k, v in DIMS.items() if k not in ("B", "T", "max_blocks", "num_blocks", "S")}
    engine = EngineBuildConfig(max_batch=2, max_prefill_tokens=8, max_blocks=4, num_blocks=5, fixed_dims=fixed,
                               workspace_bytes=1 << 24)  # fmt: skip
    result = build_rtx_engine(model, RtxBuildConfig(engine=engine, compute_capability=target))
    assert result.compute_capability == target and len(result.engine) > 0


def test_the_tensorrt_plugins_geometry_check_fails_the_build():
    """A head_dim outside ``ucm_trt.limits`` (24: not a multiple of 16) is rejected by the TensorRT plugins'
    kernel check, in the limits' own words."""
    model = single_op("UcmPagedSparseAttention", head_dim=24)
    with pytest.raises(EngineBuildError, match=r"head_dim must be a multiple of 16 in \[16, 256\], got 24"):
        parse_rtx_network(fixed_inputs(model, concrete_shapes(model, {**DIMS, "D": 24})))


def test_a_constant_dim_that_contradicts_the_attributes_fails():
    model = single_op("UcmPagedSparseAttention")
    with pytest.raises(EngineBuildError, match=r"input q axis 1 \(Hq\) is 8 but the node's attributes say 4"):
        parse_rtx_network(fixed_inputs(model, concrete_shapes(model, {**DIMS, "Hq": 8})))


def test_mixed_float_dtypes_fail():
    model = single_op("UcmPagedSparseAttention", "float16")
    k = next(vi for vi in model.graph.input if vi.name == "k")
    k.type.tensor_type.elem_type = onnx.TensorProto.FLOAT
    with pytest.raises(EngineBuildError, match="all float inputs must share one dtype"):
        parse_rtx_network(fixed_inputs(model, concrete_shapes(model)))


def test_enqueue_says_there_are_no_kernels(tensorrt_rtx):
    plugin_cls, _ = _plugin_classes(tensorrt_rtx)
    spec = plugin_spec("UcmSelectAllBlocks")
    plugin = plugin_cls(spec, {"num_kv_heads": 2}, _Recorder())
    with pytest.raises(RuntimeError, match="has no kernels"):
        plugin.enqueue(None, None, [], [], 0, 0)


def test_bad_build_config():
    with pytest.raises(ValueError, match=r"compute_capability must be a name like 'SM89', got 'GTX'"):
        RtxBuildConfig(compute_capability="GTX")
    with pytest.raises(TypeError, match="engine must be an EngineBuildConfig"):
        RtxBuildConfig(engine={"max_batch": 1})
    with pytest.raises(ValueError, match=r"'SM99' is not an RTX target; valid: \['SM75'"):
        build_rtx_engine(single_op("UcmSelectAllBlocks"), RtxBuildConfig(compute_capability="SM99"))


def test_unversioned_library_lookup(tmp_path, monkeypatch):
    assert not _unversioned_library_reachable(tmp_path)
    (tmp_path / UNVERSIONED_LIBRARY).symlink_to("libtensorrt_rtx.so.1")
    (tmp_path / "libtensorrt_rtx.so.1").write_bytes(b"")
    assert _unversioned_library_reachable(tmp_path)
    other = tmp_path / "other"
    other.mkdir()
    monkeypatch.setenv("LD_LIBRARY_PATH", str(tmp_path))
    assert _unversioned_library_reachable(other)
    assert unversioned_library_fix(other) == f"ln -s libtensorrt_rtx.so.1 {other / UNVERSIONED_LIBRARY}"
    # the installed libs folder has the link (make's venv setup makes it); making it again is a no-op
    link = link_unversioned_library()
    assert link.name == UNVERSIONED_LIBRARY and link.resolve().name == "libtensorrt_rtx.so.1"


def test_what_tensorrt_rtx_lacks(tensorrt_rtx):
    """TensorRT-specific build features the TensorRT tier uses that TensorRT for RTX 1.7 does not have.
    If one appears, this fails: extend the RTX tier to cover it and update docs/trt-rtx.md."""
    trt = tensorrt_rtx
    assert importlib.util.find_spec("tensorrt_rtx_bindings.plugin") is None, "RTX now has a QDP module"
    assert not [n for n in dir(trt.INetworkDefinition) if n.startswith("add_plugin")], "RTX networks now add plugins"
    flags = trt.NetworkDefinitionCreationFlag.__members__
    assert "PREFER_AOT_PYTHON_PLUGINS" not in flags and "PREFER_JIT_PYTHON_PLUGINS" not in flags
    # the Quick (QDP) plugin interfaces are bound but expose no callbacks to implement
    for name in ("IPluginV3QuickBuild", "IPluginV3QuickRuntime"):
        assert not [m for m in dir(getattr(trt, name)) if not m.startswith("_") and m not in ("api_language", "interface_info")]


def test_command_line_build(tmp_path, capsys):
    model = tmp_path / "select_all.onnx"
    onnx.save(single_op("UcmSelectAllBlocks"), model)
    out = tmp_path / "select_all.rtx-engine"
    assert main(["--build", str(model), "--out", str(out), "--compute-capability", "SM86", "--max-batch", "2"]) == 0
    assert out.stat().st_size > 0
    assert "TensorRT-for-RTX engine for SM86" in capsys.readouterr().out
    assert main(["--build", str(tmp_path / "missing.onnx"), "--out", str(out)]) == 1
    assert "does not exist" in capsys.readouterr().err
