"""Attention-mass recall, oracle selection and recall curves."""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ucm_trt.config import Budget, KVStarConfig, SparseConfig
from ucm_trt.reference import dense_attention
from ucm_trt.sparse.recall import (
    attention_mass_recall,
    block_attention_mass,
    oracle_selection,
    recall_curve,
)
from ucm_trt.sparse.representations import block_mean, kvstar_subblock, tokens_to_blocks
from ucm_trt.sparse.score import dot_scores, kvstar_vote_scores, reduce_scores
from ucm_trt.sparse.select import (
    candidate_mask,
    num_blocks_from_seq_lens,
    select_blocks,
    select_blocks_by_count,
    selection_counts,
    selection_mask,
)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _qk(seed, b, hq, hkv, tq, tk, d, sharp=3.0):
    g = _gen(seed)
    q = torch.randn(b, hq, tq, d, generator=g) * sharp
    k = torch.randn(b, hkv, tk, d, generator=g)
    return q, k


def _all_blocks(b, hkv, nb):
    return torch.arange(nb, dtype=torch.int32).expand(b, hkv, nb).contiguous()


@pytest.mark.parametrize(("hq", "hkv", "d"), [(4, 4, 64), (8, 2, 64), (8, 1, 128)])
def test_select_all_gives_one(hq, hkv, d) -> None:
    bs = 8
    q, k = _qk(1, 2, hq, hkv, 3, 45, d)
    lens = torch.tensor([45, 20], dtype=torch.int32)
    rec = attention_mass_recall(q, k, _all_blocks(2, hkv, 6), block_size=bs, seq_lens=lens)
    torch.testing.assert_close(rec.per_query, torch.ones(2, hq, 3))
    assert rec.per_head.shape == (2, hq) and abs(rec.mean - 1.0) < 1e-6


