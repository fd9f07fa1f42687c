"""Fixtures of the runtime tests: a tiny random Llama (fast unit tests) and SmolLM2 engines."""

from __future__ import annotations

import pytest
import torch


def tiny_llama(*, layers: int = 2, heads: int = 4, kv_heads: int = 2, head_dim: int = 16, vocab: int = 256,
               seed: int = 0, max_positions: int = 4096):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=vocab, hidden_size=heads * head_dim, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim,
                      intermediate_size=4 * heads * head_dim, max_position_embeddings=max_positions,
                      rope_theta=10000.0)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).eval()
    # Sharpen attention so that a random model has non-uniform, prompt-dependent attention.
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(4.0)
            layer.self_attn.k_proj.weight.mul_(4.0)
    return model


@pytest.fixture(autouse=True, scope="module")
def _one_intra_op_thread():
    """Run the runtime tests with one intra-op thread, restored afterwards.

    Their per-op work is tiny (decode-sized matmuls, 30 small reference attentions per step); on
    the 2-core CI box two OpenMP threads made a SmolLM2 decode step 19x slower (1.94 s vs 0.10 s,
    measured) because the second thread contends with other jobs. Results do not depend on it.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny_model():
    return tiny_llama()


@pytest.fixture(scope="session")
def smollm2_paged():
    """SmolLM2 loaded a second time (the shared ``smollm2`` fixture must not be modified): the
    runtime switches this copy's attention to ``ucm_paged``."""
    from ucm_trt.models import load_smollm2

    model, tok = load_smollm2(dtype=torch.float32, attn_implementation="sdpa")
    return model, tok
