"""Batched all-layer retrieval (ucm_trt.sparse.batched) against the per-layer functions it replaces.

The per-layer path (``dot_scores`` + ``select_from_scores`` once per layer, ``extend_selection``
per layer and row) is the reference; every comparison is exact (``torch.equal``).
"""

from __future__ import annotations

import itertools

import pytest
import torch

from ucm_trt.config import Budget, KVStarConfig, SparseConfig
from ucm_trt.sparse.batched import BlockRepStore, batched_dot_scores, extend_selections, select_batched
from ucm_trt.sparse.policies import ESAPolicy, GSAPolicy, KVStarPolicy
from ucm_trt.sparse.policies._offload import OffloadRequestState, stack_layer_selections
from ucm_trt.sparse.policies.base import (
    ModelShape,
    PolicyRuntime,
    RequestView,
    extend_selection,
    select_from_scores,
)
from ucm_trt.sparse.policies.kvstar import KVStarRequestState, PreparedVote
from ucm_trt.sparse.representations import SubBlockRepr, block_lens_from_seq_lens, block_mean, kvstar_subblock
from ucm_trt.sparse.score import dot_scores, kvstar_vote_scores
from ucm_trt.sparse.select import candidate_mask

BUDGETS = [Budget.top_k(1), Budget.top_k(5), Budget.ratio(0.125), Budget.ratio(0.5), Budget.ratio(1.0),
           Budget.threshold(0.0), Budget.threshold(3.0), Budget.mass(0.5), Budget.mass(0.9), Budget.mass(1.0)]


def _assert_rows_equal(batched: torch.Tensor, per_layer: list[torch.Tensor], what: str) -> None:
    """``batched [L, H, S]`` equals each per-layer ``[H, S_l]`` on its width and is -1 beyond it."""
    assert batched.dtype == torch.int32 and batched.dim() == 3, what
    assert batched.shape[0] == len(per_layer), what
    for layer, sel in enumerate(per_layer):
        w = sel.shape[-1]
        assert batched.shape[-1] >= w, f"{what}: layer {layer} width {batched.shape[-1]} < {w}"
        assert torch.equal(batched[layer, :, :w], sel), f"{what}: layer {layer}\n{batched[layer]}\n{sel}"
        assert bool((batched[layer, :, w:] == -1).all()), f"{what}: layer {layer} padding"
    widest = max(1, max(int((s >= 0).sum(-1).max()) for s in per_layer))
    assert batched.shape[-1] == widest, what


def _scores(g: torch.Generator, b: int, h: int, m: int, kind: str) -> torch.Tensor:
    if kind == "ties":  # few distinct values: lots of ties, including at the budget's edge
        return torch.randint(-3, 4, (b, h, m), generator=g).float()
    if kind == "zeros":  # signed zeros: -0.0 and 0.0 must tie
        return torch.where(torch.rand(b, h, m, generator=g) < 0.5, torch.tensor(-0.0), torch.tensor(0.0))
    return torch.randn(b, h, m, generator=g) * 4


# ---------------------------------------------------------------------------------------------
# selection on identical scores: exact for every config


@pytest.mark.parametrize("selection", ["shared", "per_head"])
@pytest.mark.parametrize("kind", ["randn", "ties", "zeros"])
def test_select_batched_equals_select_from_scores(selection, kind):
    g = torch.Generator().manual_seed(hash((selection, kind)) % 2**31)
    cases = 0
    for budget, (sink, local, min_blocks), (layers, hkv), m, extra, same_nb in itertools.product(
        BUDGETS, [(1, 2, 4), (0, 1, 1), (2, 3, 8)], [(1, 1), (3, 4), (5, 8)], [1, 6, 37], [0, 1, 3], [True, False]
    ):
        sparse = SparseConfig(block_size=16, sink_blocks=sink, local_blocks=local, min_blocks=min_blocks,
                              budget=budget, selection=selection)
        scores = _scores(g, layers, hkv, m, kind)
        # partial sequences: blocks at or past num_blocks hold garbage the selection must ignore.
        # same_nb: every row has the same block count (one request's layers: the slice fast path)
        nb = torch.randint(0, m + 1, (1 if same_nb else layers,), generator=g, dtype=torch.int32).expand(layers)
        for b in range(layers):
            scores[b, :, int(nb[b]):] = float("nan")
        got = select_batched(scores, nb, sparse, "dot", hkv, extra=extra)
        want = [select_from_scores(scores[b], int(nb[b]), sparse, "dot", hkv, extra=extra) for b in range(layers)]
        _assert_rows_equal(got, want, f"{budget} sink={sink} local={local} min={min_blocks} L={layers} "
                                      f"Hkv={hkv} m={m} extra={extra} nb={nb.tolist()}")
        cases += 1
    assert cases == len(BUDGETS) * 3 * 3 * 3 * 3 * 2


