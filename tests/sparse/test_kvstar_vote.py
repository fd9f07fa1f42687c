"""KVStar's tiled vote (:class:`PreparedVote`) selects what the previous one-pass vote selected.

``_OnePassVote`` is the implementation the tiled one replaced (verbatim: float32 layout of the allowed
positions, one bmm, a softmax over every position, an ``index_add`` into blocks). The two compute the
same softmax masses in another float32 order (and the tiled one with ``exp2`` of ``log2 e``-scaled
logits), so a score may differ in its last bits. Selections are compared as follows:

* where no two candidate scores of the reference lie within ``_TIE`` (relative) of the k-th best
  score, the selections must be identical;
* where some do (ties, e.g. identical blocks), the selections may differ only among those
  near-tied blocks: both must keep every block scoring clearly above the k-th best score and no block
  scoring clearly below it.
"""

from __future__ import annotations

import pytest
import torch

from ucm_trt.config import Budget, KVStarConfig, SparseConfig
from ucm_trt.sparse.batched import select_batched
from ucm_trt.sparse.policies import KVStarPolicy
from ucm_trt.sparse.policies.kvstar import KVStarRequestState, PreparedVote, StackedVote, VoteWorkspace
from ucm_trt.sparse.representations import SubBlockRepr, block_lens_from_seq_lens, kvstar_subblock
from ucm_trt.sparse.score import kvstar_vote_scores
from ucm_trt.sparse.select import candidate_mask

_TIE = 1e-4  # relative score difference below which two blocks count as tied


class _OnePassVote:
    """The previous ``PreparedVote`` (the oracle)."""

    def __init__(self, sub: SubBlockRepr, cand: torch.Tensor) -> None:
        vals, counts, ch = sub.values, sub.counts, sub.channels
        nb, m, hkv, dp = vals.shape
        allowed = ((counts > 0) & cand[:, None]).reshape(-1)
        cols = torch.nonzero(allowed)[:, 0]
        self.nb = nb
        self.block_of = cols // m
        self.vt = vals.reshape(nb * m, hkv, dp)[cols].float().permute(1, 2, 0).contiguous()
        self.channels = ch.to(torch.int64)

    def scores(self, q: torch.Tensor) -> torch.Tensor:
        hq, tv, d = q.shape
        hkv, dp, n = self.vt.shape
        g = hq // hkv
        out = torch.zeros(hkv, self.nb)
        if n == 0:
            return out
        qp = torch.gather(q.float().reshape(hkv, g * tv, d), -1, self.channels[:, None, :].expand(hkv, g * tv, dp))
        mass = torch.softmax(torch.bmm(qp, self.vt), dim=-1).sum(1)
        return out.index_add_(1, self.block_of, mass)


def _sub(g, nb, hkv, bs, d, cfg, seq, scale=1.0):
    lens = block_lens_from_seq_lens(torch.tensor(seq), nb, bs)
    sub = kvstar_subblock(scale * torch.randn(nb, hkv, bs, d, generator=g), lens, cfg)
    return SubBlockRepr(values=sub.values.half(), counts=sub.counts, channels=sub.channels)


def _sparse(bs, selection, ratio=0.25):
    return SparseConfig(block_size=bs, budget=Budget.ratio(ratio), scoring="kvstar_vote", representation="subblock",
                        selection=selection)


def _check_selection(got, want, ref_scores, nb, sparse, hkv):
    """``got``/``want`` int32 ``[L, Hkv, S]``; ``ref_scores [L, Hkv, nb]`` the oracle's scores."""
    if torch.equal(got, want):
        return
    s = ref_scores if sparse.selection == "per_head" else ref_scores.sum(1, keepdim=True).expand_as(ref_scores)
    lo, hi = sparse.sink_blocks, nb - sparse.local_blocks
    for layer in range(got.shape[0]):
        for h in range(hkv):
            a = {int(x) for x in got[layer, h] if x >= 0}
            b = {int(x) for x in want[layer, h] if x >= 0}
            if a == b:
                continue
            sc = s[layer, h, lo:hi].double()
            chosen = sorted(x - lo for x in b if lo <= x < hi)
            kth = float(sc[chosen].min())
            tol = _TIE * max(abs(kth), float(sc.abs().max()) * 1e-3, 1e-30)
            near = {i + lo for i in range(hi - lo) if abs(float(sc[i]) - kth) <= tol}
            assert near, f"layer {layer} head {h}: selections differ {sorted(a ^ b)} with no near-tie at the k-th score"
            assert (a ^ b) <= near, (f"layer {layer} head {h}: selections differ outside the near-tied blocks: "
                                     f"{sorted((a ^ b) - near)} (k-th score {kth})")


