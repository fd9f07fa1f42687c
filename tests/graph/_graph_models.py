"""Tiny random decoder configs and the export matrix used by the graph tests."""

from __future__ import annotations

import torch

ARCHS = ("llama", "qwen2", "mistral")
EXPORTS = [
    ("llama", "legacy", 17),
    ("qwen2", "legacy", 17),
    ("mistral", "legacy", 17),
    ("llama", "dynamo", 20),
    ("mistral", "dynamo", 20),
    ("llama", "dynamo", 23),
    ("qwen2", "dynamo", 23),
]
TINY = dict(num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=1000, max_position_embeddings=512)  # fmt: skip
ROPE_THETA = {"llama": 10000.0, "qwen2": 1000000.0, "mistral": 10000.0}


def make_tiny(arch: str, **overrides):
    """A tiny random model of ``arch``: the ``TINY`` config updated with ``overrides`` (e.g. ``head_dim=32``)."""
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        MistralConfig,
        MistralForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,  # fmt: skip
    )

    torch.manual_seed({"llama": 1, "qwen2": 2, "mistral": 3}[arch])
    rope = {"rope_parameters": {"rope_type": "default", "rope_theta": ROPE_THETA[arch]}}
    tiny = {**TINY, **overrides}
    if arch == "llama":
        m = LlamaForCausalLM(LlamaConfig(**tiny, **rope))
    elif arch == "qwen2":
        m = Qwen2ForCausalLM(Qwen2Config(**tiny, **rope))
    else:
        m = MistralForCausalLM(MistralConfig(**tiny, **rope, sliding_window=None))
    return m.eval()


