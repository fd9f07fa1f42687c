"""CPU tier: the engine builder's TensorRT-free steps on a real rewritten model -- UCM node checks,
optimization profiles -- and its errors; the ``ucm-trt build`` command without TensorRT."""

from __future__ import annotations

import subprocess
import sys

import onnx
import pytest

from trt_plugins import ops
from trt_plugins.build import (
    EngineBuildConfig,
    EngineBuildError,
    check_ucm_nodes,
    profile_shapes,
    resolve_sms,
    split_counters_length,
    stamp_split_plan,
    strip_ucm_functions,
)
from trt_plugins.spec import plugin_spec
from ucm_trt.graph.functions import make_single_op_model


@pytest.fixture(scope="module")
def rewritten(tmp_path_factory):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from ucm_trt.graph import ExportConfig, RewriteConfig, export_hf_model, rewrite_model

    cfg = LlamaConfig(vocab_size=256, hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=32, intermediate_size=256, max_position_embeddings=1024,
                      rope_parameters={"rope_type": "default", "rope_theta": 10000.0})  # fmt: skip
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("tiny")
    path = export_hf_model(LlamaForCausalLM(cfg).eval(), d / "tiny.onnx", config=ExportConfig(exporter="legacy"))
    from ucm_trt.config import ReRoPEConfig

    out = {}
    for algo, extra in (("esa", {}), ("dense", {}),
                        ("rerope", {"rerope": ReRoPEConfig(window=32, training_length=512, logn=True)})):  # fmt: skip
        out[algo], _ = rewrite_model(path, config=RewriteConfig(algorithm=algo, block_size=16, **extra))
    return out


@pytest.mark.parametrize("algo", ["esa", "dense", "rerope"])
def test_rewritten_nodes_are_valid_plugin_instances(rewritten, algo):
    model = rewritten[algo]
    names = check_ucm_nodes(model)
    ucm = [n for n in model.graph.node if n.domain == "ucm"]
    assert len(names) == len(ucm) >= 2
    for node in ucm:
        spec = plugin_spec(node.op_type)
        values = spec.attribute_values({a.name: onnx.helper.get_attribute_value(a) for a in node.attribute})
        ops.module(node.op_type).check(values)  # the kernel geometry accepts the rewriter's attributes


@pytest.mark.parametrize("algo", ["esa", "rerope"])
def test_parser_input_has_no_ucm_function_bodies(rewritten, algo):
    """What the builder hands TensorRT's parser: no UCM local function left to inline (on any TensorRT
    version), every node, input, output and initializer as rewritten, other functions kept."""
    from ucm_trt.graph.schemas import DOMAIN, SCHEMAS

    model = rewritten[algo]
    assert any(f.domain == DOMAIN and f.name in SCHEMAS for f in model.functions)  # the rewriter emits them
    extra = onnx.helper.make_function("custom", "Helper", ["x"], ["y"], [onnx.helper.make_node("Relu", ["x"], ["y"])],
                                      [onnx.helper.make_opsetid("", 17)])  # fmt: skip
    with_extra = onnx.ModelProto()
    with_extra.CopyFrom(model)
    with_extra.functions.append(extra)
    stripped = strip_ucm_functions(with_extra)
    assert [(f.domain, f.name) for f in stripped.functions] == [("custom", "Helper")]
    assert list(stripped.graph.node) == list(model.graph.node)
    assert stripped.graph.input == model.graph.input and stripped.graph.output == model.graph.output
    assert list(stripped.graph.initializer) == list(model.graph.initializer)
    assert check_ucm_nodes(stripped) == check_ucm_nodes(model)  # UCM nodes intact, plugin fields present
    assert len(with_extra.functions) == len(model.functions) + 1  # the input is not modified


def test_profiles_cover_prefill_and_decode(rewritten):
    cfg = EngineBuildConfig(max_batch=4, max_prefill_tokens=256, max_blocks=32, num_blocks=100, max_selected=8)
    prefill, decode = profile_shapes(rewritten["esa"], cfg)
    assert prefill["input_ids"] == ((1, 1), (1, 128), (4, 256))
    assert decode["input_ids"] == ((1, 1), (4, 1), (4, 1))
    assert prefill["block_table"][2] == (4, 32)
    assert prefill["kv_pool.0"][2] == (100, 2, 2, 16, 32)
    assert decode["selection.1"][2] == (4, 2, 8)
    assert set(prefill) == {i.name for i in rewritten["esa"].graph.input}
    # the split-K counters: one length in both profiles, the most tiles at 4 rows x 256 tokens. By hand:
    # 2 KV heads, group 2; the smallest query tile any tactic may take is the decode tactic's 16 rows =
    # 8 tokens, so 4 x 2 x ceil(256 / 8) = 256 counters
    assert prefill["attn_split_counters"] == decode["attn_split_counters"] == ((256,),) * 3
    assert split_counters_length(rewritten["esa"], cfg) == 256
    assert split_counters_length(rewritten["esa"], EngineBuildConfig(max_batch=1, max_prefill_tokens=9)) == 1 * 2 * 2