def test_recall_equals_dense_attention_of_indicator() -> None:
    """Independent check through the fp32 dense reference: attention output of V = kept-indicator."""
    b, hq, hkv, tq, tk, d, bs = 2, 8, 2, 2, 37, 16, 4
    q, k = _qk(2, b, hq, hkv, tq, tk, d)
    lens = torch.tensor([37, 30], dtype=torch.int32)
    sel = torch.tensor([[[0, 3, 8, -1], [1, 2, -1, -1]], [[5, -1, -1, -1], [0, 6, 7, -1]]], dtype=torch.int32)
    rec = attention_mass_recall(q, k, sel, block_size=bs, seq_lens=lens, scale=0.3)
    for i in range(b):
        n = int(lens[i])
        v = torch.zeros(1, hkv, n, d)
        mask = selection_mask(sel[i : i + 1], (tk + bs - 1) // bs)[0]
        for h in range(hkv):
            for p in range(n):
                v[0, h, p, 0] = float(bool(mask[h, p // bs]) or p >= n - tq)
        out = dense_attention(q[i : i + 1], k[i : i + 1, :, :n], v, scale=0.3)
        torch.testing.assert_close(rec.per_query[i], out[0, :, :, 0], rtol=1e-5, atol=1e-6)


def test_block_mass_sums_to_one() -> None:
    q, k = _qk(3, 2, 4, 2, 3, 50, 8)
    m = block_attention_mass(q, k, block_size=16, seq_lens=torch.tensor([50, 12]))
    assert m.shape == (2, 4, 3, 4)
    torch.testing.assert_close(m.sum(-1), torch.ones(2, 4, 3))
    assert float(m[1, :, :, 1:].abs().max()) == 0.0  # sequence 1 has 12 tokens = block 0 only
    mx = block_attention_mass(q, k, block_size=16, seq_lens=torch.tensor([50, 12]), exclude_queries=True)
    assert bool((mx <= m + 1e-7).all())


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    group=st.sampled_from([1, 4]),
    tq=st.integers(1, 3),
    lens=st.lists(st.integers(3, 64), min_size=1, max_size=2),
    count=st.integers(0, 5),
    sink=st.integers(0, 2),
    local=st.integers(1, 2),
    mode=st.sampled_from(["per_head", "shared"]),
)
def test_oracle_beats_any_selection_at_same_budget(seed, group, tq, lens, count, sink, local, mode) -> None:
    bs, hkv, d = 8, 2, 8
    b = len(lens)
    tk = max(lens)
    q, k = _qk(seed, b, hkv * group, hkv, tq, tk, d)
    seq = torch.tensor(lens, dtype=torch.int32)
    nb = num_blocks_from_seq_lens(seq, bs)
    m = (tk + bs - 1) // bs
    orc = oracle_selection(q, k, block_size=bs, counts=count, sink_blocks=sink, local_blocks=local,
                           mode=mode, seq_lens=seq)
    r_orc = attention_mass_recall(q, k, orc, block_size=bs, seq_lens=seq)
    assert 0.0 <= r_orc.mean <= 1.0 + 1e-6
    g = _gen(seed + 1)
    for _ in range(4):
        h = 1 if mode == "shared" else hkv
        scores = torch.randn(b, h, m, generator=g)
        other = select_blocks_by_count(scores, nb, count, sink_blocks=sink, local_blocks=local, num_kv_heads=hkv)
        assert torch.equal(selection_counts(other), selection_counts(orc))
        r = attention_mass_recall(q, k, other, block_size=bs, seq_lens=seq)
        assert 0.0 <= float(r.per_query.min()) and float(r.per_query.max()) <= 1.0 + 1e-6
        # the oracle maximises the mean over the heads sharing a selection
        if mode == "shared":
            assert r_orc.per_head.mean(1).min() >= 0 and bool((r_orc.per_head.mean(1) >= r.per_head.mean(1) - 1e-5).all())
        else:
            ro = r_orc.per_head.reshape(b, hkv, group).mean(-1)
            ra = r.per_head.reshape(b, hkv, group).mean(-1)
            assert bool((ro >= ra - 1e-5).all())


def test_oracle_equals_brute_force() -> None:
    bs, hq, hkv, d = 4, 4, 2, 8
    q, k = _qk(11, 1, hq, hkv, 2, 30, d, sharp=4.0)
    seq = torch.tensor([30], dtype=torch.int32)
    for count in (1, 2, 3):
        orc = oracle_selection(q, k, block_size=bs, counts=count, sink_blocks=1, local_blocks=1, mode="shared",
                               seq_lens=seq)
        best = max(
            attention_mass_recall(
                q, k, torch.tensor([0, *subset, 7], dtype=torch.int32).expand(1, hkv, -1).contiguous(),
                block_size=bs, seq_lens=seq,
            ).mean
            for subset in itertools.combinations(range(1, 7), count)
        )
        assert abs(attention_mass_recall(q, k, orc, block_size=bs, seq_lens=seq).mean - best) < 1e-6


def test_random_selection_recall_in_unit_interval() -> None:
    g = _gen(5)
    q, k = _qk(5, 3, 8, 2, 2, 70, 16)
    for _ in range(5):
        mask = torch.rand(3, 2, 9, generator=g) > 0.5
        ids = [[[i for i in range(9) if row[i]] for row in bb] for bb in mask.tolist()]
        width = max(1, max(len(r) for bb in ids for r in bb))
        sel = torch.tensor([[r + [-1] * (width - len(r)) for r in bb] for bb in ids], dtype=torch.int32)
        r = attention_mass_recall(q, k, sel, block_size=8)
        assert float(r.per_query.min()) >= 0.0 and float(r.per_query.max()) <= 1.0 + 1e-6


# ---------------------------------------------------------------------------------------------
# recall curve


def _captured(seed=21, hq=8, hkv=2, t=300, tq=4, d=32):
    """Q/K with structure: a few 'hot' keys aligned with the queries."""
    g = _gen(seed)
    k = torch.randn(hkv, t, d, generator=g)
    q = torch.randn(hq, tq, d, generator=g) * 0.5
    hot = torch.randint(0, t - 40, (6,), generator=g)
    for p in hot.tolist():
        k[:, p] += 2.0 * q.mean(1).reshape(hkv, hq // hkv, d).mean(1)
    obs = torch.randn(hq, 8, d, generator=g) * 0.5
    return q, k, obs


@pytest.mark.parametrize("mode", ["shared", "per_head"])
def test_recall_curve_rows_and_consistency(mode) -> None:
    q, k, obs = _captured()
    budgets = [Budget.ratio(0.25), Budget.top_k(3), Budget.mass(0.9), Budget.threshold(0.0)]
    curve = recall_curve(q, k, budgets=budgets, block_size=16, observation_q=obs, selection=mode,
                         kvstar=KVStarConfig(retrieval_stride=2))
    methods = {(r["method"], r["budget"]) for r in curve.rows}
    for rep, sc in [("mean", "dot"), ("minmax", "quest"), ("hash", "hamming"), ("first", "dot"),
                    ("weighted_mean", "dot"), ("subblock", "kvstar_vote")]:
        for lab in ("ratio=0.25", "top_k=3", "mass=0.9", "threshold=0"):
            assert (f"{rep}/{sc}", lab) in methods
    assert ("oracle", "ratio=0.25") in methods and ("sink+local", "-") in methods
    for r in curve.rows:
        assert 0.0 <= r["recall"] <= 1.0 + 1e-6
        assert r["recall"] <= r["oracle_recall"] + 1e-5, r
        assert len(r["per_head"]) == 8
    base = next(r for r in curve.rows if r["method"] == "sink+local")
    orc = next(r for r in curve.rows if r["method"] == "oracle" and r["budget"] == "ratio=0.25")
    assert orc["recall"] >= base["recall"]
    assert "mean/dot" in curve.format_table() and curve.to_dict()["meta"]["block_size"] == 16

    # mean/dot at ratio 0.25 equals an explicit per-token pipeline
    hq, tq, d = q.shape
    hkv, t, _ = k.shape
    cfg = SparseConfig(block_size=16, budget=Budget.ratio(0.25), min_blocks=1, selection=mode)
    recs = []
    for i in range(tq):
        n = t - tq + i + 1
        kb, lens = tokens_to_blocks(k[None, :, :n], 16)
        s = dot_scores(q[None, :, i], block_mean(kb, lens))
        if mode == "shared":
            s = reduce_scores(s, "dot")
        sel = select_blocks(s, num_blocks_from_seq_lens(torch.tensor([n]), 16), cfg, num_kv_heads=hkv)
        recs.append(attention_mass_recall(q[None, :, i : i + 1], k[None, :, :n], sel, block_size=16).mean)
    row = next(r for r in curve.rows if r["method"] == "mean/dot" and r["budget"] == "ratio=0.25")
    assert abs(row["recall"] - sum(recs) / tq) < 1e-5

    # subblock/kvstar_vote at top_k=3: voters are the query and the one before it (stride 2)
    kb_all, lens_all = tokens_to_blocks(k, 16)
    sub = kvstar_subblock(kb_all, lens_all, KVStarConfig(retrieval_stride=2))
    cfg3 = SparseConfig(block_size=16, budget=Budget.top_k(3), min_blocks=1, representation="subblock",
                        scoring="kvstar_vote", selection=mode)
    recs = []
    for i in range(tq):
        n = t - tq + i + 1
        nbt = num_blocks_from_seq_lens(torch.tensor([n]), 16)
        cand = candidate_mask(nbt, kb_all.shape[0], sink_blocks=1, local_blocks=2)
        s = kvstar_vote_scores(q[None, :, max(0, i - 1) : i + 1], sub, block_mask=cand)
        if mode == "shared":
            s = reduce_scores(s, "kvstar_vote")
        sel = select_blocks(s, nbt, cfg3, num_kv_heads=hkv)
        recs.append(attention_mass_recall(q[None, :, i : i + 1], k[None, :, :n], sel, block_size=16).mean)
    row = next(r for r in curve.rows if r["method"] == "subblock/kvstar_vote" and r["budget"] == "top_k=3")
    assert abs(row["recall"] - sum(recs) / tq) < 1e-5
    # structured data: mean/dot at 1/4 beats the sink+local baseline
    assert row["recall"] > base["recall"]


def test_recall_curve_select_all_and_defaults() -> None:
    q, k, _ = _captured(t=120)
    curve = recall_curve(q, k, budgets=[Budget.ratio(1.0)], block_size=16)
    reps = {r["representation"] for r in curve.rows if r["representation"]}
    assert reps == {"mean", "minmax", "hash", "first", "subblock"}  # weighted_mean needs observation_q
    for r in curve.rows:
        if r["method"] != "sink+local":
            assert abs(r["recall"] - 1.0) < 1e-5


# ---------------------------------------------------------------------------------------------
# bad input

Q4 = torch.zeros(1, 4, 1, 8)
K4 = torch.zeros(1, 2, 20, 8)
SEL = torch.zeros(1, 2, 1, dtype=torch.int32)
Q3 = torch.zeros(4, 2, 8)
K3 = torch.zeros(2, 40, 8)
B = [Budget.ratio(0.5)]


@pytest.mark.parametrize(
    ("call", "exc", "match"),
    [
        (lambda: attention_mass_recall(Q4[0], K4, SEL, block_size=4), ValueError, "q"),
        (lambda: attention_mass_recall(Q4.int(), K4, SEL, block_size=4), TypeError, "q"),
        (lambda: attention_mass_recall(Q4, K4[..., :4], SEL, block_size=4), ValueError, "k"),
        (lambda: attention_mass_recall(torch.zeros(1, 3, 1, 8), K4, SEL, block_size=4), ValueError, "heads"),
        (lambda: attention_mass_recall(Q4, K4, SEL.float(), block_size=4), TypeError, "selection"),
        (lambda: attention_mass_recall(Q4, K4, SEL[:, :1], block_size=4), ValueError, "selection"),
        (lambda: attention_mass_recall(Q4, K4, SEL + 5, block_size=4), ValueError, "selection"),
        (lambda: attention_mass_recall(Q4, K4, SEL, block_size=0), ValueError, "block_size"),
        (lambda: attention_mass_recall(Q4, K4, SEL, block_size=4, seq_lens=torch.tensor([21])), ValueError, "seq_lens"),
        (lambda: attention_mass_recall(Q4, K4, SEL, block_size=4, seq_lens=torch.tensor([5.0])), TypeError, "seq_lens"),
        (lambda: attention_mass_recall(Q4, K4, SEL, block_size=4, scale=-1.0), ValueError, "scale"),
        (lambda: block_attention_mass(Q4, K4, block_size=4, seq_lens=torch.tensor([0])), ValueError, "seq_lens"),
        (lambda: block_attention_mass(Q4, K4, block_size=-4), ValueError, "block_size"),
        (lambda: block_attention_mass(Q4, K4.to("meta"), block_size=4), ValueError, "one device"),
        (lambda: oracle_selection(Q4, K4, block_size=4, counts=1, sink_blocks=1, local_blocks=1, mode="x"),
         ValueError, "mode"),
        (lambda: oracle_selection(Q4, K4, block_size=4, counts=-1, sink_blocks=1, local_blocks=1), ValueError, "counts"),
        (lambda: oracle_selection(Q4, K4, block_size=4, counts=1, sink_blocks=1, local_blocks=0), ValueError,
         "local_blocks"),
        (lambda: recall_curve(Q3[0], K3, budgets=B, block_size=8), ValueError, "q"),
        (lambda: recall_curve(Q3, K3[..., :4], budgets=B, block_size=8), ValueError, "k"),
        (lambda: recall_curve(torch.zeros(4, 50, 8), K3, budgets=B, block_size=8), ValueError, "q"),
        (lambda: recall_curve(Q3, K3, budgets=Budget.ratio(0.5), block_size=8), TypeError, "budgets"),
        (lambda: recall_curve(Q3, K3, budgets=[0.5], block_size=8), TypeError, "budgets"),
        (lambda: recall_curve(Q3, K3, budgets=[], block_size=8), TypeError, "budgets"),
        (lambda: recall_curve(Q3, K3, budgets=B, block_size=6), ValueError, "block_size"),
        (lambda: recall_curve(Q3, K3, budgets=B, block_size=8, representations=["mean", "cosine"]), ValueError,
         "representations"),
        (lambda: recall_curve(Q3, K3, budgets=B, block_size=8, representations=["mean", "mean"]), ValueError,
         "representations"),
        (lambda: recall_curve(Q3, K3, budgets=B, block_size=8, representations=["weighted_mean"]), ValueError,
         "observation_q"),
        (lambda: recall_curve(Q3, K3, budgets=B, block_size=8, observation_q=torch.zeros(4, 39, 8)), ValueError,
         "observation_q"),
        (lambda: recall_curve(Q3, K3, budgets=B, block_size=8, selection="both"), ValueError, "selection"),
        (lambda: recall_curve(Q3, K3, budgets=B, block_size=8, kvstar="k"), TypeError, "kvstar"),
        (lambda: recall_curve(Q3, K3, budgets=B, block_size=8, local_blocks=0), ValueError, "local_blocks"),
    ],
)
def test_bad_input(call, exc, match) -> None:
    with pytest.raises(exc, match=match):
        call()
