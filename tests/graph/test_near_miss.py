"""Near-miss graphs are left unchanged and reported with a reason; malformed input gives a
clear error; a partial rewrite happens only when asked for and is listed."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from tests.graph._contrib_models import build
from tests.graph._graph_harness import session
from ucm_trt.config import ReRoPEConfig
from ucm_trt.graph import RewriteConfig, RewriteError, rewrite_model

CFG = RewriteConfig(algorithm="esa", block_size=16)


def _no_cache_attention(softmax_axis=-1) -> onnx.ModelProto:
    """Decomposed causal attention WITHOUT a KV cache (an encoder-style block): not pageable."""
    rng = np.random.default_rng(0)
    w = {n: rng.standard_normal((16, 16)).astype(np.float32) for n in ("wq", "wk", "wv")}
    nodes = [helper.make_node("MatMul", ["x", f"w{c}"], [c]) for c in "qkv"]
    nodes += [
        helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 1, 3, 2]),
        helper.make_node("MatMul", ["q", "kt"], ["s"]),
        helper.make_node("Mul", ["s", "scale"], ["ss"]),
        helper.make_node("Add", ["ss", "mask"], ["sm"]),
        helper.make_node("Softmax", ["sm"], ["p"], axis=softmax_axis),
        helper.make_node("MatMul", ["p", "v"], ["y"]),
    ]
    inits = [numpy_helper.from_array(v, k) for k, v in w.items()]
    inits.append(numpy_helper.from_array(np.array(0.25, np.float32), "scale"))
    g = helper.make_graph(
        nodes, "no_cache",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, "t", 16]),
         helper.make_tensor_value_info("mask", TensorProto.FLOAT, [1, 1, "t", "t"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2, "t", 16])], inits,
    )  # fmt: skip
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def _with_router_softmax(model: onnx.ModelProto) -> onnx.ModelProto:
    """Add a classifier-style Softmax(MatMul(logits)) output: attention-like op, not attention."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    m.graph.node.append(helper.make_node("Softmax", ["logits"], ["probs"], axis=-1, name="router_softmax"))
    m.graph.output.append(helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["batch", "seq", 100]))
    return m


def test_non_attention_softmax_is_ignored_and_reported():
    model, _, _ = build("mha")
    rw, rep = rewrite_model(_with_router_softmax(model), config=CFG)
    soft = [n for n in rep.nodes if n.node == "router_softmax"]
    assert soft and soft[0].status == "not_attention" and "not attention" in soft[0].reason
    assert len(rep.rewritten) == 2 and "probs" in rep.outputs
    assert any(n.op_type == "Softmax" and n.name == "router_softmax" for n in rw.graph.node)


def test_attention_without_kv_cache_is_refused_with_reason(tmp_path):
    model = _no_cache_attention()
    before = model.SerializeToString()
    with pytest.raises(RewriteError) as ei:
        rewrite_model(model, config=CFG)
    rep = ei.value.report
    assert [n.status for n in rep.nodes] == ["unsupported"]
    assert "KV-cache Concat" in rep.nodes[0].reason and "KV-cache Concat" in str(ei.value)
    assert model.SerializeToString() == before  # the input is never modified
    # even with allow_partial there is nothing to rewrite: still an error, nothing produced
    with pytest.raises(RewriteError, match="no rewritable attention"):
        rewrite_model(model, config=RewriteConfig(algorithm="esa", block_size=16, allow_partial=True))


def test_softmax_over_wrong_axis_is_unsupported():
    with pytest.raises(RewriteError, match="not over the key axis"):
        rewrite_model(_no_cache_attention(softmax_axis=1), config=CFG)


@pytest.mark.parametrize(
    "kind, attrs, reason",
    [
        ("gqa-fused", {"local_window_size": 4}, "local_window_size=4 is not supported"),
        ("gqa-fused", {"softcap": 30.0}, "softcap=30.0 is not supported"),
        ("mha", {"unidirectional": 0}, "unidirectional=0"),
    ],
)
def test_unsupported_contrib_variants(kind, attrs, reason):
    model, _, _ = build(kind, attn_attrs={0: attrs, 1: attrs})
    with pytest.raises(RewriteError) as ei:
        rewrite_model(model, config=CFG)
    rep = ei.value.report
    assert len(rep.unsupported) == 2 and all(reason in n.reason for n in rep.unsupported)


def test_partial_rewrite_only_with_flag_and_listed():
    model, _, meta = build("gqa-fused", attn_attrs={1: {"local_window_size": 4}})
    with pytest.raises(RewriteError, match="1 attention node"):
        rewrite_model(model, config=CFG)
    rw, rep = rewrite_model(model, config=RewriteConfig(algorithm="esa", block_size=16, allow_partial=True))
    assert rep.partial and [n.status for n in rep.nodes] == ["rewritten", "unsupported"]
    assert "PARTIAL" in rep.summary()
    ins = {i.name for i in rw.graph.input}
    outs = {o.name for o in rw.graph.output}
    assert {"kv_pool.0", "selection.0", "past_key_values.1.key", "past_key_values.1.value"} <= ins
    assert "past_key_values.0.key" not in ins and "present.1.key" in outs and "present.0.key" not in outs
    session(rw)  # loads in ONNX Runtime