def test_split_plan_is_stamped_and_the_sm_count_resolved(rewritten):
    """The rewriter leaves num_sms = 0 (the graph is target-free); the builder's copy carries the build's
    SM count on every split attention node and nothing else changes; without --sms and without a CUDA
    device the build refuses to guess."""
    import torch

    model = rewritten["esa"]
    splits = [n for n in model.graph.node if n.op_type == "UcmPagedSparseAttentionSplitK"]
    assert len(splits) == 2
    assert all(onnx.helper.get_attribute_value(next(a for a in n.attribute if a.name == "num_sms")) == 0 for n in splits)
    stamped = stamp_split_plan(model, 132)
    for a, b in zip(model.graph.node, stamped.graph.node, strict=True):
        fa = {x.name: onnx.helper.get_attribute_value(x) for x in a.attribute}
        fb = {x.name: onnx.helper.get_attribute_value(x) for x in b.attribute}
        assert fb == (fa | {"num_sms": 132} if a.op_type.endswith("SplitK") else fa)
        assert list(a.input) == list(b.input) and list(a.output) == list(b.output)
    assert check_ucm_nodes(stamped) == check_ucm_nodes(model)
    assert resolve_sms(EngineBuildConfig(sms=78)) == 78
    if not torch.cuda.is_available():
        with pytest.raises(EngineBuildError, match=r"EngineBuildConfig.sms is None and there is no CUDA device.*--sms N"):
            resolve_sms(EngineBuildConfig())
    with pytest.raises(ValueError, match=r"EngineBuildConfig.sms must be None or an int >= 1, got 0"):
        EngineBuildConfig(sms=0)
    # the plugins refuse an unstamped node (num_sms 0) when they plan the launch
    from trt_plugins._attention import planned_sms

    spec = plugin_spec(splits[0].op_type)
    values = spec.attribute_values({a.name: onnx.helper.get_attribute_value(a) for a in splits[0].attribute})
    with pytest.raises(ValueError, match=r"num_sms is 0: the split count is planned for the build target's SM count"):
        planned_sms(values, spec=spec)


def test_rewrite_without_split_scratch_builds_unsplit(tmp_path):
    """RewriteConfig(split_scratch=False) writes the v1 ops (as models rewritten before issue 14): no
    counters input, no num_sms needed, profiles as before."""
    from tests.graph._graph_models import make_tiny
    from ucm_trt.graph import ExportConfig, RewriteConfig, export_hf_model, rewrite_model

    path = export_hf_model(make_tiny("llama", head_dim=32), tmp_path / "t.onnx", config=ExportConfig(exporter="legacy"))
    old, _ = rewrite_model(path, config=RewriteConfig(algorithm="esa", block_size=16, split_scratch=False))
    assert {n.op_type for n in old.graph.node if n.domain == "ucm"} == {"UcmPagedSparseAttention"}
    prefill, _ = profile_shapes(old, EngineBuildConfig())
    assert "attn_split_counters" not in prefill and "attn_split_counters" not in {i.name for i in old.graph.input}
    assert split_counters_length(old, EngineBuildConfig()) == 1


def test_unresolvable_dynamic_dim_is_named():
    model = make_single_op_model("UcmPagedSparseAttention", num_q_heads=4, num_kv_heads=2, head_dim=32,
                                 block_size=16, scale=0.1)  # fmt: skip
    with pytest.raises(EngineBuildError, match=r"input 'q' axis 1 is dynamic \('Hq'\)"):
        profile_shapes(model, EngineBuildConfig())
    ok = profile_shapes(model, EngineBuildConfig(fixed_dims={"Hq": 4, "Hkv": 2, "D": 32, "block_size": 16, "2": 2}))
    assert ok[1]["q"][2] == (1, 4, 1, 32)


def test_bad_ucm_nodes_are_build_errors():
    model = make_single_op_model("UcmSelectAllBlocks", num_kv_heads=2)
    bad = onnx.ModelProto()
    bad.CopyFrom(model)
    del bad.graph.node[0].attribute[:]
    with pytest.raises(EngineBuildError, match="plugin_namespace"):
        check_ucm_nodes(bad)
    bad.CopyFrom(model)
    for a in bad.graph.node[0].attribute:
        if a.name == "num_kv_heads":
            bad.graph.node[0].attribute.remove(a)
            break
    with pytest.raises(EngineBuildError, match="num_kv_heads"):
        check_ucm_nodes(bad)
    bad.CopyFrom(model)
    bad.graph.node[0].op_type = "UcmNoSuchOp"
    with pytest.raises(EngineBuildError, match="UcmNoSuchOp"):
        check_ucm_nodes(bad)
    bad.CopyFrom(model)
    bad.graph.node[0].domain = "acme"
    bad.graph.node[0].op_type = "Frob"
    with pytest.raises(EngineBuildError, match="acme::Frob"):
        check_ucm_nodes(bad)


