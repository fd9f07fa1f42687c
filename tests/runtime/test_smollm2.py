"""The runtime on the small trained model (SmolLM2-135M-Instruct): exactness and every policy's stats.

Prompts are real text (the passkey haystack) of 300-480 tokens with block_size 16, so the
sparse policies really drop blocks (budget 25% of the candidates).
"""

from __future__ import annotations

import pytest
import torch

from ucm_trt.config import Budget, GSAOnDeviceConfig, KVStarConfig, ReRoPEConfig, SparseConfig
from ucm_trt.runtime import Engine, RuntimeConfig, SamplingParams, TorchBackend
from ucm_trt.runtime.algorithms import make_policy, sparse_config_for

STEPS = 64
NEW = 6  # tokens per policy in the long-prompt test: 5 decode steps hold a submit and a collect for each schedule


def _prompt(tok, n, key="58113"):
    from ucm_trt.models import build_passkey_prompt

    return build_passkey_prompt(tok, num_tokens=n, passkey=key, depth=0.3).input_ids[0].tolist()


def _engine(model, algorithm, *, budget=None, stride=3, max_seq=1024, **kw):
    budget = Budget.ratio(0.25) if budget is None else budget
    sparse = sparse_config_for(algorithm, SparseConfig(block_size=16, budget=budget, retrieval_stride=stride,
                                                       sink_blocks=1, local_blocks=2, min_blocks=4))
    return Engine(TorchBackend(model, attention="reference"), make_policy(algorithm, **kw), sparse=sparse,
                  config=RuntimeConfig(max_batch=1, max_seq_len=max_seq, prefill_chunk=512, cache_blocks=2))


@pytest.fixture(scope="module")
def short_prompt(smollm2):
    _, tok = smollm2
    return _prompt(tok, 300)


@pytest.fixture(scope="module")
def dense_short(smollm2_paged, short_prompt):
    model, _ = smollm2_paged
    with _engine(model, "dense") as eng:
        [res] = eng.generate(short_prompt, SamplingParams(max_new_tokens=STEPS))
    return res.token_ids


def test_dense_runtime_matches_hf_sdpa_greedy(smollm2, short_prompt, dense_short):
    model, _ = smollm2  # the shared, unmodified SDPA model is the independent oracle
    with torch.no_grad():
        out = model.generate(torch.tensor([short_prompt]), max_new_tokens=STEPS, do_sample=False,
                             attention_mask=torch.ones(1, len(short_prompt), dtype=torch.long))
    assert dense_short == out[0, len(short_prompt):].tolist()


def test_select_all_esa_with_offload_equals_dense_greedy(smollm2_paged, short_prompt, dense_short):
    model, _ = smollm2_paged
    with _engine(model, "esa", budget=Budget.ratio(1.0), stride=4) as eng:
        [res] = eng.generate(short_prompt, SamplingParams(max_new_tokens=STEPS))
        stats = eng.stats()
    assert len(res.token_ids) == STEPS
    assert res.token_ids == dense_short
    assert stats["offload"] and stats["retrieval_tasks"] > 0 and stats["bytes_d2h_total"] > 0
    assert stats["policy"]["selected_block_fraction"] == 1.0


POLICIES = {
    "esa": dict(stride=3),
    "gsa": dict(stride=2),
    "kvstar": dict(stride=2, kvstar=KVStarConfig(retrieval_stride=2)),
    "gsa-on-device": dict(gsa_on_device=GSAOnDeviceConfig(top_k_tokens=192, seq_len_threshold=256,
                                                          rollback_layers=(0, 1), layer_reuse={5: 4})),
    "rerope": dict(rerope=ReRoPEConfig(window=256, training_length=8192)),
}


@pytest.fixture(scope="module")
def long_prompt(smollm2):
    _, tok = smollm2
    return _prompt(tok, 480, key="90417")


@pytest.fixture(scope="module")
def dense_long(smollm2_paged, long_prompt):
    model, _ = smollm2_paged
    with _engine(model, "dense") as eng:
        [res] = eng.generate(long_prompt, SamplingParams(max_new_tokens=NEW))
        return res.token_ids, eng.stats()


