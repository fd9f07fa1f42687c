"""GSA On-Device's hash width per preset (``GSAOnDeviceConfig.hash_bits_per_dim``): ``default`` takes
:data:`~ucm_trt.runtime.algorithms.GSA_ON_DEVICE_HASH_BITS_PER_DIM`'s bits per head-dim channel, ``ucm``
upstream's head_dim bits, an explicit width is kept, and the policy's code cache and encoders follow it."""

from __future__ import annotations

import pytest
import torch

from tests.runtime.conftest import tiny_llama
from ucm_trt.config import Budget, GSAOnDeviceConfig, SparseConfig
from ucm_trt.runtime import Engine, RuntimeConfig, SamplingParams, TorchBackend
from ucm_trt.runtime.algorithms import (
    GSA_ON_DEVICE_HASH_BITS_PER_DIM,
    grid_gsa_on_device_config,
    gsa_on_device_for_preset,
    make_policy,
    sparse_config_for,
)


def test_presets_fill_an_open_width_and_keep_a_given_one():
    assert GSA_ON_DEVICE_HASH_BITS_PER_DIM["ucm"] == 1
    assert GSA_ON_DEVICE_HASH_BITS_PER_DIM["default"] > 1
    per_dim = GSA_ON_DEVICE_HASH_BITS_PER_DIM["default"]
    assert make_policy("gsa-on-device").config.resolved_hash_bits(64) == per_dim * 64
    assert make_policy("gsa-on-device", preset="ucm").config.resolved_hash_bits(64) == 64
    given = GSAOnDeviceConfig(hash_bits=96, top_k_tokens=512)
    kept = make_policy("gsa-on-device", gsa_on_device=given).config
    assert kept.hash_bits == 96 and kept.hash_bits_per_dim is None and kept.top_k_tokens == 512
    assert gsa_on_device_for_preset(GSAOnDeviceConfig(hash_bits_per_dim=2), "default").resolved_hash_bits(64) == 128
    sparse = SparseConfig(block_size=16, budget=Budget.ratio(0.125))
    assert grid_gsa_on_device_config(sparse, 1024).resolved_hash_bits(64) == per_dim * 64
    assert grid_gsa_on_device_config(sparse, 1024, preset="ucm").resolved_hash_bits(64) == 64
    with pytest.raises(TypeError, match="gsa_on_device must be a GSAOnDeviceConfig"):
        gsa_on_device_for_preset({"hash_bits": 64})
    with pytest.raises(ValueError, match="preset"):
        gsa_on_device_for_preset(None, "fast")


@pytest.mark.parametrize("preset", ["default", "ucm"])
def test_the_code_cache_and_encoders_take_the_preset_width(preset):
    """Bound in an engine, the policy's code cache holds bits / 8 bytes per token and head, its projections
    are [head_dim, bits], and decoding runs (the PyTorch path here)."""
    model = tiny_llama()
    d = model.config.hidden_size // model.config.num_attention_heads
    base = SparseConfig(block_size=16, budget=Budget.ratio(0.25))
    sparse = sparse_config_for("gsa-on-device", base, preset=preset)
    cfg = GSAOnDeviceConfig(top_k_tokens=96, seq_len_threshold=0)
    policy = make_policy("gsa-on-device", gsa_on_device=cfg, preset=preset)
    bits = GSA_ON_DEVICE_HASH_BITS_PER_DIM[preset] * d
    with Engine(TorchBackend(model, attention="reference"), policy, sparse=sparse,
                config=RuntimeConfig(max_batch=1, max_seq_len=512, prefill_chunk=128)) as eng:
        prompt = torch.randint(0, 256, (300,), generator=torch.Generator().manual_seed(0)).tolist()
        [res] = eng.generate(prompt, SamplingParams(max_new_tokens=4))
        assert len(res.token_ids) == 4
        codes = next(iter(policy.codes.values()))
        assert codes.shape[-1] == bits // 8
        enc = next(iter(policy.encoders.values()))
        assert tuple(enc.weight.shape[-2:]) == (d, bits)
        assert eng.stats()["policy"]["sparse_steps"] > 0


def test_a_width_that_is_not_whole_bytes_is_refused_at_bind(bind_policy):
    from ucm_trt.sparse.policies import GSAOnDevicePolicy

    sparse = sparse_config_for("gsa-on-device", SparseConfig(block_size=16, budget=Budget.ratio(0.25)))
    policy = GSAOnDevicePolicy(GSAOnDeviceConfig(hash_bits_per_dim=1, top_k_tokens=96))
    with pytest.raises(ValueError, match=r"head_dim 12 x GSAOnDeviceConfig.hash_bits_per_dim 1 = 12 bits is not a "
                                         r"multiple of 8; set GSAOnDeviceConfig.hash_bits"):
        bind_policy(policy, 2, 4, 2, 12, sparse)
