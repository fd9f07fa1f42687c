"""Sliding-window models are refused at export: the UCM ops model plain causal attention only."""

import pytest
from transformers import MistralConfig, MistralForCausalLM, Qwen2Config

from ucm_trt.graph.export import active_sliding_window, export_hf_model

TINY = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
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
