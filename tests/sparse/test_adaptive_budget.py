"""Adaptive budget: the missed-mass estimate, widening to the fewest blocks that meet it, the dense
fallback, and ESA / GSA reporting what it did (and reproducing dense when every layer falls back)."""

from __future__ import annotations

import math

import pytest
import torch

from tests.runtime.conftest import tiny_llama
from ucm_trt.config import AdaptiveBudget, Budget, DenseLayers, SparseConfig
from ucm_trt.runtime import Engine, RuntimeConfig, SamplingParams, TorchBackend
from ucm_trt.runtime.algorithms import make_policy, sparse_config_for
from ucm_trt.sparse.adaptive import adaptive_select, estimated_missed_mass
from ucm_trt.sparse.batched import select_batched
from ucm_trt.sparse.select import selection_mask


def test_estimated_missed_mass_matches_direct_formula():
    g = torch.Generator().manual_seed(0)
    s = torch.randn(2, 3, 10, generator=g) * 3
    lens = torch.tensor([4, 4, 4, 4, 4, 4, 4, 4, 4, 2])
    sel = torch.rand(2, 3, 10, generator=g) > 0.5
    got = estimated_missed_mass(s, sel, lens, 0.5)
    w = lens * torch.exp(0.5 * s.double())
    want = (w * ~sel).sum(-1) / w.sum(-1)
    torch.testing.assert_close(got, want.float())


def _sparse(selection="per_head", ratio=0.1):
    return SparseConfig(block_size=16, budget=Budget.ratio(ratio), sink_blocks=1, local_blocks=2, min_blocks=4,
                        selection=selection)


@pytest.mark.parametrize("selection", ["shared", "per_head"])
def test_no_widening_when_the_target_is_met_equals_the_plain_budget(selection):
    g = torch.Generator().manual_seed(1)
    scores = torch.randn(3, 2, 40, generator=g)
    sparse = _sparse(selection)
    sel, out = adaptive_select(scores, 40, torch.full((40,), 16), sparse, AdaptiveBudget(max_missed=1.0), scale=1.0)
    want = select_batched(scores, 40, sparse, "dot", 2)
    assert torch.equal(sel[..., : want.shape[-1]], want) and bool((sel[..., want.shape[-1]:] == -1).all())
    assert not out.widened.any() and not out.dense.any() and out.extra_blocks == 0


def test_widening_keeps_the_fewest_blocks_that_meet_the_target():
    nb, scale = 40, 1.0
    scores = torch.zeros(1, 1, nb)
    scores[0, 0, 5:15] = 3.0  # ten equally strong candidates; ratio 0.1 of 37 keeps 3
    lens = torch.full((nb,), 16)
    rule = AdaptiveBudget(max_missed=0.2, max_ratio=0.5)
    sel, out = adaptive_select(scores, nb, lens, _sparse(), rule, scale=scale)
    mask = selection_mask(sel.long(), nb)[0, 0]
    missed = float(estimated_missed_mass(scores[0, 0], mask, lens, scale))
    assert missed <= 0.2 and bool(out.widened[0]) and not bool(out.dense[0])
    # one block fewer would miss more than the target
    chosen = [b for b in range(5, 15) if mask[b]]
    fewer = mask.clone()
    fewer[chosen[-1]] = False
    assert float(estimated_missed_mass(scores[0, 0], fewer, lens, scale)) > 0.2
    assert out.missed_before[0, 0] > 0.2 and out.missed_after[0, 0] == pytest.approx(missed, abs=1e-6)
    assert out.extra_blocks == int(mask.sum()) - (3 + 3)


@pytest.mark.parametrize("fallback", [True, False])
def test_layer_needing_more_than_the_cap_goes_dense_or_keeps_the_cap(fallback):
    nb = 40
    scores = torch.zeros(2, 1, nb)
    scores[1] = torch.randn(1, nb, generator=torch.Generator().manual_seed(2)) * 0.01  # flat: diffuse
    scores[0, 0, 7] = 50.0  # one dominant block: the plain budget suffices
    rule = AdaptiveBudget(max_missed=0.05, max_ratio=0.25, dense_fallback=fallback)
    sel, out = adaptive_select(scores, nb, torch.full((nb,), 16), _sparse(), rule, scale=1.0)
    assert out.dense.tolist() == [False, fallback]
    n1 = int((sel[1] >= 0).sum())
    assert n1 == (nb if fallback else 3 + int(0.25 * 37))
    assert int((sel[0] >= 0).sum()) == 3 + 3 and 7 in sel[0, 0].tolist()


def test_adaptive_budget_config_validation():
    with pytest.raises(ValueError, match=r"AdaptiveBudget.max_missed must be in \(0, 1\], got 0"):
        AdaptiveBudget(max_missed=0)
    with pytest.raises(ValueError, match="adaptive= is implemented for esa and gsa"):
        make_policy("kvstar", adaptive=AdaptiveBudget())


@pytest.mark.parametrize("algorithm", ["esa", "gsa"])
def test_policies_report_and_dense_fallback_reproduces_dense(algorithm):
    model = tiny_llama()
    prompt = torch.randint(0, 256, (200,), generator=torch.Generator().manual_seed(4)).tolist()
    sparse = sparse_config_for(algorithm, SparseConfig(block_size=16, budget=Budget.ratio(0.1), min_blocks=4,
                                                       retrieval_stride=2))

    def run(policy):
        with Engine(TorchBackend(model, attention="reference"), policy, sparse=sparse,
                    config=RuntimeConfig(max_batch=1, max_seq_len=512, prefill_chunk=64)) as eng:
            [res] = eng.generate(prompt, SamplingParams(max_new_tokens=8))
            return res.token_ids, eng.stats()["policy"]

    dense_ids, _ = run(make_policy("dense"))
    # an unreachable target with a tiny cap: every layer of every retrieval falls back to dense
    ids, st = run(make_policy(algorithm, dense_layers=DenseLayers(),
                              adaptive=AdaptiveBudget(max_missed=1e-12, max_ratio=0.05)))
    a = st["adaptive"]
    assert ids == dense_ids
    assert a["layer_retrievals"] > 0 and a["dense"] == a["layer_retrievals"] and a["widened"] == 0
    assert a["extra_bytes_per_use"] > 0 and a["dense_fraction"] == 1.0
    # a loose target: nothing fires
    _, st = run(make_policy(algorithm, dense_layers=DenseLayers(), adaptive=AdaptiveBudget(max_missed=1.0)))
    assert st["adaptive"]["widened"] == 0 and st["adaptive"]["dense"] == 0 and st["adaptive"]["extra_blocks"] == 0
    assert math.isclose(st["adaptive"]["extra_block_fraction"], 0.0)
