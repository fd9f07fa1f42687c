"""ESA / GSA prefill observation window (``PrefillWindow``): the first retrieval scores the blocks with the
last ``W`` prompt queries. Window scores against a query-by-query loop, the batched retrieval equal to the
per-layer reference, a needle that only the question's queries point at, the option's validation and the
presets (``default``: a window; ``ucm``: the last query, upstream's)."""

from __future__ import annotations

import pytest
import torch

from ucm_trt.config import Budget, PrefillWindow, SparseConfig
from ucm_trt.runtime.algorithms import BLOCK_SCORING, DEFAULT_PREFILL_WINDOW, make_policy
from ucm_trt.sparse.batched import BlockRepStore
from ucm_trt.sparse.policies import ESAPolicy, GSAPolicy
from ucm_trt.sparse.policies.esa import (
    first_queries,
    sub_block_scores,
    window_block_scores,
    window_layer_scores,
)
from ucm_trt.sparse.representations import block_lens_from_seq_lens, block_submeans


def test_prefill_window_validation():
    assert PrefillWindow() == PrefillWindow(tokens=1, reduce="mean")
    with pytest.raises(ValueError, match=r"PrefillWindow.tokens must be >= 1, got 0"):
        PrefillWindow(tokens=0)
    with pytest.raises(TypeError, match=r"PrefillWindow.tokens must be an int, got True"):
        PrefillWindow(tokens=True)
    with pytest.raises(ValueError, match=r"PrefillWindow.reduce must be one of mean, max; got 'sum'"):
        PrefillWindow(reduce="sum")
    for cls in (ESAPolicy, GSAPolicy):
        with pytest.raises(TypeError, match="prefill_window must be a PrefillWindow or None, got int"):
            cls(prefill_window=16)
        assert cls().query_window == 1 and cls().prefill_window == PrefillWindow()
        assert cls(prefill_window=PrefillWindow(tokens=24)).query_window == 24


@pytest.mark.parametrize("vote", [False, True])
@pytest.mark.parametrize("sb", [1, 4])
def test_window_scores_combine_the_per_query_scores(vote, sb):
    g = torch.Generator().manual_seed(5)
    L, hq, hkv, d, nb, w = 2, 6, 2, 8, 7, 5
    q = torch.randn(L, hq, w, d, generator=g)
    reps = torch.randn(L, hkv, d, nb * sb, generator=g)
    per = [sub_block_scores(q[:, :, i], reps, sb, vote) for i in range(w)]
    torch.testing.assert_close(window_block_scores(q, reps, sb, vote, "mean"), sum(per) / w)
    torch.testing.assert_close(window_block_scores(q, reps, sb, vote, "max"), torch.stack(per).amax(0))
    # one query: the single-query scoring, in either layout
    torch.testing.assert_close(window_block_scores(q[:, :, -1:], reps, sb, vote), per[-1])
    torch.testing.assert_close(window_block_scores(q[:, :, -1], reps, sb, vote), per[-1])
    for layer in range(L):
        rep = reps[layer].permute(2, 0, 1)  # [nb * sb, Hkv, D]
        for reduce in ("mean", "max"):
            torch.testing.assert_close(window_layer_scores(q[layer], rep, sb, vote, reduce),
                                       window_block_scores(q, reps, sb, vote, reduce)[layer], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="reduce must be 'mean' or 'max'"):
        window_block_scores(q, reps, sb, vote, "sum")


def test_first_queries_takes_the_last_prompt_queries():
    qs = [torch.arange(3 * 6 * 2, dtype=torch.float32).reshape(3, 6, 2) + 100 * layer for layer in range(4)]
    last = first_queries(qs, 1)
    assert last.shape == (4, 3, 2) and torch.equal(last[2], qs[2][:, -1])
    win = first_queries(qs, 4)
    assert win.shape == (4, 3, 4, 2) and torch.equal(win[1], qs[1][:, 2:])
    assert first_queries(qs, 64).shape == (4, 3, 6, 2)  # a prompt shorter than the window: what there is


