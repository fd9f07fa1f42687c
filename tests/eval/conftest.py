"""Tiny fixtures for the eval tests: a random 2-layer Llama and a byte-level fast tokenizer.

They exercise the whole quality pipeline in seconds; the real-model numbers are the committed
benchmark (benchmarks/eval_quality.py), not a test.
"""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tk)


@pytest.fixture(scope="session")
def tiny_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=4096, rope_theta=10000.0,
        tie_word_embeddings=True,
    )
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # sharper attention than the default init, so selections matter
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(8.0)
    return model


@pytest.fixture(scope="session")
def filler():
    from ucm_trt.models import haystack_text

    return haystack_text(source="filler", min_chars=40_000)
