"""Dense (rollback) layers: detection from the prefill's attention, and every policy honouring them.

Detection is checked against an independent computation (attention probabilities -> block mass
-> best blocks); the policies are checked end to end on a tiny Llama: with every layer dense, a
sparse policy must reproduce dense greedy decoding exactly, and a layer marked dense must be read
in full (its selection is ``None`` in every plan) while the others stay sparse."""

from __future__ import annotations

import math

import pytest
import torch

from tests.runtime.conftest import tiny_llama
from ucm_trt.config import Budget, DenseLayers, KVStarConfig, SparseConfig
from ucm_trt.runtime import Engine, RuntimeConfig, SamplingParams, TorchBackend
from ucm_trt.runtime.algorithms import default_dense_layers, make_policy, sparse_config_for
from ucm_trt.sparse.dense_layers import detect_dense_layers, layer_oracle_recall

BS = 16


def _independent_oracle_recall(q, k, bs, keep, sink, local):
    """Oracle recall by hand: per KV head, the mass of the sink + local blocks + the ``keep`` best
    candidate blocks (by the mass summed over the group's heads and queries), plus the query tokens."""
    hq, w, d = q.shape
    hkv, t, _ = k.shape
    g = hq // hkv
    kk = k.repeat_interleave(g, 0)
    logits = torch.einsum("hwd,htd->hwt", q, kk) / math.sqrt(d)
    pos_q = torch.arange(t - w, t)[:, None]
    logits = logits.masked_fill(torch.arange(t)[None, :] > pos_q, float("-inf"))
    p = torch.softmax(logits, -1)  # [Hq, W, T]
    nb = -(-t // bs)
    visible_q = torch.arange(t)[None, :] >= t - w
    total = 0.0
    for h in range(hkv):
        ph = p[h * g:(h + 1) * g]  # [G, W, T]
        pq = ph * (~visible_q).float()
        mass = torch.stack([pq[..., b * bs:(b + 1) * bs].sum() for b in range(nb)])
        forced = set(range(sink)) | set(range(nb - local, nb))
        cands = sorted((b for b in range(nb) if b not in forced), key=lambda b: -float(mass[b]))
        chosen = forced | set(cands[:keep])
        tok = torch.zeros(t, dtype=torch.bool)
        for b in chosen:
            tok[b * bs:(b + 1) * bs] = True
        tok |= visible_q[0]
        total += float((ph * tok.float()).sum(-1).mean())
    return total / hkv


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_layer_oracle_recall_matches_independent_computation(seed):
    g = torch.Generator().manual_seed(seed)
    hq, hkv, d, t, w = 4, 2, 8, 16 * 12 + 5, 3
    q = torch.randn(hq, w, d, generator=g) * 2
    k = torch.randn(hkv, t, d, generator=g) * 2
    sparse = SparseConfig(block_size=BS, budget=Budget.ratio(0.25), selection="per_head", min_blocks=4)
    nb = -(-t // BS)
    keep = sparse.budget.num_blocks(nb - 3)
    want = _independent_oracle_recall(q, k, BS, keep, 1, 2)
    assert layer_oracle_recall(q, k, sparse) == pytest.approx(want, abs=1e-5)


def test_layer_oracle_recall_short_prompt_is_one():
    sparse = SparseConfig(block_size=BS, min_blocks=4)
    q, k = torch.randn(2, 1, 8), torch.randn(1, 3 * BS, 8)
    assert layer_oracle_recall(q, k, sparse) == 1.0


def test_detect_dense_layers_threshold_and_fixed_layers():
    g = torch.Generator().manual_seed(3)
    hq, hkv, d, t = 4, 2, 8, 16 * 10
    sharp_k = torch.randn(hkv, t, d, generator=g)
    q_sharp = sharp_k[:, 40:41].repeat_interleave(2, 0) * 8  # attends to one token: not diffuse
    q_flat = torch.zeros(hq, 1, d)  # uniform attention: diffuse
    queries = [q_sharp, q_flat, q_sharp]
    kb = sharp_k.reshape(hkv, t // BS, BS, d).permute(1, 0, 2, 3)
    sparse = SparseConfig(block_size=BS, budget=Budget.ratio(0.125), min_blocks=4)
    dense, rec = detect_dense_layers(queries, lambda layer: kb, t, sparse, DenseLayers(auto=True, threshold=0.8))
    assert dense == {1} and rec[0] > 0.9 and rec[1] < 0.5
    dense, rec = detect_dense_layers(queries, lambda layer: kb, t, sparse, DenseLayers(layers=(2,), auto=True))
    assert dense == {1, 2} and 2 not in rec
    dense, rec = detect_dense_layers(queries, lambda layer: kb, t, sparse, DenseLayers(layers=(0,)))
    assert dense == {0} and rec == {}


def test_dense_layers_config_validation():
    with pytest.raises(ValueError, match=r"DenseLayers.threshold must be in \[0, 1\], got 1.5"):
        DenseLayers(threshold=1.5)
    with pytest.raises(ValueError, match="must not repeat"):
        DenseLayers(layers=(1, 1))
    with pytest.raises(TypeError, match="DenseLayers.layers must be a tuple"):
        DenseLayers(layers=[1])
    with pytest.raises(ValueError, match="names layer 5, but the model has 2 layers"):
        DenseLayers(layers=(5,)).check_num_layers(2)
    with pytest.raises(ValueError, match="algorithm 'dense' cannot be combined with dense_layers="):
        make_policy("dense", dense_layers=DenseLayers())
    assert default_dense_layers("default").auto and not default_dense_layers("ucm").auto


PROMPT = 200
STEPS = 12


@pytest.fixture(scope="module")
def model():
    return tiny_llama()


def _run(model, algorithm, rule, *, preset="default"):
    sparse = sparse_config_for(algorithm, SparseConfig(block_size=BS, budget=Budget.ratio(0.25), min_blocks=4,
                                                       retrieval_stride=2), preset=preset)
    kw = {"kvstar": KVStarConfig(retrieval_stride=2, token_merge=2)} if algorithm == "kvstar" else {}
    if algorithm == "gsa-on-device":
        from ucm_trt.runtime.algorithms import grid_gsa_on_device_config

        kw["gsa_on_device"] = grid_gsa_on_device_config(sparse, PROMPT)
    policy = make_policy(algorithm, preset=preset, dense_layers=rule, **kw) if algorithm != "dense" else \
        make_policy("dense")
    plans = []
    if algorithm != "dense":
        orig = policy.plan

        def spy(reqs):
            out = orig(reqs)
            plans.append([row[0] is None for row in out])
            return out

        policy.plan = spy  # test-only observation of the plans
    prompt = torch.randint(0, 256, (PROMPT,), generator=torch.Generator().manual_seed(9)).tolist()
    with Engine(TorchBackend(model, attention="reference"), policy, sparse=sparse,
                config=RuntimeConfig(max_batch=1, max_seq_len=512, prefill_chunk=64)) as eng:
        [res] = eng.generate(prompt, SamplingParams(max_new_tokens=STEPS))
        stats = eng.stats()["policy"]
    return res.token_ids, stats, plans, policy


@pytest.mark.parametrize("algorithm", ["esa", "gsa", "kvstar", "gsa-on-device"])
def test_every_layer_dense_reproduces_dense_decoding(model, algorithm):
    dense_ids, _, _, _ = _run(model, "dense", None)
    ids, stats, plans, _ = _run(model, algorithm, DenseLayers(layers=(0, 1)))
    assert ids == dense_ids
    assert stats["dense_layer_counts"] == {0: 1, 1: 1}
    # threshold 1.0: auto-detection marks every layer dense (no selection keeps all the mass)
    ids, stats, _, _ = _run(model, algorithm, DenseLayers(auto=True, threshold=1.0))
    assert ids == dense_ids and stats["dense_layer_counts"] == {0: 1, 1: 1} and stats["dense_layers_auto"]


@pytest.mark.parametrize("algorithm", ["esa", "gsa", "kvstar"])
def test_a_dense_layer_is_read_in_full_and_the_other_stays_sparse(model, algorithm):
    _, stats, plans, policy = _run(model, algorithm, DenseLayers(layers=(1,)))
    assert plans and all(p == [False, True] for p in plans)
    assert stats["dense_layer_counts"] == {1: 1}
    # without dense layers neither layer is read in full
    _, _, plans, _ = _run(model, algorithm, DenseLayers())
    assert plans and all(p == [False, False] for p in plans)
