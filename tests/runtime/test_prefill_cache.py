"""PrefillCache: a prefill recorded by one engine and replayed by another gives every algorithm the
same tokens, pool and policy inputs as computing it; what it cannot stand for is refused or not kept."""

from __future__ import annotations

import pytest
import torch

from ucm_trt.config import Budget, DenseLayers, GSAOnDeviceConfig, PrefillWindow, ReRoPEConfig, SparseConfig
from ucm_trt.runtime import Engine, RuntimeConfig, SamplingParams, TorchBackend
from ucm_trt.runtime.algorithms import make_policy, sparse_config_for
from ucm_trt.runtime.prefill_cache import PrefillCache, PrefillRecording
from ucm_trt.sparse.policies.dense import DensePolicy

PROMPTS = 2
STEPS = 24


def _prompts(vocab=256):
    g = torch.Generator().manual_seed(7)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in (300, 233)]


def _engine(backend, algorithm, cache, **policy_kw):
    sparse = sparse_config_for(algorithm, SparseConfig(block_size=16, budget=Budget.ratio(0.25), retrieval_stride=1,
                                                       min_blocks=4, local_blocks=2, sink_blocks=1))
    if algorithm != "dense":
        policy_kw.setdefault("dense_layers", DenseLayers())
    if algorithm == "gsa-on-device":  # its gate open at these lengths, 4 blocks of 16
        policy_kw.setdefault("gsa_on_device", GSAOnDeviceConfig(top_k_tokens=64, seq_len_threshold=0))
    rt = RuntimeConfig(max_batch=2, max_seq_len=512, prefill_chunk=128, cache_blocks=0)
    return Engine(backend, make_policy(algorithm, **policy_kw), sparse=sparse, config=rt, prefill_cache=cache)


def _run(eng):
    with eng:
        res = eng.generate(_prompts(), SamplingParams(max_new_tokens=STEPS))
        return [r.token_ids for r in res], eng.stats()


@pytest.fixture(scope="module")
def backend():
    from tests.runtime.conftest import tiny_llama

    return TorchBackend(tiny_llama(), attention="reference")


@pytest.mark.parametrize("algorithm", ["esa", "gsa", "gsa-on-device", "kvstar"])
def test_a_replayed_prefill_decodes_the_same_tokens_as_a_computed_one(backend, algorithm):
    """Dense records, the algorithm replays: the same tokens as the algorithm computing its own prefill
    (with a cache of its own: the same chunking) and as without any cache (this prompt's chunking does
    not depend on the capture width). GSA On-Device's hash codes come from ``on_append``: a replay that
    only wrote the pool would decode differently."""
    shared = PrefillCache(backend)
    _run(_engine(backend, "dense", shared))
    assert len(shared) == PROMPTS and shared.misses == PROMPTS and shared.hits == 0
    replayed, stats = _run(_engine(backend, algorithm, shared))
    assert shared.hits == PROMPTS
    computed, _ = _run(_engine(backend, algorithm, PrefillCache(backend)))
    plain, plain_stats = _run(_engine(backend, algorithm, None))
    assert replayed == computed == plain
    assert stats["policy"] == plain_stats["policy"]
    assert 0 < stats["policy"]["selected_block_fraction"] < 0.9  # it did decode sparsely


def test_prefill_window_queries_are_the_policys_own_window(backend):
    """A policy with a query window of 8 gets the last 8 prompt queries per layer from a recording of
    32, exactly those a cache-less engine captures."""
    seen = {}

    class Spy(DensePolicy):
        query_window = 8

        def on_prefill_end(self, req, queries):
            seen.setdefault(self.tag, []).append([q.clone() for q in queries])

    def run(cache, tag):
        p = Spy()
        p.tag = tag
        rt = RuntimeConfig(max_batch=2, max_seq_len=512, prefill_chunk=128, cache_blocks=0)
        with Engine(backend, p, sparse=SparseConfig(block_size=16), config=rt, prefill_cache=cache) as eng:
            eng.generate(_prompts(), SamplingParams(max_new_tokens=2))

    cache = PrefillCache(backend, query_window=32)
    run(cache, "record")
    run(cache, "replay")
    run(None, "plain")
    assert cache.hits == PROMPTS
    for a, b, c in zip(seen["record"], seen["replay"], seen["plain"], strict=True):
        for qa, qb, qc in zip(a, b, c, strict=True):
            assert qa.shape[1] == 8
            torch.testing.assert_close(qa, qc, atol=0, rtol=0)
            torch.testing.assert_close(qb, qc, atol=0, rtol=0)