def test_build_config_validation():
    with pytest.raises(ValueError, match="max_batch"):
        EngineBuildConfig(max_batch=0)
    with pytest.raises(ValueError, match="opt_prefill_tokens"):
        EngineBuildConfig(max_prefill_tokens=8, opt_prefill_tokens=16)
    with pytest.raises(ValueError, match="plugin_mode"):
        EngineBuildConfig(plugin_mode="fast")


def test_cli_build_without_tensorrt_is_one_line_error(tmp_path):
    try:
        import tensorrt  # noqa: F401
    except Exception:
        pass
    else:
        pytest.skip("TensorRT is importable here; the missing-TensorRT path cannot be observed")
    path = tmp_path / "sel.onnx"
    onnx.save(make_single_op_model("UcmSelectAllBlocks", num_kv_heads=2), path)
    proc = subprocess.run([sys.executable, "-m", "ucm_trt.cli", "build", str(path), "-o", str(tmp_path / "e")],
                          capture_output=True, text=True)  # fmt: skip
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and 'pip install "ucm-trt[trt]"' in lines[0], proc.stderr
    proc = subprocess.run([sys.executable, "builders/build_engine.py", str(tmp_path / "missing.onnx"), "-o", "x"],
                          capture_output=True, text=True)  # fmt: skip
    assert proc.returncode == 2 and "does not exist" in proc.stderr


@pytest.mark.parametrize("algo", ["esa", "rerope"])
def test_plugin_kernel_equals_function_body_on_real_model_data(rewritten, algo):
    """Each UCM attention node of a rewritten model, fed with the tensors ONNX Runtime computes for it
    (prefill of 37 tokens over a permuted pool, sparse selection for ESA), run through the plugins'
    kernel (JIT path; the AOT path compiles the same kernel) equals the node's output from its ONNX
    function body: the plugin and the graph op agree on real data, not only on the op-level cases."""
    import numpy as np
    import onnxruntime as ort
    import torch

    from trt_plugins import _attention
    from ucm_trt.kernels.aot import paged_attention_chunk

    model = onnx.ModelProto()
    model.CopyFrom(rewritten[algo])
    nodes = [n for n in model.graph.node if n.domain == "ucm" and n.op_type != "UcmSelectAllBlocks"]
    extra = []
    for n in nodes:
        for name in (*n.input[:3], n.output[0]):
            model.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
            extra.append(name)
    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    t, past = 37, 20
    bt = rng.permutation(12)[:8].reshape(2, 4).astype(np.int32)
    pools = [rng.standard_normal((12, 2, 2, 16, 32)).astype(np.float32) for _ in nodes]
    names = {i.name for i in model.graph.input}
    feeds = {"input_ids": rng.integers(0, 256, (2, t)).astype(np.int64),
             "position_ids": np.broadcast_to(np.arange(past, past + t), (2, t)).astype(np.int64),
             "seq_lens": np.array([past + t, past + t], np.int32), "block_table": bt,
             "attn_split_counters": np.zeros(1, np.int32)}  # fmt: skip
    sel = np.full((2, 2, 3), -1, np.int32)
    sel[:, :, :2] = [0, 3]  # block 0 and the chunk's last block; block 1 (past) is left out
    for i, p in enumerate(pools):
        feeds[f"kv_pool.{i}"] = p
        feeds[f"selection.{i}"] = sel
    outs = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, {k: v for k, v in feeds.items() if k in names}),
                    strict=True))  # fmt: skip
    for node in nodes:
        spec = plugin_spec(node.op_type)
        values = spec.attribute_values({a.name: onnx.helper.get_attribute_value(a) for a in node.attribute})
        g = _attention.geometry(values, spec=spec)
        q, k, v = (torch.from_numpy(np.ascontiguousarray(outs[x])) for x in node.input[:3])
        sel_in = node.input[6]
        if sel_in in feeds:
            selection = torch.from_numpy(feeds[sel_in])
        else:  # the graph's UcmSelectAllBlocks output
            selection = torch.arange(4, dtype=torch.int32).expand(2, 2, 4).contiguous()
        out = paged_attention_chunk(q, k, v, torch.from_numpy(pools[int(node.input[3].split(".")[1])]),
                                    torch.from_numpy(bt), torch.from_numpy(feeds["seq_lens"]), selection, geometry=g)  # fmt: skip
        ref = torch.from_numpy(outs[node.output[0]])
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


def test_cli_build_sms_flag(tmp_path):
    """``ucm-trt build --sms N`` reaches EngineBuildConfig.sms; a bad value is a one-line flag error before
    TensorRT loads."""
    import argparse

    from trt_plugins import cli_build
    from ucm_trt.cli_args import FlagError

    path = tmp_path / "m.onnx"
    onnx.save(make_single_op_model("UcmSelectAllBlocks", num_kv_heads=2), path)
    p = argparse.ArgumentParser()
    cli_build.configure(p)
    args = p.parse_args([str(path), "-o", str(tmp_path / "m.engine"), "--sms", "132"])
    cli_build.check_args(args, create_dirs=False)
    assert args.sms == 132
    with pytest.raises(FlagError, match="--sms"):
        cli_build.check_args(p.parse_args([str(path), "-o", str(tmp_path / "m.engine"), "--sms", "0"]), create_dirs=False)