@pytest.mark.parametrize("scoring", ["hamming", "kvstar_vote", "quest"])
def test_select_batched_other_scorings_reduce_like_the_reference(scoring):
    """Shared selection reduces over KV heads as reduce_scores does (max for hamming, sum otherwise)."""
    rep = {"hamming": "hash", "kvstar_vote": "subblock", "quest": "minmax"}[scoring]
    g = torch.Generator().manual_seed(7)
    for selection in ("shared", "per_head"):
        sparse = SparseConfig(block_size=16, budget=Budget.ratio(0.25), scoring=scoring, representation=rep,
                              selection=selection)
        scores = -torch.randint(0, 40, (4, 4, 50), generator=g).float()
        got = select_batched(scores, 50, sparse, scoring, 4)
        want = [select_from_scores(scores[b], 50, sparse, scoring, 4) for b in range(4)]
        _assert_rows_equal(got, want, f"{scoring} {selection}")


def test_select_batched_tie_break_lower_id_wins():
    sparse = SparseConfig(block_size=16, sink_blocks=1, local_blocks=1, min_blocks=1, budget=Budget.top_k(2))
    s = torch.zeros(1, 1, 8)
    s[0, 0, [2, 4, 6]] = 1.0  # three equal best candidates, two kept: 2 and 4
    assert select_batched(s, 8, sparse, "dot", 1)[0, 0].tolist() == [0, 2, 4, 7]


def test_select_batched_num_blocks_below_min_blocks_is_dense():
    sparse = SparseConfig(block_size=16, min_blocks=6, budget=Budget.top_k(1))
    s = torch.randn(2, 3, 9)
    sel = select_batched(s, torch.tensor([5, 9], dtype=torch.int32), sparse, "dot", 3)
    assert sel[0, 0].tolist()[:5] == [0, 1, 2, 3, 4] and bool((sel[0, :, 5:] == -1).all())
    assert int((sel[1, 0] >= 0).sum()) == 1 + 2 + 1


def test_select_batched_bad_input():
    sparse = SparseConfig(block_size=16)
    s = torch.randn(2, 4, 10)
    with pytest.raises(ValueError, match=r"scores must be finite for candidate blocks; scores\[1, 0, 3\] = inf"):
        t = s.clone()
        t[1, :, 3] = float("inf")
        select_batched(t, 10, sparse, "dot", 4)
    with pytest.raises(ValueError, match=r"num_blocks must be in \[0, 10\].*got \[3, 11\]"):
        select_batched(s, torch.tensor([3, 11]), sparse, "dot", 4)
    with pytest.raises(ValueError, match="num_blocks must have size 2 on axis 0"):
        select_batched(s, torch.tensor([3, 4, 5]), sparse, "dot", 4)
    with pytest.raises(ValueError, match="num_kv_heads = 2 must equal scores.shape\\[1\\] = 4 for per-head"):
        select_batched(s, 10, SparseConfig(block_size=16, selection="per_head"), "dot", 2)
    with pytest.raises(ValueError, match="scoring must be one of"):
        select_batched(s, 10, sparse, "cosine", 4)
    with pytest.raises(TypeError, match="sparse must be a SparseConfig, got dict"):
        select_batched(s, 10, {}, "dot", 4)
    with pytest.raises(ValueError, match="scores must have 3 dimensions"):
        select_batched(s[0], 10, sparse, "dot", 4)
    with pytest.raises(ValueError, match="extra must be >= 0, got -1"):
        select_batched(s, 10, sparse, "dot", 4, extra=-1)
    with pytest.raises(ValueError, match="num_blocks must be >= 0, got -2"):
        select_batched(s, -2, sparse, "dot", 4)


# ---------------------------------------------------------------------------------------------
# scoring + selection end to end (the ESA retrieval) vs the per-layer path