def test_an_esa_prefill_window_policy_replays_from_dense(backend):
    window = PrefillWindow(tokens=8)
    shared = PrefillCache(backend)
    _run(_engine(backend, "dense", shared))
    replayed, _ = _run(_engine(backend, "esa", shared, prefill_window=window))
    plain, _ = _run(_engine(backend, "esa", None, prefill_window=window))
    assert shared.hits == PROMPTS and replayed == plain


def test_a_prefill_in_which_the_policy_selected_blocks_is_not_recorded(backend):
    class SelectsInPrefill(DensePolicy):
        def layer_selection(self, layer, q, step):  # every block, during the prefill chunks only
            if q.shape[2] == 1:
                return None
            nb = -(-int(step.seq_lens.max()) // self.sparse.block_size)
            b, hkv = q.shape[0], self.shape.num_kv_heads
            return torch.arange(nb, dtype=torch.int32).expand(b, hkv, nb).contiguous()

    cache = PrefillCache(backend)
    rt = RuntimeConfig(max_batch=2, max_seq_len=512, prefill_chunk=128, cache_blocks=0)
    with Engine(backend, SelectsInPrefill(), sparse=SparseConfig(block_size=16), config=rt, prefill_cache=cache) as e:
        e.generate(_prompts(), SamplingParams(max_new_tokens=2))
    assert len(cache) == 0 and cache.misses == PROMPTS


def test_what_a_cache_cannot_serve_is_refused(backend):
    from tests.runtime.conftest import tiny_llama

    cache = PrefillCache(backend, query_window=4)
    with pytest.raises(TypeError, match="prefill_cache must be a PrefillCache"):
        Engine(backend, config=RuntimeConfig(max_seq_len=512), prefill_cache={})
    with pytest.raises(ValueError, match="another backend"):
        Engine(TorchBackend(tiny_llama(), attention="reference"), config=RuntimeConfig(max_seq_len=512),
               prefill_cache=cache)
    with pytest.raises(ValueError, match="ReRoPE"):
        Engine(backend, make_policy("rerope", rerope=ReRoPEConfig(window=64, training_length=512)),
               sparse=SparseConfig(block_size=16), config=RuntimeConfig(max_seq_len=512), prefill_cache=cache)
    with pytest.raises(ValueError, match=r"keeps 4 prompt queries per layer, the 'esa' policy needs 8"):
        Engine(backend, make_policy("esa", prefill_window=PrefillWindow(tokens=8)), sparse=SparseConfig(block_size=16),
               config=RuntimeConfig(max_seq_len=512), prefill_cache=cache)
    with pytest.raises(TypeError, match="backend must be a ucm_trt Backend"):
        PrefillCache(object())
    for bad in (0, True, 1.5):
        with pytest.raises(ValueError, match="query_window must be an int >= 1"):
            PrefillCache(backend, query_window=bad)
    with pytest.raises(ValueError, match="max_bytes must be an int >= 0"):
        PrefillCache(backend, max_bytes=-1)


def test_least_recently_used_recordings_go_first_past_max_bytes(backend):
    def rec(n):
        return PrefillRecording(kv=((torch.zeros(n), torch.zeros(n)),), queries=(), logits=torch.zeros(1))

    one = rec(10).nbytes  # 2 * 40 + 4 bytes
    cache = PrefillCache(backend, max_bytes=2 * one)
    cache.store(("a",), rec(10))
    cache.store(("b",), rec(10))
    assert cache.lookup(("a",)) is not None  # a is now the most recent
    cache.store(("c",), rec(10))
    assert cache.lookup(("b",)) is None and cache.lookup(("a",)) is not None and len(cache) == 2
    cache.store(("big",), rec(100))  # larger than the bound: not kept, nothing evicted for it
    assert cache.lookup(("big",)) is None and len(cache) == 2
    assert cache.stats()["prefill_cache_bytes"] == 2 * one
    cache.clear()
    assert len(cache) == 0 and cache.stats()["prefill_cache_bytes"] == 0
