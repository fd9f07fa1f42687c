"""SmolLM2 loading and post-RoPE Q/K capture through transformers' AttentionInterface.

These tests share the session-scoped ``smollm2`` fixture (tests/conftest.py). Prompts are short,
so each forward pass takes well under a second on two CPU cores.
"""

from __future__ import annotations

import pytest
import torch

from ucm_trt.models import (
    CAPTURE_ATTN_IMPLEMENTATION,
    capture_qk,
    forward_with_capture,
    smollm2_checkpoint_dir,
)
from ucm_trt.reference import apply_rope

LAYERS = [0, 10, 29]


@pytest.fixture(scope="module")
def ids(smollm2):
    _, tok = smollm2
    text = "The history of the Roman Empire is often divided into eras. " * 6
    return tok(text, return_tensors="pt").input_ids  # [1, ~80]


def test_config_is_the_expected_architecture(smollm2):
    model, _ = smollm2
    cfg = model.config
    assert type(model).__name__ == "LlamaForCausalLM"
    assert (cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (
        30,
        9,
        3,
        64,
    )
    assert cfg.rope_parameters["rope_theta"] == 100000.0
    assert cfg._attn_implementation == "sdpa"
    assert not model.training
    assert (smollm2_checkpoint_dir() / "model.safetensors").is_file()


def test_capture_shapes_follow_the_config(smollm2, ids):
    model, _ = smollm2
    cfg = model.config
    caps = capture_qk(model, ids, layers=LAYERS)
    assert list(caps) == LAYERS
    t = ids.shape[1]
    for q, k in caps.values():
        assert q.shape == (1, cfg.num_attention_heads, t, cfg.head_dim)
        assert k.shape == (1, cfg.num_key_value_heads, t, cfg.head_dim)
        assert q.dtype == k.dtype == torch.float32
        assert torch.isfinite(q).all() and torch.isfinite(k).all()
    # the model is back on its own attention implementation
    assert model.config._attn_implementation == "sdpa"


def test_capture_does_not_change_the_forward_and_matches_the_kv_cache(smollm2, ids):
    model, _ = smollm2
    with torch.no_grad():
        plain = model(input_ids=ids, use_cache=True)
    captured_out, caps = forward_with_capture(model, ids, LAYERS, use_cache=True)
    # Same SDPA math and the same mask builder: the logits are bit-identical.
    assert torch.equal(captured_out.logits, plain.logits)
    for layer in LAYERS:
        _, k = caps[layer]
        # The cache stores post-RoPE, non-repeated keys: exactly what the capture saw.
        assert torch.equal(k, plain.cache.layers[layer].keys)
        assert not torch.equal(k, plain.cache.layers[(layer + 1) % 30].keys)


def test_captured_q_is_the_rotated_projection(smollm2, ids):
    """Recompute Q of a layer from its input hidden state with the independent RoPE reference."""
    model, _ = smollm2
    cfg = model.config
    layer = 10
    with torch.no_grad():
        hidden = model(input_ids=ids, output_hidden_states=True, use_cache=False).hidden_states[layer]
        attn = model.model.layers[layer].self_attn
        x = model.model.layers[layer].input_layernorm(hidden)
        b, t, _ = x.shape
        q = attn.q_proj(x).view(b, t, cfg.num_attention_heads, cfg.head_dim).transpose(1, 2)
        k = attn.k_proj(x).view(b, t, cfg.num_key_value_heads, cfg.head_dim).transpose(1, 2)
    theta = cfg.rope_parameters["rope_theta"]
    positions = torch.arange(t)
    q_cap, k_cap = capture_qk(model, ids, layers=[layer])[layer]
    torch.testing.assert_close(q_cap, apply_rope(q, positions, theta=theta), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(k_cap, apply_rope(k, positions, theta=theta), rtol=1e-5, atol=1e-5)
    # and it is not the un-rotated projection (position > 0 rotates)
    assert (q_cap[:, :, 1:] - q[:, :, 1:]).abs().max() > 1e-2


def test_capture_with_padding_mask_keeps_logits(smollm2):
    """A left-padded batch: the capture must build the same SDPA mask as the model does."""
    model, tok = smollm2
    a = tok("The sky is blue and the grass is green.", return_tensors="pt").input_ids[0]
    b = tok("Paris.", return_tensors="pt").input_ids[0]
    t = a.shape[0]
    ids = torch.full((2, t), tok.eos_token_id or 0, dtype=torch.int64)
    mask = torch.zeros((2, t), dtype=torch.int64)
    ids[0], mask[0] = a, 1
    ids[1, t - b.shape[0] :], mask[1, t - b.shape[0] :] = b, 1
    with torch.no_grad():
        plain = model(input_ids=ids, attention_mask=mask, use_cache=False)
    out, caps = forward_with_capture(model, ids, [5], attention_mask=mask, use_cache=False)
    assert torch.equal(out.logits, plain.logits)
    assert caps[5][0].shape[0] == 2


@pytest.mark.parametrize(
    ("layers", "exc", "match"),
    [
        ([30], ValueError, r"layers must lie in \[0, 30\)"),
        ([-1], ValueError, "layers must lie"),
        ([], ValueError, "at least one layer"),
        ([3, 3], ValueError, "must not repeat"),
        (3, TypeError, "wrap it"),
        ([1.0], TypeError, "layers must hold ints"),
    ],
)
def test_capture_rejects_bad_layers(smollm2, ids, layers, exc, match):
    model, _ = smollm2
    with pytest.raises(exc, match=match):
        capture_qk(model, ids, layers=layers)
    assert model.config._attn_implementation == "sdpa"


def test_capture_rejects_bad_input_ids_and_non_sdpa_models(smollm2, ids):
    model, _ = smollm2
    with pytest.raises(TypeError, match="input_ids must have dtype"):
        capture_qk(model, ids.float(), layers=[0])
    with pytest.raises(ValueError, match="input_ids must have 2 dimensions"):
        capture_qk(model, ids[0], layers=[0])
    model.set_attn_implementation("eager")
    try:
        with pytest.raises(ValueError, match="attn_implementation='sdpa'"):
            capture_qk(model, ids, layers=[0])
    finally:
        model.set_attn_implementation("sdpa")


def test_capture_restores_implementation_when_forward_raises(smollm2, ids):
    model, _ = smollm2
    embeds = torch.zeros(1, ids.shape[1], model.config.hidden_size)
    # LlamaModel.forward raises: exactly one of input_ids / inputs_embeds must be given
    with pytest.raises(ValueError, match="exactly one of input_ids or inputs_embeds"):
        forward_with_capture(model, ids, [0], inputs_embeds=embeds)
    assert model.config._attn_implementation == "sdpa"
    assert model.config._attn_implementation != CAPTURE_ATTN_IMPLEMENTATION
