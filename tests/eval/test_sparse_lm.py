"""Real sparse-attention inference through the AttentionInterface: exactness and budgets."""

from __future__ import annotations

import pytest
import torch

from ucm_trt.eval.methods import BASELINES, METHODS, MethodContext, make_selector
from ucm_trt.eval.sparse_lm import SparseRun, continuation_nll, greedy_generate, prefill
from ucm_trt.sparse.recall import attention_mass_recall
from ucm_trt.sparse.representations import HashEncoder
from ucm_trt.sparse.select import selection_mask


def _ids(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (1, n), generator=g)


def _context(prefix):
    enc = HashEncoder.random(16, 16, seed=0)
    return lambda layer: MethodContext(hash_encoder=enc, token_weights=prefix.token_weights[layer][0])


def _dense_nll(model, ids, start):
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].float()
    return float(torch.nn.functional.cross_entropy(logits[start - 1 : -1], ids[0, start:], reduction="sum"))


@pytest.mark.parametrize("method", METHODS + BASELINES)
def test_all_blocks_selected_equals_dense(tiny_model, method):
    ids = _ids(200)
    prefix = prefill(tiny_model, ids[:, :150], observe_window=16)
    run = SparseRun(selector=make_selector(method, ratio=1.0, context=_context(prefix)), block_size=16)
    nll, n = continuation_nll(tiny_model, prefix, ids[:, 150:], run, chunk=8)
    assert n == 50
    assert nll == pytest.approx(_dense_nll(tiny_model, ids, 150), rel=1e-5, abs=1e-4)
    assert run.density == pytest.approx(1.0)
    assert run.sparse_calls == 2 * 7  # 2 layers x ceil(49 / 8) chunks


def test_dense_run_matches_model_and_generation(tiny_model):
    ids = _ids(120, seed=1)
    prefix = prefill(tiny_model, ids[:, :100])
    run = SparseRun(selector=None, block_size=16)
    nll, _ = continuation_nll(tiny_model, prefix, ids[:, 100:], run, chunk=16)
    assert nll == pytest.approx(_dense_nll(tiny_model, ids, 100), rel=1e-5)
    gen = greedy_generate(tiny_model, prefix, ids[:, 100:104], run, max_new_tokens=5, chunk=3)
    ref = tiny_model.generate(ids[:, :104], max_new_tokens=5, do_sample=False)[0, 104:].tolist()
    assert gen == ref


def test_sparse_run_reads_budget_and_changes_output(tiny_model):
    ids = _ids(400, seed=2)
    prefix = prefill(tiny_model, ids[:, :384], observe_window=16)
    sparse = SparseRun(selector=make_selector("mean", ratio=0.1, context=_context(prefix)), block_size=16)
    nll, _ = continuation_nll(tiny_model, prefix, ids[:, 384:], sparse, chunk=16)
    # 25 blocks: 3 forced + floor(0.1 * 22) = 2 candidates
    assert sparse.density == pytest.approx(5 / 25)
    assert nll != pytest.approx(_dense_nll(tiny_model, ids, 384), rel=1e-6)


def test_rollback_layers_run_dense(tiny_model):
    ids = _ids(300, seed=3)
    prefix = prefill(tiny_model, ids[:, :288])
    run = SparseRun(selector=make_selector("streaming", ratio=0.1), block_size=16, rollback_layers={0, 1})
    nll, _ = continuation_nll(tiny_model, prefix, ids[:, 288:], run, chunk=8)
    assert run.sparse_calls == 0 and run.density is None
    assert nll == pytest.approx(_dense_nll(tiny_model, ids, 288), rel=1e-5)


@pytest.mark.parametrize("selection", ["per_head", "shared"])
def test_selector_format_budget_and_oracle_bound(selection):
    g = torch.Generator().manual_seed(4)
    q = torch.randn(1, 4, 8, 16, generator=g) * 3
    k = torch.randn(1, 2, 300, 16, generator=g)
    w = torch.rand(2, 300, generator=g)
    enc = HashEncoder.random(16, 16, seed=0)
    ctx = lambda layer: MethodContext(hash_encoder=enc, token_weights=w)  # noqa: E731
    nb = 19  # ceil(300 / 16)
    recalls = {}
    for method in METHODS + BASELINES:
        sel = make_selector(method, ratio=0.25, selection=selection, context=ctx)(0, q, k, 16)
        assert sel.dtype == torch.int32 and sel.shape[:2] == (1, 2)
        mask = selection_mask(sel.long(), nb)
        assert mask[..., 0].all() and mask[..., nb - 2 :].all()  # sink + local windows
        assert (mask.sum(-1) == 3 + 4).all()  # floor(0.25 * 16 candidates) = 4
        for row in sel[0]:
            ids = row[row >= 0]
            assert torch.all(ids[1:] > ids[:-1])
        if selection == "shared":
            assert torch.equal(sel[0, 0], sel[0, 1])
        recalls[method] = attention_mass_recall(q, k, sel, block_size=16).mean
    assert all(recalls["oracle"] >= r - 1e-6 for r in recalls.values())


def test_selector_and_run_reject_bad_input(tiny_model):
    with pytest.raises(ValueError, match="method must be one of"):
        make_selector("bogus", ratio=0.5)
    with pytest.raises(ValueError, match="needs context"):
        make_selector("mean", ratio=0.5)
    with pytest.raises(ValueError, match="ratio"):
        make_selector("oracle", ratio=0.0)
    with pytest.raises(ValueError, match="block_size"):
        SparseRun(selector=None, block_size=0)
    with pytest.raises(ValueError, match="observe_window"):
        SparseRun(selector=None, block_size=16, observe_window=-1)
    ids = _ids(100)
    prefix = prefill(tiny_model, ids[:, :80])
    run = SparseRun(selector=make_selector("streaming", ratio=0.5), block_size=8)
    with pytest.raises(ValueError, match="chunk"):
        continuation_nll(tiny_model, prefix, ids[:, 80:], run, chunk=16)
    with pytest.raises(ValueError, match="weighted_mean"):
        sel = make_selector("weighted_mean", ratio=0.5, context=lambda layer: MethodContext())
        sel(0, torch.randn(1, 4, 1, 16), torch.randn(1, 2, 64, 16), 16)
