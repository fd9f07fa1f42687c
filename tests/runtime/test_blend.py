"""Blend: chunk KV cached at position 0 under chained block hashes, reused at a new offset with
delta-RoPE, selective recompute from a chosen layer (tiny random Llama)."""

from __future__ import annotations

import pytest
import torch

from ucm_trt.config import BlendConfig, SparseConfig
from ucm_trt.reference import delta_rope
from ucm_trt.runtime import Engine, RuntimeConfig, SamplingParams, TorchBackend
from ucm_trt.runtime.algorithms import make_policy, sparse_config_for
from ucm_trt.runtime.blend import BlendRunner

from .conftest import tiny_llama

BS = 16


@pytest.fixture(scope="module")
def model():
    return tiny_llama(layers=3)


@pytest.fixture(scope="module")
def parts():
    g = torch.Generator().manual_seed(3)
    chunks = [torch.randint(0, 256, (64,), generator=g).tolist() for _ in range(3)]
    suffix = torch.randint(0, 256, (20,), generator=g).tolist()
    return chunks, suffix


def _engine(model, policy="dense"):
    return Engine(TorchBackend(model, attention="reference"), make_policy(policy),
                  sparse=sparse_config_for(policy, SparseConfig(block_size=BS)),
                  config=RuntimeConfig(max_batch=1, max_seq_len=512, prefill_chunk=512))


@pytest.fixture(scope="module")
def full(model, parts):
    chunks, suffix = parts
    with _engine(model) as eng:
        [res] = eng.generate([t for c in chunks for t in c] + suffix, SamplingParams(max_new_tokens=12))
    return res


def test_reused_chunk_k_is_delta_rotated_to_its_new_offset(model, parts):
    """Layer 0's K depends only on the token and its position, so a chunk cached at position 0 and
    rotated by its new offset must equal the K that a full prefill computes there."""
    chunks, suffix = parts
    eng = _engine(model)
    runner = BlendRunner(eng, BlendConfig(recompute_layer=1, recompute_ratio=0.0))
    assert runner.cache_chunk(chunks[1]) == 4 and len(runner.cache) == 4
    prompt = chunks[0] + chunks[1] + suffix
    rid = eng.add_request(prompt, SamplingParams(max_new_tokens=1))
    while eng._requests[rid].finish_reason is None:
        eng.step()  # the request is freed when it finishes: read the pool through a fresh prefill instead
    eng.kv.add_request("probe")
    eng._prefilling = None
    from ucm_trt.runtime.kv import StepTransfer

    eng.kv.plan_step(["probe"], [len(prompt)], [[None]] * 3, StepTransfer())
    eng._write_slots(["probe"], [0], len(prompt))
    ctx = eng._context(["probe"], len(prompt), [len(prompt)], [None] * 3)
    eng.backend.forward(torch.tensor([prompt]), torch.arange(len(prompt))[None], ctx)
    keys = runner.cache.block_hashes(chunks[1])
    for j, key in enumerate(keys):
        cached = runner.cache.get(key)[0, 0]  # layer 0, K: [Hkv, bs, D]
        moved = delta_rope(cached, torch.full((BS,), 64, dtype=torch.long), theta=eng.shape.rope_theta)
        phys = int(eng.kv.tables_host[0, 0, 4 + j])
        torch.testing.assert_close(moved, eng.kv.pools[0][phys, 0], rtol=1e-5, atol=1e-5)
    # a different prefix before the same tokens gives a different chain: only whole-chunk prefixes hit
    assert runner.cache.block_hashes(chunks[0] + chunks[1])[4:] != keys
    eng.kv.free_request("probe")
    eng.close()


def test_full_recompute_from_layer_0_equals_full_prefill(model, parts, full):
    chunks, suffix = parts
    with _engine(model) as eng:
        runner = BlendRunner(eng, BlendConfig(recompute_layer=0, recompute_ratio=1.0))
        for c in chunks:
            runner.cache_chunk(c)
        res = runner.generate(chunks, suffix, SamplingParams(max_new_tokens=12))
        assert eng.kv.device_blocks_held() == 0
    assert res.token_ids == full.token_ids
    assert runner.stats["reused_blocks"] == 12 and runner.stats["recomputed_tokens"] == 192