def _esa_case(g, layers, hq, hkv, d, nb, bs, exact):
    """Queries [L, Hq, D] and per-layer mean-K reps [nb, Hkv, D] from K with a partial last block."""
    seq = (nb - 1) * bs + max(1, bs // 3)  # partial last block
    lens = block_lens_from_seq_lens(torch.tensor(seq), nb, bs)
    if exact:  # integer K, power-of-two block sizes / GQA groups: every product and sum is exact
        k = torch.randint(-4, 5, (layers, nb, hkv, bs, d), generator=g).float()
        q = torch.randint(-4, 5, (layers, hq, d), generator=g).float()
        reps = [k[layer].sum(-2) for layer in range(layers)]  # sums (not means) keep integers
    else:
        k = torch.randn(layers, nb, hkv, bs, d, generator=g)
        q = torch.randn(layers, hq, d, generator=g)
        reps = [block_mean(k[layer], lens) for layer in range(layers)]
    return q, reps


@pytest.mark.parametrize("exact", [True, False], ids=["integer-data", "gaussian-data"])
@pytest.mark.parametrize(("layers", "hq", "hkv", "d"), [(1, 4, 4, 64), (3, 8, 2, 128), (4, 32, 4, 64), (2, 16, 2, 128)])
@pytest.mark.parametrize("selection", ["shared", "per_head"])
def test_batched_esa_retrieval_equals_per_layer(exact, layers, hq, hkv, d, selection):
    g = torch.Generator().manual_seed(layers * 131 + hq * 7 + hkv + d)
    for nb, budget in [(3, Budget.ratio(0.125)), (9, Budget.top_k(3)), (40, Budget.ratio(0.125)),
                       (40, Budget.mass(0.8)), (70, Budget.ratio(0.5))]:
        sparse = SparseConfig(block_size=16, budget=budget, selection=selection)
        q, reps = _esa_case(g, layers, hq, hkv, d, nb, 16, exact)
        store = BlockRepStore(num_layers=layers, num_kv_heads=hkv, head_dim=d, capacity=5)
        store.append(torch.stack([r[:2] for r in reps]))  # grows over two appends
        store.append(torch.stack([r[2:] for r in reps]))
        scores = batched_dot_scores(q, store.reps())
        ref_scores = torch.stack([dot_scores(q[layer][None], reps[layer])[0] for layer in range(layers)])
        if exact:
            assert torch.equal(scores, ref_scores)
        else:
            torch.testing.assert_close(scores, ref_scores, rtol=1e-5, atol=1e-5)
        got = select_batched(scores, nb, sparse, "dot", hkv)
        want = [select_from_scores(ref_scores[layer], nb, sparse, "dot", hkv) for layer in range(layers)]
        _assert_rows_equal(got, want, f"nb={nb} {budget} {selection}")


def test_batched_dot_scores_bad_input():
    q = torch.randn(2, 8, 16)
    reps = torch.randn(2, 4, 16, 10)
    with pytest.raises(ValueError, match=r"q must have shape \[L=2, Hq, D=16\] to match reps"):
        batched_dot_scores(q[:1], reps)
    with pytest.raises(ValueError, match=r"q heads \(8\) must be a positive multiple of num_kv_heads heads \(3\)"):
        batched_dot_scores(q, torch.randn(2, 3, 16, 10))
    with pytest.raises(TypeError, match="reps must have dtype in"):
        batched_dot_scores(q, reps.to(torch.int32))
    with pytest.raises(ValueError, match="reps must have 4 dimensions"):
        batched_dot_scores(q, reps[0])


# ---------------------------------------------------------------------------------------------
# the store


def test_block_rep_store_append_grow_and_snapshots():
    g = torch.Generator().manual_seed(0)
    store = BlockRepStore(num_layers=3, num_kv_heads=2, head_dim=8, capacity=2)
    chunks = [torch.randn(3, n, 2, 8, generator=g) for n in (1, 0, 3, 1, 6)]
    snaps = []
    for c in chunks:
        store.append(c.half() if c.shape[1] == 1 else c)  # any float dtype is stored as float32
        snaps.append((store.num_blocks, store.reps()))
    full = torch.cat([c.half().float() if c.shape[1] == 1 else c for c in chunks], dim=1)  # [L, nb, H, D]
    assert store.num_blocks == 11 and store.capacity >= 11 and store.nbytes == 11 * 3 * 2 * 8 * 4
    assert torch.equal(store.reps(), full.permute(0, 2, 3, 1))
    for layer in range(3):
        assert torch.equal(store.layer(layer), full[layer])
    for n, view in snaps:  # earlier views are unchanged by later appends (growth moved to a new buffer)
        assert view.shape[-1] == n and torch.equal(view, full[:, :n].permute(0, 2, 3, 1))


def test_block_rep_store_bad_input():
    store = BlockRepStore(num_layers=2, num_kv_heads=2, head_dim=4)
    with pytest.raises(ValueError, match=r"reps must have shape \[L=2, n, Hkv=2, D=4\], got \(2, 1, 3, 4\)"):
        store.append(torch.zeros(2, 1, 3, 4))
    with pytest.raises(TypeError, match="reps must have dtype in"):
        store.append(torch.zeros(2, 1, 2, 4, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"layer must be in \[0, 2\), got 2"):
        store.layer(2)
    with pytest.raises(ValueError, match="num_layers must be > 0, got 0"):
        BlockRepStore(num_layers=0, num_kv_heads=2, head_dim=4)


# ---------------------------------------------------------------------------------------------
# plan's extension of selections


def test_extend_selections_equals_extend_selection():
    g = torch.Generator().manual_seed(1)
    for layers, h, s, start, stop in [(1, 1, 1, 0, 0), (3, 4, 5, 9, 9), (3, 4, 5, 9, 12), (2, 8, 7, 30, 31),
                                      (4, 2, 3, 5, 40)]:
        sel = torch.full((layers, h, s), -1, dtype=torch.int32)
        for i, j in itertools.product(range(layers), range(h)):
            n = int(torch.randint(0, min(s, start) + 1, (1,), generator=g))
            ids = torch.randperm(start, generator=g)[:n].sort().values if start else torch.zeros(0, dtype=torch.int64)
            sel[i, j, : len(ids)] = ids.to(torch.int32)
        got = extend_selections(sel, start, stop)
        want = [extend_selection(sel[layer], start, stop) for layer in range(layers)]
        _assert_rows_equal(got, want, f"L={layers} H={h} S={s} {start}..{stop}")


def test_extend_selections_bad_input():
    sel = torch.tensor([[[0, 3, -1]]], dtype=torch.int32)
    with pytest.raises(ValueError, match=r"sel entries must be -1 \(padding\) or block ids < start = 3"):
        extend_selections(sel, 3, 5)
    with pytest.raises(ValueError, match="stop must be >= start, got start=5, stop=4"):
        extend_selections(sel, 5, 4)
    with pytest.raises(TypeError, match="sel must have dtype in \\(int32\\)"):
        extend_selections(sel.long(), 4, 5)


def test_stack_layer_selections():
    a = torch.tensor([[0, 1], [0, -1]], dtype=torch.int32)
    b = torch.tensor([[2, 3, 4], [1, 2, -1]], dtype=torch.int32)
    out = stack_layer_selections([a, b])
    assert out.tolist() == [[[0, 1, -1], [0, -1, -1]], [[2, 3, 4], [1, 2, -1]]]
    with pytest.raises(ValueError, match=r"sels\[1\] has 1 rows, sels\[0\] has 2"):
        stack_layer_selections([a, b[:1]])
    with pytest.raises(ValueError, match=r"sels\[0\] must be an int32 tensor \[Hkv, S\]"):
        stack_layer_selections([a.long()])


# ---------------------------------------------------------------------------------------------
# the policies' batched retrieval and plan vs their per-layer reference


@pytest.mark.parametrize("selection", ["shared", "per_head"])
def test_esa_and_gsa_select_all_equal_their_per_layer_select(selection, bind_policy):
    g = torch.Generator().manual_seed(5)
    layers, hq, hkv, d, nb = 3, 8, 2, 64, 23
    sparse = SparseConfig(block_size=16, budget=Budget.ratio(0.25), selection=selection)
    q, reps = _esa_case(g, layers, hq, hkv, d, nb, 16, exact=True)
    store = BlockRepStore(num_layers=layers, num_kv_heads=hkv, head_dim=d)
    store.append(torch.stack(reps))
    esa = bind_policy(ESAPolicy(), layers, hq, hkv, d, sparse)
    want = [esa._select(reps, nb, list(q), layer) for layer in range(layers)]
    _assert_rows_equal(esa._select_all(store.reps(), nb, q), want, "esa")
    gsa = bind_policy(GSAPolicy(prefetch_blocks=2), layers, hq, hkv, d, sparse)
    for n_rep, nb_now in [(nb, nb), (nb - 1, nb), (0, 3)]:  # last block without a representation yet
        part = store.reps()[..., :n_rep]
        want = [gsa._select([r[:n_rep] for r in reps], nb_now, list(q), layer) for layer in range(layers)]
        _assert_rows_equal(gsa._select_all(part, nb_now, q), want, f"gsa n_rep={n_rep}")


@pytest.mark.parametrize("selection", ["shared", "per_head"])
def test_kvstar_select_all_equals_per_layer_select(selection, bind_policy):
    g = torch.Generator().manual_seed(9)
    layers, hq, hkv, d, nb, bs, tv = 3, 8, 2, 32, 13, 16, 4
    cfg = KVStarConfig(retrieval_stride=tv, token_merge=4, channel_ratio=0.5)
    sparse = SparseConfig(block_size=bs, budget=Budget.ratio(0.3), scoring="kvstar_vote",
                          representation="subblock", selection=selection)
    pol = bind_policy(KVStarPolicy(cfg), layers, hq, hkv, d, sparse)
    seq = (nb - 1) * bs + 5
    lens = block_lens_from_seq_lens(torch.tensor(seq), nb, bs)
    reps = []
    for _ in range(layers):
        sub = kvstar_subblock(torch.randn(nb, hkv, bs, d, generator=g), lens, cfg)
        reps.append(SubBlockRepr(values=sub.values.half(), counts=sub.counts, channels=sub.channels))
    cand = candidate_mask(torch.tensor([nb], dtype=torch.int32), nb, sink_blocks=1, local_blocks=2, min_blocks=4)[0]
    st = KVStarRequestState(dense=False, votes=[PreparedVote(r, cand) for r in reps], sel_nb=nb)
    group = [torch.randn(hq, tv, d, generator=g) for _ in range(layers)]
    want = [pol._select(st, group, layer) for layer in range(layers)]
    _assert_rows_equal(pol._select_all(st, group), want, "kvstar")


def test_offload_plan_equals_per_layer_extend_selection_and_caches(bind_policy):
    layers, hkv = 3, 2
    sparse = SparseConfig(block_size=4)
    pol = bind_policy(ESAPolicy(), layers, 4, hkv, 8, sparse)
    g = torch.Generator().manual_seed(2)
    sel = torch.full((layers, hkv, 4), -1, dtype=torch.int32)
    for i, j in itertools.product(range(layers), range(hkv)):
        ids = torch.randperm(6, generator=g)[: 1 + (i + j) % 4].sort().values
        sel[i, j, : len(ids)] = ids.to(torch.int32)
    pol._state["a"] = OffloadRequestState(dense=False, sel=sel, sel_nb=6)
    pol._state["b"] = OffloadRequestState(dense=True)
    selected = candidates = 0
    for step, new_len in enumerate([24, 25, 28, 29, 33], start=1):  # 6, 7, 7, 8, 9 blocks
        views = [RequestView(rid="b", prompt_len=20, seq_len=new_len - 1, new_len=new_len, step=step),
                 RequestView(rid="a", prompt_len=24, seq_len=new_len - 1, new_len=new_len, step=step)]
        out = pol.plan(views)
        nb_new = -(-new_len // 4)
        assert len(out) == layers
        for layer in range(layers):
            assert out[layer][0] is None
            want = extend_selection(sel[layer], 6, nb_new)
            got = out[layer][1]
            assert got.dtype == torch.int32 and got.shape[0] == hkv
            assert torch.equal(got[:, : want.shape[1]], want) and bool((got[:, want.shape[1]:] == -1).all())
            selected += int((want >= 0).sum())
            candidates += nb_new * hkv
        assert pol.selected_blocks == selected and pol.candidate_blocks == candidates
    # a new selection replaces the cached extension
    new_sel = torch.zeros((layers, hkv, 1), dtype=torch.int32)

    class _Done:
        step, num_blocks = 5, 6

        @staticmethod
        def result():
            return new_sel

    pol._collect(pol._state["a"], _Done())
    out = pol.plan([RequestView(rid="a", prompt_len=24, seq_len=32, new_len=33, step=6)])
    assert out[0][0].tolist() == [[0, 6, 7, 8], [0, 6, 7, 8]]


def test_policies_snapshot_the_reused_query_buffer():
    """The runtime hands after_step views of one capture buffer that the next step overwrites (on
    CPU ``.cpu()`` does not copy): the queries a retrieval uses must be those of their own step."""
    from ucm_trt.runtime.worker import RetrievalWorker

    layers, hq, hkv, d, nb, bs, r = 2, 4, 2, 16, 9, 16, 3
    cfg = KVStarConfig(retrieval_stride=r, token_merge=4, channel_ratio=0.5)
    sparse = SparseConfig(block_size=bs, scoring="kvstar_vote", representation="subblock", retrieval_stride=r)
    seen = []

    class _Recording(KVStarPolicy):
        def _task(self, st, group):
            seen.append([g.clone() for g in group])
            return super()._task(st, group)

    worker = RetrievalWorker(1)
    try:
        shape = ModelShape(num_layers=layers, num_q_heads=hq, num_kv_heads=hkv, head_dim=d, rope_theta=1e4,
                           max_positions=1024)
        pol = _Recording(cfg)
        pol.bind(PolicyRuntime(shape=shape, sparse=sparse, kv=None, worker=worker, device=torch.device("cpu")))
        g = torch.Generator().manual_seed(4)
        lens = block_lens_from_seq_lens(torch.tensor(nb * bs), nb, bs)
        reps = [kvstar_subblock(torch.randn(nb, hkv, bs, d, generator=g), lens, cfg) for _ in range(layers)]
        cand = candidate_mask(torch.tensor([nb], dtype=torch.int32), nb, sink_blocks=1, local_blocks=2)[0]
        pol._state["a"] = KVStarRequestState(dense=False, sel_nb=nb, votes=[PreparedVote(r, cand) for r in reps])
        buf = torch.zeros(layers, 1, hq, d)  # one buffer, overwritten every step like the runtime's capture
        written = []
        for step in range(1, r + 1):
            buf.copy_(torch.randn(layers, 1, hq, d, generator=g))
            written.append(buf.clone())
            view = RequestView(rid="a", prompt_len=nb * bs, seq_len=nb * bs + step - 1, new_len=nb * bs + step,
                               step=step)
            pol.after_step([view], list(buf))
        buf.fill_(float("nan"))  # the next step overwrites the buffer while the retrieval may still run
        pol._state["a"].pending.result()
        assert len(seen) == 1
        for layer in range(layers):
            want = torch.stack([w[layer, 0] for w in written], dim=1)  # [Hq, R, D]
            assert torch.equal(seen[0][layer], want)
    finally:
        worker.shutdown()


@pytest.mark.parametrize("hq,hkv", [(4, 4), (8, 2), (8, 1)])
def test_kvstar_prepared_vote_equals_vote_scores(hq, hkv):
    """The laid-out vote (float32, allowed positions only, one bmm + index_add) gives the scores of
    kvstar_vote_scores: empty sub-blocks of a partial last block, a candidate mask, fp16 store."""
    g = torch.Generator().manual_seed(hq * 10 + hkv)
    nb, bs, d, tv = 11, 16, 32, 3
    cfg = KVStarConfig(retrieval_stride=tv, token_merge=4, channel_ratio=0.5)
    lens = block_lens_from_seq_lens(torch.tensor((nb - 1) * bs + 6), nb, bs)
    sub = kvstar_subblock(torch.randn(nb, hkv, bs, d, generator=g), lens, cfg)
    sub = SubBlockRepr(values=sub.values.half(), counts=sub.counts, channels=sub.channels)
    q = torch.randn(hq, tv, d, generator=g)
    for cand in (candidate_mask(torch.tensor([nb], dtype=torch.int32), nb, sink_blocks=1, local_blocks=2,
                                min_blocks=4)[0], torch.ones(nb, dtype=torch.bool)):
        want = kvstar_vote_scores(q[None], sub, block_mask=cand)[0]
        got = PreparedVote(sub, cand).scores(q)
        assert got.shape == want.shape == (hkv, nb)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        assert (got[:, ~cand] == 0).all()
    none = torch.zeros(nb, dtype=torch.bool)  # nothing allowed: no votes
    assert (PreparedVote(sub, none).scores(q) == 0).all()
    with pytest.raises(ValueError, match="cand must be a bool"):
        PreparedVote(sub, torch.ones(nb + 1, dtype=torch.bool))