@pytest.mark.parametrize("reduce", ["mean", "max"])
@pytest.mark.parametrize("selection", ["shared", "per_head"])
def test_window_batched_selection_equals_per_layer(selection, reduce, bind_policy):
    g = torch.Generator().manual_seed(12)
    layers, hq, hkv, d, nb, bs, sb, w = 3, 8, 2, 16, 23, 8, 4, 6
    k = torch.randint(-4, 5, (layers, nb, hkv, bs, d), generator=g).float()
    q = torch.randint(-4, 5, (layers, hq, w, d), generator=g).float()
    lens = block_lens_from_seq_lens(torch.tensor((nb - 1) * bs + 3), nb, bs)
    sparse = SparseConfig(block_size=bs, budget=Budget.ratio(0.25), selection=selection)
    store = BlockRepStore(num_layers=layers, num_kv_heads=hkv, head_dim=d)
    store.append(torch.stack([block_submeans(x, lens, sb) for x in k]))
    per = [store.layer(layer) for layer in range(layers)]
    window = PrefillWindow(tokens=w, reduce=reduce)
    for policy in (ESAPolicy(vote=True, sub_block_tokens=bs // sb, prefill_window=window),
                   GSAPolicy(vote=True, sub_block_tokens=bs // sb, prefill_window=window)):
        p = bind_policy(policy, layers, hq, hkv, d, sparse)
        got = p._select_all(store.reps(), nb, q)
        for layer in range(layers):
            want = p._select(per, nb, list(q), layer)
            assert torch.equal(got[layer, :, : want.shape[1]], want)


@pytest.mark.parametrize("policy_cls", [ESAPolicy, GSAPolicy])
def test_the_window_finds_the_needle_the_last_query_misses(policy_cls, bind_policy):
    # 24 blocks of 8 tokens; block 5 holds a needle along channel 0, block 15 a weaker match along channel 1.
    # The question's queries (the first 7 of the window) point along channel 0; the last prompt token's query
    # (say a colon after the question) points along channel 1. The window's first selection keeps block 5,
    # the last query alone keeps block 15 instead.
    nb, bs, d, w = 24, 8, 16, 8
    g = torch.Generator().manual_seed(2)
    k = 0.05 * torch.randn(1, nb, 1, bs, d, generator=g)
    k[0, 5, 0, :, 0] += 3.0
    k[0, 15, 0, :, 1] += 2.0
    q = torch.zeros(1, 2, w, d)
    q[0, :, :-1, 0] = 4.0
    q[0, :, -1, 1] = 4.0
    lens = torch.full((nb,), bs, dtype=torch.int32)
    store = BlockRepStore(num_layers=1, num_kv_heads=1, head_dim=d)
    store.append(block_submeans(k[0], lens, 1)[None])
    sparse = SparseConfig(block_size=bs, budget=Budget.top_k(1), selection="per_head")
    for window, want in ((PrefillWindow(tokens=w), 5), (PrefillWindow(tokens=w, reduce="max"), 5),
                         (PrefillWindow(), 15)):
        extra = {"prefetch_blocks": 0} if policy_cls is GSAPolicy else {}  # GSA: no block beyond the budget
        p = bind_policy(policy_cls(vote=True, prefill_window=window, **extra), 1, 2, 1, d, sparse)
        qs = first_queries(list(q), window.tokens)
        sel = p._select_all(store.reps(), nb, qs)[0, 0]
        chosen = set(sel[sel >= 0].tolist()) - {0, nb - 2, nb - 1}  # minus the sink and local windows
        assert chosen == {want}, (window, sel)


def test_presets_and_make_policy():
    assert BLOCK_SCORING["ucm"]["prefill_window"] == PrefillWindow()
    assert BLOCK_SCORING["default"]["prefill_window"] == DEFAULT_PREFILL_WINDOW
    for algo in ("esa", "gsa"):
        assert make_policy(algo).query_window == DEFAULT_PREFILL_WINDOW.tokens
        assert make_policy(algo, preset="ucm").query_window == 1
        p = make_policy(algo, prefill_window=PrefillWindow(tokens=3, reduce="max"))
        assert p.prefill_window == PrefillWindow(tokens=3, reduce="max") and p.query_window == 3
    for algo in ("kvstar", "gsa-on-device"):
        with pytest.raises(ValueError, match=f"algorithm '{algo}' cannot be combined with prefill_window="):
            make_policy(algo, prefill_window=PrefillWindow(tokens=4))


def test_persist_validation():
    assert PrefillWindow().persist == 0.0
    with pytest.raises(ValueError, match=r"PrefillWindow.persist must be >= 0, got -1"):
        PrefillWindow(persist=-1)
    with pytest.raises(TypeError, match=r"PrefillWindow.persist must be a number"):
        PrefillWindow(persist="1")


@pytest.mark.parametrize("policy_cls", [ESAPolicy, GSAPolicy])
def test_persist_adds_the_window_scores_to_later_retrievals(policy_cls, bind_policy):
    # the window (prior) points at block 5, a decode step's query at block 15: the later retrieval keeps
    # block 15 without persist, block 5 with a large enough persist; batched == per-layer either way
    nb, bs, d, w = 24, 8, 16, 8
    g = torch.Generator().manual_seed(4)
    k = 0.05 * torch.randn(2, nb, 1, bs, d, generator=g)
    k[:, 5, 0, :, 0] += 3.0
    k[:, 15, 0, :, 1] += 3.0
    qw = torch.zeros(2, 2, w, d)
    qw[..., 0] = 4.0
    q_step = torch.zeros(2, 2, d)
    q_step[..., 1] = 4.0
    lens = torch.full((nb,), bs, dtype=torch.int32)
    store = BlockRepStore(num_layers=2, num_kv_heads=1, head_dim=d)
    store.append(torch.stack([block_submeans(x, lens, 1) for x in k]))
    sparse = SparseConfig(block_size=bs, budget=Budget.top_k(1), selection="per_head")
    extra = {"prefetch_blocks": 0} if policy_cls is GSAPolicy else {}
    for persist, want in ((0.0, 15), (4.0, 5)):
        window = PrefillWindow(tokens=w, persist=persist)
        p = bind_policy(policy_cls(vote=True, prefill_window=window, **extra), 2, 2, 1, d, sparse)
        prior = window_block_scores(qw, store.reps(), 1, True)
        torch.testing.assert_close(prior.sum(-1), torch.full((2, 1), 2.0))  # a vote: one unit per query head
        got = p._select_all(store.reps(), nb, q_step, prior if persist else None)
        per = [store.layer(layer) for layer in range(2)]
        for layer in range(2):
            want_sel = p._select(per, nb, list(q_step), layer, prior=prior if persist else None)
            assert torch.equal(got[layer, :, : want_sel.shape[1]], want_sel)
            chosen = set(got[layer, 0][got[layer, 0] >= 0].tolist()) - {0, nb - 2, nb - 1}
            assert chosen == {want}, (persist, got[layer])
        # the first retrieval (the window itself) is not changed by persist
        first = p._select_all(store.reps(), nb, qw, prior if persist else None)
        assert {5} == set(first[0, 0][first[0, 0] >= 0].tolist()) - {0, nb - 2, nb - 1}


@pytest.mark.parametrize("algo", ["esa", "gsa"])
def test_window_and_persist_through_the_engine(algo):
    """Through the runtime (PyTorch backend, tiny Llama, prompts of 200 and 120 tokens in chunks of 64):
    the policy receives the last 8 prompt queries, keeps a prior per request while it runs, none after."""
    from tests.runtime.conftest import tiny_llama
    from ucm_trt.config import DenseLayers
    from ucm_trt.runtime import Engine, RuntimeConfig, SamplingParams, TorchBackend
    from ucm_trt.runtime.algorithms import sparse_config_for

    policy = make_policy(algo, prefill_window=PrefillWindow(tokens=8, reduce="max", persist=1.0),
                         dense_layers=DenseLayers())
    seen = []
    first = policy.on_prefill_end

    def record(req, queries):
        seen.append([q.shape for q in queries])
        first(req, queries)
        assert len(policy._priors) >= 1

    policy.on_prefill_end = record
    sparse = sparse_config_for(algo, SparseConfig(block_size=16, budget=Budget.ratio(0.25), selection="per_head"))
    g = torch.Generator().manual_seed(11)
    prompts = [torch.randint(0, 256, (n,), generator=g).tolist() for n in (200, 120)]
    with Engine(TorchBackend(tiny_llama(), attention="reference"), policy, sparse=sparse,
                config=RuntimeConfig(max_batch=2, max_seq_len=512, prefill_chunk=64, cache_blocks=0)) as eng:
        res = eng.generate(prompts, SamplingParams(max_new_tokens=12))
    assert [len(r.token_ids) for r in res] == [12, 12]
    assert len(seen) == 2 and all(s[1] == 8 for shapes in seen for s in shapes)  # [Hq, W, D]
    assert policy._priors == {}