def test_rerope_needs_rotate_half_rope():
    model, _, _ = build("mha", rope_interleaved=1)
    cfg = RewriteConfig(algorithm="rerope", block_size=16, rerope=ReRoPEConfig(window=4, training_length=8))
    with pytest.raises(RewriteError, match="interleaved"):
        rewrite_model(model, config=cfg)
    # the sparse rewrite does not need the un-rotated q/k and still applies
    _, rep = rewrite_model(model, config=CFG)
    assert len(rep.rewritten) == 2


def test_malformed_models_give_clear_errors(tmp_path):
    bad = tmp_path / "garbage.onnx"
    bad.write_bytes(b"\x00not an onnx file at all\xff" * 10)
    with pytest.raises(ValueError, match="not a valid ONNX file"):
        rewrite_model(bad, config=CFG)
    with pytest.raises(ValueError, match="does not exist"):
        rewrite_model(tmp_path / "missing.onnx", config=CFG)
    broken = _no_cache_attention()
    broken.graph.node[0].input[0] = "undefined_tensor"
    with pytest.raises(ValueError, match="fails the ONNX checker"):
        rewrite_model(broken, config=CFG)
    old = _no_cache_attention()
    old.opset_import[0].version = 13
    with pytest.raises(ValueError, match="opset must be >= 15"):
        rewrite_model(old, config=CFG)
    with pytest.raises(TypeError, match="model must be a path or an onnx.ModelProto"):
        rewrite_model(42, config=CFG)
    with pytest.raises(TypeError, match="config must be a RewriteConfig"):
        rewrite_model(_no_cache_attention(), config={"algorithm": "esa"})


def test_already_rewritten_model_is_refused():
    model, _, _ = build("mha")
    rw, _ = rewrite_model(model, config=CFG)
    with pytest.raises(ValueError, match="rewritten before"):
        rewrite_model(rw, config=CFG)


@pytest.mark.parametrize(
    "kwargs, exc, msg",
    [
        (dict(algorithm="quest"), ValueError, "algorithm must be one of"),
        (dict(block_size=0), ValueError, r"block_size must be a power of two in \[16, 256\] .*got 0"),
        (dict(block_size=4), ValueError, r"block_size must be a power of two in \[16, 256\] .*got 4"),
        (dict(block_size=24), ValueError, r"block_size must be a power of two in \[16, 256\] .*got 24"),
        (dict(block_size=512), ValueError, r"block_size must be a power of two in \[16, 256\] .*got 512"),
        (dict(block_size=4.0), TypeError, "block_size must be an int"),
        (dict(algorithm="rerope"), ValueError, "rerope must be a ReRoPEConfig"),
        (dict(algorithm="esa", rerope=ReRoPEConfig(window=2, training_length=4)), ValueError, "cannot be combined with RewriteConfig.rerope"),
        (dict(algorithm="dense", selection_inputs=True), ValueError, "cannot be combined with RewriteConfig.selection_inputs=True"),
        (dict(dense_layers=[0]), ValueError, "dense_layers must be a tuple"),
    ],
)
def test_config_validation(kwargs, exc, msg):
    with pytest.raises(exc, match=msg):
        RewriteConfig(**kwargs)


def test_dense_layers_have_no_selection_input():
    model, _, _ = build("gqa-op")
    rw, rep = rewrite_model(model, config=RewriteConfig(algorithm="kvstar", block_size=16, dense_layers=(0,)))
    ins = [i.name for i in rw.graph.input]
    assert "selection.1" in ins and "selection.0" not in ins
    assert any(n.op_type == "UcmSelectAllBlocks" for n in rw.graph.node)
    meta = {p.key: p.value for p in rw.metadata_props}
    assert meta["ucm.algorithm"] == "kvstar" and meta["ucm.block_size"] == "16"


def test_live_read_of_past_length_is_refused():
    """A graph that still needs the contiguous past length after rewriting (here exposed as an
    output; transformers' own ORT exporter does it in a fully-masked-row guard) must not be
    rewritten with a silently wrong past length of 0."""
    model, _, _ = build("gqa-op")
    model.graph.node.append(helper.make_node("Shape", ["past_key_values.0.key"], ["past_len"], start=2, end=3))
    model.graph.output.append(helper.make_tensor_value_info("past_len", TensorProto.INT64, [1]))
    with pytest.raises(RewriteError, match="reads the past length of 'past_key_values.0.key'"):
        rewrite_model(model, config=CFG)
