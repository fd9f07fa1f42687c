"""KVStar's channel ratio per preset (``KVStarConfig.channel_ratio``): ``default`` takes
:data:`~ucm_trt.runtime.algorithms.KVSTAR_CHANNEL_RATIO` (0.5), ``ucm`` upstream's 0.25, an explicit ratio is
kept, a config built outside a preset keeps upstream's, and the policy's sub-block representations keep that
many channels per KV head."""

from __future__ import annotations

import pytest
import torch

from tests.runtime.conftest import tiny_llama
from ucm_trt.config import Budget, KVStarConfig, SparseConfig
from ucm_trt.runtime import Engine, RuntimeConfig, SamplingParams, TorchBackend
from ucm_trt.runtime.algorithms import KVSTAR_CHANNEL_RATIO, kvstar_for_preset, make_policy, sparse_config_for
from ucm_trt.sparse.policies import KVStarPolicy


def test_presets_fill_an_open_ratio_and_keep_a_given_one():
    assert KVSTAR_CHANNEL_RATIO == {"default": 0.5, "ucm": 0.25}
    assert make_policy("kvstar").config.channel_ratio == 0.5
    assert make_policy("kvstar", preset="ucm").config.channel_ratio == 0.25
    given = KVStarConfig(channel_ratio=1.0, retrieval_stride=4)
    kept = make_policy("kvstar", kvstar=given).config
    assert kept == given
    open_stride = make_policy("kvstar", kvstar=KVStarConfig(retrieval_stride=4)).config
    assert open_stride.channel_ratio == 0.5 and open_stride.retrieval_stride == 4
    # outside a preset (a policy built directly, the recall curves): upstream's 0.25
    assert KVStarConfig().channel_ratio is None and KVStarConfig().kept_ratio == 0.25
    assert KVStarConfig().kept_channels(128) == 32 and KVStarConfig(channel_ratio=0.5).kept_channels(128) == 64
    assert KVStarPolicy().config.kept_ratio == 0.25
    with pytest.raises(TypeError, match="kvstar must be a KVStarConfig"):
        kvstar_for_preset({"channel_ratio": 0.5})
    with pytest.raises(ValueError, match="preset"):
        kvstar_for_preset(None, "fast")


@pytest.mark.parametrize("preset", ["default", "ucm"])
def test_the_sub_block_representations_keep_the_preset_channels(preset):
    """Bound in an engine, each layer's prepared vote keeps ratio x head_dim channels per KV head, and
    decoding runs."""
    model = tiny_llama()
    d = model.config.hidden_size // model.config.num_attention_heads
    base = SparseConfig(block_size=16, budget=Budget.ratio(0.25))
    sparse = sparse_config_for("kvstar", base, preset=preset)
    policy = make_policy("kvstar", kvstar=KVStarConfig(retrieval_stride=2), preset=preset)
    with Engine(TorchBackend(model, attention="reference"), policy, sparse=sparse,
                config=RuntimeConfig(max_batch=1, max_seq_len=512, prefill_chunk=128)) as eng:
        prompt = torch.randint(0, 256, (300,), generator=torch.Generator().manual_seed(0)).tolist()
        rid = eng.add_request(prompt, SamplingParams(max_new_tokens=6))
        while rid not in policy._state:  # the prefill's chunks: representations laid out at its end
            eng.step()
        votes = policy._state[rid].votes
        assert votes and all(v.channels.shape[-1] == round(KVSTAR_CHANNEL_RATIO[preset] * d) for v in votes)
        while eng.has_work:
            eng.step()
        assert len(eng.result(rid).token_ids) == 6
