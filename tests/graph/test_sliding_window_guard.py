"""Sliding-window models are refused at export: the UCM ops model plain causal attention only."""

import pytest
from transformers import MistralConfig, MistralForCausalLM, Qwen2Config

from ucm_trt.graph.export import active_sliding_window, export_hf_model

TINY = dict(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,  # head_dim 16 (limits.py)
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)


def test_active_sliding_window_reads_configs():
    assert active_sliding_window(MistralConfig(**TINY, sliding_window=None)) is None
    assert active_sliding_window(MistralConfig(**TINY, sliding_window=64)) == 64
    assert active_sliding_window(MistralConfig(**TINY, sliding_window=256)) is None  # covers every position
    assert active_sliding_window(Qwen2Config(**TINY, sliding_window=64, use_sliding_window=False)) is None


def test_export_refuses_an_active_sliding_window(tmp_path):
    model = MistralForCausalLM(MistralConfig(**TINY, sliding_window=64)).eval()
    with pytest.raises(ValueError, match="sliding_window=64 < max_position_embeddings=256"):
        export_hf_model(model, tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()


def _foreign_export(model, path):
    """Export like another tool would: no sliding-window refusal (the guard under test is the rewriter's)."""
    import warnings

    import torch

    from ucm_trt.graph.export import _wrapper, kv_io_names

    n = model.config.num_hidden_layers
    ins, outs = kv_io_names(n)
    b, s, p = 2, 3, 5
    hkv, d = model.config.num_key_value_heads, model.config.hidden_size // model.config.num_attention_heads
    args = (torch.randint(0, 64, (b, s)), torch.ones(b, p + s, dtype=torch.int64),
            torch.arange(p, p + s).unsqueeze(0).expand(b, s).contiguous(),
            *[torch.randn(b, hkv, p, d) for _ in range(2 * n)])
    axes = {"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "total"},
            "position_ids": {0: "batch", 1: "seq"}, "logits": {0: "batch", 1: "seq"},
            **{k: {0: "batch", 2: "past"} for k in ins[3:]}, **{k: {0: "batch", 2: "total"} for k in outs[1:]}}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(_wrapper(model).eval(), args, str(path), dynamo=False, opset_version=17,
                          input_names=ins, output_names=outs, dynamic_axes=axes)
    return path


@pytest.mark.parametrize("window,probe", [(16, "prefill"), (100, "decode")])
def test_rewriter_refuses_a_foreign_sliding_window_graph(window, probe, tmp_path):
    """A graph exported without the export guard: the rewriter runs the mask subgraph and sees the
    window (16 inside the 61-token prefill probe, 100 only in the long decode probe)."""
    from ucm_trt.graph import RewriteConfig, RewriteError, rewrite_model

    model = MistralForCausalLM(MistralConfig(**TINY, sliding_window=window)).eval()
    path = _foreign_export(model, tmp_path / "sw.onnx")
    with pytest.raises(RewriteError) as err:
        rewrite_model(path, config=RewriteConfig(algorithm="esa", block_size=16))
    reasons = [n.reason for n in err.value.report.nodes]
    assert len(reasons) == 2 and all("sliding window" in r for r in reasons), reasons
    assert all(f"(about {window} tokens back)" in r for r in reasons), reasons  # the nearest hidden key


def test_rewriter_accepts_the_same_graph_without_a_window(tmp_path):
    from ucm_trt.graph import RewriteConfig, rewrite_model

    model = MistralForCausalLM(MistralConfig(**TINY, sliding_window=None)).eval()
    path = _foreign_export(model, tmp_path / "full.onnx")
    _, report = rewrite_model(path, config=RewriteConfig(algorithm="esa", block_size=16))
    assert report.counts == {"decomposed_sdpa": 2}


def _mask_graph(mask_node_builder):
    from onnx import TensorProto, helper

    ins = [helper.make_tensor_value_info("attention_mask", TensorProto.INT64, [1, "total"]),
           helper.make_tensor_value_info("position_ids", TensorProto.INT64, [1, "seq"]),
           helper.make_tensor_value_info("other", TensorProto.INT64, [1])]
    nodes = [
        helper.make_node("Shape", ["attention_mask"], ["tot"], start=1, end=2),
        helper.make_node("Shape", ["position_ids"], ["seq"], start=1, end=2),
        helper.make_node("Constant", [], ["ones"], value=helper.make_tensor("o", TensorProto.INT64, [2], [1, 1])),
        helper.make_node("Concat", ["ones", "seq", "tot"], ["shape"], axis=0),
        *mask_node_builder(),
    ]
    g = helper.make_graph(nodes, "g", ins, [helper.make_tensor_value_info("mask", TensorProto.FLOAT, None)])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def test_probe_reports_a_mask_that_shows_future_keys_and_one_it_cannot_feed():
    from onnx import TensorProto, helper

    from ucm_trt.graph.mask_probe import probe_causal_mask

    visible = _mask_graph(lambda: [helper.make_node(
        "ConstantOfShape", ["shape"], ["mask"], value=helper.make_tensor("z", TensorProto.FLOAT, [1], [0.0]))])
    why = probe_causal_mask(visible, "mask", {})
    assert why is not None and "see the later key" in why
    # the same all-visible mask is fine when the attention op applies causality itself
    assert probe_causal_mask(visible, "mask", {}, causal_applied=True) is None
    foreign = _mask_graph(lambda: [
        helper.make_node("Cast", ["other"], ["of"], to=TensorProto.FLOAT),
        helper.make_node("ConstantOfShape", ["shape"], ["z"], value=helper.make_tensor("z", TensorProto.FLOAT, [1], [0.0])),
        helper.make_node("Add", ["z", "of"], ["mask"]),
    ])
    why = probe_causal_mask(foreign, "mask", {})
    assert why is not None and "depends on graph input 'other'" in why