@pytest.mark.parametrize("hq,hkv", [(8, 8), (8, 2), (8, 1)])  # GQA groups 1, 4, 8
@pytest.mark.parametrize("tile", [1, 3, 32])
def test_tiled_vote_scores_equal_one_pass_and_reference(hq, hkv, tile, monkeypatch):
    """Scores of the tiled vote: the one-pass oracle's and kvstar_vote_scores' (float32 order), with
    empty sub-blocks of a partial last candidate block, short last tiles, blocks with no allowed
    position, and sharp (large-logit) and flat softmaxes."""
    monkeypatch.setattr(PreparedVote, "TILE_BLOCKS", tile)
    g = torch.Generator().manual_seed(hq * 10 + hkv + tile)
    nb, bs, d, tv = 11, 16, 32, 3
    cfg = KVStarConfig(retrieval_stride=tv, token_merge=4, channel_ratio=0.5)
    for scale in (0.1, 1.0, 4.0):
        sub = _sub(g, nb, hkv, bs, d, cfg, (nb - 1) * bs + 6, scale)  # last block: 6 of 16 tokens
        q = scale * torch.randn(hq, tv, d, generator=g)
        masks = [candidate_mask(torch.tensor([nb], dtype=torch.int32), nb, sink_blocks=1, local_blocks=2,
                                min_blocks=4)[0], torch.ones(nb, dtype=torch.bool)]
        masks.append(torch.arange(nb) % 3 == 1)
        for cand in masks:
            want = _OnePassVote(sub, cand).scores(q)
            got = PreparedVote(sub, cand).scores(q)
            assert got.shape == want.shape == (hkv, nb)
            torch.testing.assert_close(got, want, rtol=2e-5, atol=1e-6)
            torch.testing.assert_close(got, kvstar_vote_scores(q[None], sub, block_mask=cand)[0], rtol=2e-5, atol=1e-6)
            assert (got[:, ~cand] == 0).all()
            # the group's softmax masses sum to the number of queries of each KV head's group
            torch.testing.assert_close(got.sum(-1), torch.full((hkv,), float(hq // hkv * tv)), rtol=1e-5, atol=1e-5)
    none = torch.zeros(nb, dtype=torch.bool)
    assert (PreparedVote(sub, none).scores(q) == 0).all()
    with pytest.raises(ValueError, match="cand must be a bool"):
        PreparedVote(sub, torch.ones(nb + 1, dtype=torch.bool))



@pytest.mark.parametrize("selection", ["shared", "per_head"])
@pytest.mark.parametrize("hq,hkv", [(4, 4), (16, 4), (8, 1)])  # GQA groups 1, 4, 8
def test_tiled_vote_selects_what_the_one_pass_vote_selected(selection, hq, hkv, monkeypatch, bind_policy):
    """Whole retrievals (every layer, one batched selection) on random inputs: identical selections
    where the oracle's k-th score has no near-tie, near-tie-only differences elsewhere."""
    monkeypatch.setattr(PreparedVote, "TILE_BLOCKS", 5)
    layers, d, bs, tv = 3, 64, 16, 4
    cfg = KVStarConfig(retrieval_stride=tv, token_merge=2, channel_ratio=0.25)
    sparse = _sparse(bs, selection)
    pol = bind_policy(KVStarPolicy(cfg), layers, hq, hkv, d, sparse)
    for seed, nb in enumerate([9, 37, 64]):
        g = torch.Generator().manual_seed(100 + seed)
        seq = (nb - 1) * bs + 1 + seed  # partial last block
        cand = candidate_mask(torch.tensor([nb], dtype=torch.int32), nb, sink_blocks=1, local_blocks=2,
                              min_blocks=4)[0]
        subs = [_sub(g, nb, hkv, bs, d, cfg, seq, scale=2.0) for _ in range(layers)]
        group = [2.0 * torch.randn(hq, tv, d, generator=g) for _ in range(layers)]
        st = KVStarRequestState(dense=False, votes=[PreparedVote(s, cand) for s in subs], sel_nb=nb)
        got = pol._select_all(st, group)
        ref = torch.stack([_OnePassVote(s, cand).scores(q) for s, q in zip(subs, group, strict=True)])
        want = select_batched(ref, nb, sparse, "kvstar_vote", hkv)
        assert torch.equal(got, want), f"nb={nb}: selections differ on random inputs (no ties expected)"
        _check_selection(got, want, ref, nb, sparse, hkv)


@pytest.mark.parametrize("selection", ["shared", "per_head"])
def test_tiled_vote_ties_resolve_like_the_one_pass_vote(selection, monkeypatch, bind_policy):
    """Identical blocks (exact ties) and a row of equal blocks straddling the budget's edge: the
    selections may differ only among the tied blocks, and with exactly equal scores (both votes
    give identical blocks identical scores here) they are identical (lower id wins)."""
    monkeypatch.setattr(PreparedVote, "TILE_BLOCKS", 4)
    layers, hq, hkv, d, bs, tv, nb = 2, 8, 2, 32, 16, 2, 24
    cfg = KVStarConfig(retrieval_stride=tv, token_merge=4, channel_ratio=0.5)
    sparse = _sparse(bs, selection, ratio=0.2)
    pol = bind_policy(KVStarPolicy(cfg), layers, hq, hkv, d, sparse)
    g = torch.Generator().manual_seed(7)
    cand = candidate_mask(torch.tensor([nb], dtype=torch.int32), nb, sink_blocks=1, local_blocks=2, min_blocks=4)[0]
    subs = []
    for _ in range(layers):
        s = _sub(g, nb, hkv, bs, d, cfg, nb * bs)
        vals = s.values.clone()
        vals[3:15] = vals[3]  # 12 identical blocks: the budget (4 of 21) cuts through them
        subs.append(SubBlockRepr(values=vals, counts=s.counts, channels=s.channels))
    group = [torch.randn(hq, tv, d, generator=g) for _ in range(layers)]
    st = KVStarRequestState(dense=False, votes=[PreparedVote(s, cand) for s in subs], sel_nb=nb)
    got = pol._select_all(st, group)
    ref = torch.stack([_OnePassVote(s, cand).scores(q) for s, q in zip(subs, group, strict=True)])
    _check_selection(got, select_batched(ref, nb, sparse, "kvstar_vote", hkv), ref, nb, sparse, hkv)


def test_tiled_vote_at_a_large_geometry_matches_one_pass(bind_policy):
    """Real tile size, 32 sub-blocks per block, 300 blocks, GQA 4, R 8: identical selections."""
    layers, hq, hkv, d, bs, tv, nb = 2, 16, 4, 128, 64, 8, 300
    cfg = KVStarConfig(retrieval_stride=tv)
    sparse = _sparse(bs, "per_head", ratio=1 / 8)
    pol = bind_policy(KVStarPolicy(cfg), layers, hq, hkv, d, sparse)
    g = torch.Generator().manual_seed(11)
    cand = candidate_mask(torch.tensor([nb], dtype=torch.int32), nb, sink_blocks=1, local_blocks=2, min_blocks=4)[0]
    subs = [_sub(g, nb, hkv, bs, d, cfg, nb * bs - 5) for _ in range(layers)]
    group = [3.0 * torch.randn(hq, tv, d, generator=g) for _ in range(layers)]
    st = KVStarRequestState(dense=False, votes=[PreparedVote(s, cand) for s in subs], sel_nb=nb)
    ref = torch.stack([_OnePassVote(s, cand).scores(q) for s, q in zip(subs, group, strict=True)])
    work = VoteWorkspace()
    got_scores = torch.stack([v.scores(q, work) for v, q in zip(st.votes, group, strict=True)])
    torch.testing.assert_close(got_scores, ref, rtol=5e-5, atol=1e-6)
    assert torch.equal(pol._select_all(st, group), select_batched(ref, nb, sparse, "kvstar_vote", hkv))


@pytest.mark.parametrize("threads", [2, 3])
def test_tiled_vote_scores_do_not_depend_on_the_thread_count(threads, monkeypatch):
    """Tiles go through the vote one per intra-op thread; each tile's arithmetic is the same, so the
    scores are the same with 1, 2 or 3 threads (3 leaves a short last group: 10 tiles)."""
    monkeypatch.setattr(PreparedVote, "TILE_BLOCKS", 3)
    g = torch.Generator().manual_seed(threads)
    nb, bs, d, tv, hq, hkv = 31, 16, 32, 4, 8, 2
    cfg = KVStarConfig(retrieval_stride=tv, token_merge=4, channel_ratio=0.5)
    sub = _sub(g, nb, hkv, bs, d, cfg, (nb - 1) * bs + 3, scale=2.0)
    q = 2.0 * torch.randn(hq, tv, d, generator=g)
    cand = torch.ones(nb, dtype=torch.bool)
    vote = PreparedVote(sub, cand)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = vote.scores(q)
        torch.set_num_threads(threads)
        many = vote.scores(q, VoteWorkspace())
    finally:
        torch.set_num_threads(before)
    torch.testing.assert_close(many, one, rtol=1e-6, atol=0)
    torch.testing.assert_close(one, _OnePassVote(sub, cand).scores(q), rtol=2e-5, atol=1e-6)


@pytest.mark.parametrize("compact_tiles", [1, 4, 16])
@pytest.mark.parametrize("hq,hkv", [(8, 2), (8, 8)])
def test_compact_vote_layout_scores_equal_the_host_layout(hq, hkv, compact_tiles, monkeypatch):
    """The compact layout (GPU-resident representations: float16 tiles upcast per chunk, one mask tensor)
    gives the host layout's scores, here on the CPU: with empty sub-blocks of a partial last block, masked
    candidates, several chunks with a short last one, and half the tile bytes."""
    monkeypatch.setattr(PreparedVote, "TILE_BLOCKS", 3)
    monkeypatch.setattr(PreparedVote, "COMPACT_TILES", compact_tiles)
    g = torch.Generator().manual_seed(hq + hkv + compact_tiles)
    nb, bs, d, tv = 29, 16, 32, 3
    cfg = KVStarConfig(retrieval_stride=tv, token_merge=4, channel_ratio=0.5)
    sub = _sub(g, nb, hkv, bs, d, cfg, (nb - 1) * bs + 5, scale=2.0)
    q = 2.0 * torch.randn(hq, tv, d, generator=g)
    for cand in (candidate_mask(torch.tensor([nb], dtype=torch.int32), nb, sink_blocks=1, local_blocks=2,
                                min_blocks=4)[0], torch.arange(nb) % 4 != 2):
        host = PreparedVote(sub, cand)
        compact = PreparedVote(sub, cand, compact=True, device="cpu")
        assert compact.vt.dtype == torch.float16 and host.vt.dtype == torch.float32
        assert compact.vt.numel() == host.vt.numel()
        assert compact.nbytes < host.nbytes
        want = host.scores(q)
        got = compact.scores(q, VoteWorkspace("cpu"))
        torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
        assert (got[:, ~cand] == 0).all()
        # the empty sub-blocks vote nothing: the masses still sum to the group's query count
        torch.testing.assert_close(got.sum(-1), torch.full((hkv,), float(hq // hkv * tv)), rtol=1e-5, atol=1e-5)
    with pytest.raises(TypeError, match="compact must be a bool"):
        PreparedVote(sub, cand, compact=1)


@pytest.mark.gpu
def test_compact_vote_on_cuda_matches_the_host_layout():
    """On CUDA the compact layout's scores are the host layout's up to the GPU matmul's rounding."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    g = torch.Generator().manual_seed(5)
    nb, bs, d, tv, hq, hkv = 300, 64, 128, 8, 32, 8
    cfg = KVStarConfig(retrieval_stride=tv)
    sub = _sub(g, nb, hkv, bs, d, cfg, nb * bs - 7)
    q = torch.randn(hq, tv, d, generator=g)
    cand = candidate_mask(torch.tensor([nb], dtype=torch.int32), nb, sink_blocks=1, local_blocks=2, min_blocks=4)[0]
    want = PreparedVote(sub, cand).scores(q)
    got = PreparedVote(sub, cand, compact=True, device="cuda").scores(q.cuda())
    assert got.device.type == "cuda"
    torch.testing.assert_close(got.cpu(), want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("scratch_tiles", [1, 3, 5, 1000])  # a tile per chunk, chunks across layers, all at once
@pytest.mark.parametrize("hq,hkv", [(8, 2), (6, 3)])
def test_stacked_vote_scores_every_layer_like_its_per_layer_votes(hq, hkv, scratch_tiles, monkeypatch):
    """StackedVote (every layer's compact tiles in one tensor, voted in chunks that may span layers) gives each
    layer's PreparedVote scores, on the CPU: per-layer channels and values, a partial last block, masked
    candidates; each layer alone (layer_scores) too; the same selections."""
    monkeypatch.setattr(PreparedVote, "TILE_BLOCKS", 3)
    g = torch.Generator().manual_seed(hq * 7 + scratch_tiles)
    nb, bs, d, tv, L = 23, 16, 32, 3, 4
    cfg = KVStarConfig(retrieval_stride=tv, token_merge=4, channel_ratio=0.5)
    seq = (nb - 1) * bs + 5
    subs = [_sub(g, nb, hkv, bs, d, cfg, seq, scale=2.0) for _ in range(L)]
    assert not all(torch.equal(subs[0].channels, s.channels) for s in subs[1:])  # layers prune different channels
    qs = 2.0 * torch.randn(L, hq, tv, d, generator=g)
    m = subs[0].values.shape[1]
    rows = hq // hkv * tv
    monkeypatch.setattr(StackedVote, "SCRATCH_BYTES", scratch_tiles * 4 * hkv * 3 * m * (rows + subs[0].values.shape[-1]))
    for cand in (candidate_mask(torch.tensor([nb], dtype=torch.int32), nb, sink_blocks=1, local_blocks=2,
                                min_blocks=4)[0], torch.arange(nb) % 3 != 1):
        per_layer = [PreparedVote(s, cand, compact=True, device="cpu") for s in subs]
        stacked = StackedVote(subs, cand, device="cpu")
        assert stacked.vt.shape[0] == L * per_layer[0].vt.shape[0]
        assert stacked.nbytes < sum(p.nbytes for p in per_layer)
        want = torch.stack([p.scores(q) for p, q in zip(per_layer, qs, strict=True)])
        got = stacked.scores(list(qs), VoteWorkspace("cpu"))
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(stacked.scores(qs), got, rtol=0, atol=0)  # a tensor of queries: the same
        for layer in (0, L - 1):
            torch.testing.assert_close(stacked.layer_scores(layer, qs[layer]), want[layer], rtol=1e-6, atol=1e-7)
        assert (got[:, :, ~cand] == 0).all()
        sparse = _sparse(bs, "per_head")
        _check_selection(select_batched(got, nb, sparse, "kvstar_vote", hkv),
                         select_batched(want, nb, sparse, "kvstar_vote", hkv), want, nb, sparse, hkv)


def test_stacked_vote_refuses_layers_that_do_not_share_blocks():
    g = torch.Generator().manual_seed(2)
    nb, bs, d = 12, 16, 32
    cfg = KVStarConfig(retrieval_stride=2, token_merge=4)
    a = _sub(g, nb, 2, bs, d, cfg, nb * bs)
    b = _sub(g, nb, 2, bs, d, cfg, (nb - 1) * bs + 3)  # another length: the last block's sub-blocks differ
    cand = torch.ones(nb, dtype=torch.bool)
    with pytest.raises(ValueError, match="layer 1's sub-blocks differ from layer 0's"):
        StackedVote([a, b], cand, device="cpu")
    with pytest.raises(ValueError, match="one SubBlockRepr per layer"):
        StackedVote([], cand, device="cpu")
    sv = StackedVote([a, a], cand, device="cpu")
    with pytest.raises(ValueError, match=r"layer must be in \[0, 2\)"):
        sv.layer_scores(2, torch.zeros(4, 2, d))
    with pytest.raises(ValueError, match=r"qs must be \[L=2"):
        sv.scores(torch.zeros(3, 4, 2, d))


@pytest.mark.gpu
def test_stacked_vote_on_cuda_matches_the_host_layout():
    """On CUDA every layer's stacked vote is the host layout's per-layer vote up to the GPU matmul's rounding,
    at a geometry where chunks span layers."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    g = torch.Generator().manual_seed(6)
    nb, bs, d, tv, hq, hkv, L = 300, 64, 128, 8, 32, 8, 3
    cfg = KVStarConfig(retrieval_stride=tv, channel_ratio=0.5)
    subs = [_sub(g, nb, hkv, bs, d, cfg, nb * bs - 7) for _ in range(L)]
    qs = torch.randn(L, hq, tv, d, generator=g)
    cand = candidate_mask(torch.tensor([nb], dtype=torch.int32), nb, sink_blocks=1, local_blocks=2, min_blocks=4)[0]
    want = torch.stack([PreparedVote(s, cand).scores(q) for s, q in zip(subs, qs, strict=True)])
    stacked = StackedVote(subs, cand, device="cuda")
    m, dp, rows = subs[0].values.shape[1], subs[0].values.shape[-1], hq // hkv * tv
    stacked.SCRATCH_BYTES = 3 * 4 * hkv * PreparedVote.TILE_BLOCKS * m * (rows + dp)  # 3 tiles a chunk, 10 a layer
    assert stacked.tiles_per_layer % 3
    got = stacked.scores(qs.cuda())
    assert got.device.type == "cuda"
    torch.testing.assert_close(got.cpu(), want, rtol=1e-4, atol=1e-6)