def test_selective_recompute_keeps_reused_kv_of_unselected_tokens(model, parts, full):
    chunks, suffix = parts
    eng = _engine(model)
    runner = BlendRunner(eng, BlendConfig(recompute_layer=1, recompute_ratio=0.25))
    for c in chunks[1:]:
        runner.cache_chunk(c)  # chunk 0 is not cached: its blocks are computed
    rid = runner.add_request(chunks, suffix, SamplingParams(max_new_tokens=12))
    assert runner.stats["reused_blocks"] == 8 and runner.stats["recomputed_tokens"] == int(0.25 * 128)
    # layer 2 (after the recompute layer): an unselected reused token still holds the cached K, rotated
    unchanged = 0
    for j, key in enumerate(runner.cache.block_hashes(chunks[2])):
        cached = delta_rope(runner.cache.get(key)[2, 0], torch.full((BS,), 128, dtype=torch.long),
                            theta=eng.shape.rope_theta)
        phys = int(eng.kv.tables_host[2, 0, 8 + j])
        cur = eng.kv.pools[2][phys, 0]
        kept = torch.isclose(cur, cached, atol=1e-5).all(dim=(0, 2))  # [bs]: tokens still holding the reused K
        unchanged += int(kept.sum())
        # ... and their V is this block's cached V, unrotated (V carries no position)
        cur_v, cached_v = eng.kv.pools[2][phys, 1], runner.cache.get(key)[2, 1]
        torch.testing.assert_close(cur_v[:, kept], cached_v[:, kept].to(cur_v.dtype), rtol=0, atol=0)
    assert 0 < unchanged < 64
    while eng._requests[rid].finish_reason is None:
        eng.step()
    res = eng.result(rid)
    assert len(res.token_ids) == 12 and res.ttft_seconds > 0
    assert eng.kv.device_blocks_held() == 0
    eng.close()


@pytest.mark.parametrize("layer", [1, 2])
def test_recomputing_every_token_from_a_later_layer_equals_full_prefill(layer, model, parts, full):
    """Ratio 1.0 at layer r: the row-dropping path (scattered queries) runs for every token from r on
    and must reproduce the full prefill exactly; with a smaller ratio the output is approximate."""
    chunks, suffix = parts
    with _engine(model) as eng:
        runner = BlendRunner(eng, BlendConfig(recompute_layer=layer, recompute_ratio=1.0))
        for c in chunks[1:]:
            runner.cache_chunk(c)
        res = runner.generate(chunks, suffix, SamplingParams(max_new_tokens=12))
    assert res.token_ids == full.token_ids
    assert runner.stats["recomputed_tokens"] == 128 and runner.stats["reused_tokens"] == 0


def test_too_few_hits_falls_back_to_full_prefill_and_says_so(model, parts, full):
    chunks, suffix = parts
    with _engine(model) as eng:
        runner = BlendRunner(eng, BlendConfig(recompute_layer=1, min_reused_blocks=100))
        for c in chunks:
            runner.cache_chunk(c)
        res = runner.generate(chunks, suffix, SamplingParams(max_new_tokens=12))
    assert runner.stats["fallbacks"] == 1 and runner.stats["reused_blocks"] == 0
    assert res.token_ids == full.token_ids


def test_blend_rejects_bad_input(model, parts):
    chunks, suffix = parts
    with _engine(model) as eng:
        runner = BlendRunner(eng, BlendConfig(recompute_layer=1))
        with pytest.raises(ValueError, match="not a multiple of block_size 16"):
            runner.cache_chunk(chunks[0][:30])
        with pytest.raises(ValueError, match=r"chunks\[1\] has 50 tokens"):
            runner.add_request([chunks[0], chunks[1][:50]], suffix)
        with pytest.raises(ValueError, match=r"exceed RuntimeConfig.prefill_chunk \(512\)"):
            runner.add_request([chunks[0]] * 8 + [chunks[1]], suffix)
        with pytest.raises(ValueError, match="recompute_layer must be < num_layers"):
            BlendRunner(eng, BlendConfig(recompute_layer=3))
    with _engine(model, "esa") as eng:
        with pytest.raises(ValueError, match="the esa policy offloads it"):
            BlendRunner(eng, BlendConfig())