@pytest.mark.parametrize("algorithm", list(POLICIES))
def test_every_policy_runs_a_long_prompt_and_reports_stats(algorithm, smollm2_paged, long_prompt, dense_long):
    model, _ = smollm2_paged
    dense_tokens, dense_stats = dense_long
    with _engine(model, algorithm, **POLICIES[algorithm]) as eng:
        [res] = eng.generate(long_prompt, SamplingParams(max_new_tokens=NEW))
        stats = eng.stats()
        steps = list(eng.metrics.steps)
        block_bytes = eng.kv.block_bytes
        assert eng.kv.device_blocks_held() == 0 and eng.kv.host_bytes_held() == 0  # everything returned
    assert len(res.token_ids) == NEW and res.finish_reason == "length"
    assert stats["algorithm"] == algorithm and stats["decode_steps"] == NEW - 1
    assert stats["decode_tokens_per_s"] > 0 and stats["ttft_seconds"]
    # bytes moved are exactly the loaded blocks
    assert stats["bytes_h2d_total"] == sum(s.blocks_loaded for s in steps) * block_bytes
    if algorithm != "rerope":
        # the prefill is dense for every block-sparse policy: the first token is dense's
        assert res.token_ids[0] == dense_tokens[0]
        frac = stats["policy"]["selected_block_fraction"]
        assert 0 < frac < 0.6, frac
    if algorithm in ("esa", "gsa", "kvstar"):
        assert stats["offload"]
        assert stats["retrieval_tasks"] >= 2 and stats["retrieval_mean_ms"] > 0
        assert stats["policy"]["retrievals"] >= 2  # the prefill-end retrieval and at least one in decode
        assert stats["device_kv_bytes_last_decode"] < 0.6 * stats["dense_kv_bytes_last_decode"]
        assert stats["device_kv_over_working_set"] <= 1.5  # DESIGN §5 offload target
        assert 0 < stats["cache_hit_rate"] <= 1
    else:
        assert stats["device_kv_bytes_last_decode"] == dense_stats["device_kv_bytes_last_decode"]
    if algorithm == "gsa-on-device":
        assert stats["policy"]["sparse_steps"] == NEW - 1 and stats["policy"]["rollback_layers"] == [0, 1]


@pytest.fixture(scope="module")
def smollm2_ort_esa(tmp_path_factory):
    """SmolLM2 exported and rewritten for ESA (block 16): the graph the ONNX Runtime backend runs."""
    from ucm_trt.chat.prepare import prepare_onnx

    return prepare_onnx(tmp_path_factory.mktemp("smollm2_onnx"), algorithm="esa", block_size=16)


def test_ort_dense_and_select_all_esa_equal_torch_greedy_over_64_steps(smollm2_ort_esa, short_prompt, dense_short):
    """DESIGN §3 / issue 5: on ONNX Runtime, over the rewritten SmolLM2, dense and select-all sparse give
    the same 64 greedy tokens as each other and as the PyTorch backend (itself equal to HF generate)."""
    from ucm_trt.runtime.backends.ort_backend import OrtBackend

    backend = OrtBackend(smollm2_ort_esa, max_positions=8192)
    runs = {}
    for algorithm, budget in (("dense", None), ("esa", Budget.ratio(1.0))):
        sparse = sparse_config_for(algorithm, SparseConfig(block_size=16, budget=budget or Budget.ratio(0.25),
                                                           retrieval_stride=3, sink_blocks=1, local_blocks=2,
                                                           min_blocks=4))
        with Engine(backend, make_policy(algorithm), sparse=sparse,
                    config=RuntimeConfig(max_batch=1, max_seq_len=1024, prefill_chunk=512, cache_blocks=2)) as eng:
            [res] = eng.generate(short_prompt, SamplingParams(max_new_tokens=STEPS))
            stats = eng.stats()
        assert len(res.token_ids) == STEPS
        runs[algorithm] = res.token_ids
        if algorithm == "esa":
            assert stats["policy"]["retrievals"] > 0, stats  # the sparse path really ran
    assert runs["dense"] == dense_short
    assert runs["esa"] == runs["dense"]
