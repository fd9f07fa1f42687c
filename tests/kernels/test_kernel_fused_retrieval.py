"""Fused GPU retrieval (score + block top-k in one launch) against the library's references.

References: ``ucm_trt.sparse.score`` (hamming_scores, dot_scores, quest_scores, reduce_scores) on the
blocks gathered through the block table, then ``ucm_trt.sparse.select.select_blocks_by_count`` with
``top_k`` counting the forced blocks. Dot/Quest cases use small-integer data so that both sides'
fp32 sums are exact: equal scores (ties) are frequent and must go to the lower block id.
"""

from __future__ import annotations

import pytest
import torch

from ucm_trt.kernels.fused_retrieval import (
    RetrievalLaunch,
    RetrievalWorkspace,
    dot_retrieve,
    hash_retrieve,
    quest_retrieve,
)
from ucm_trt.kernels.guard import IndexGuard, IndexOutOfRangeError
from ucm_trt.sparse import representations as rp
from ucm_trt.sparse.score import dot_scores, hamming_scores, quest_scores, reduce_scores
from ucm_trt.sparse.select import select_blocks_by_count

# ------------------------------------------------------------------ cases and references


def make_table(lens, bs, nphys, gen, *, extra=2, junk=True):
    """Distinct random physical ids (never 0) for the blocks in use; junk ids past them."""
    nbs = [(n + bs - 1) // bs for n in lens]
    mb = max(nbs) + extra
    perm = (torch.randperm(nphys - 1, generator=gen) + 1).tolist()
    fill = 10**6 if junk else 0  # entries past a sequence's blocks must never be read
    table = torch.full((len(lens), mb), fill, dtype=torch.int32)
    it = iter(perm)
    for i, nb in enumerate(nbs):
        for j in range(nb):
            table[i, j] = next(it)
    return table


def ref_selection(scores, lens, bs, *, top_k, sink, local, shared, scoring):
    """scores [B, Hkv, mb] higher-is-better per head -> reference selection [B, Hkv, top_k]."""
    hkv = scores.shape[1]
    s = reduce_scores(scores, scoring) if shared else scores
    nb = torch.tensor([(n + bs - 1) // bs for n in lens], dtype=torch.int32)
    counts = (top_k - torch.clamp(nb, max=sink + local)).clamp(min=0)[:, None]
    valid = torch.arange(s.shape[-1])[None, None] < nb[:, None, None].long()
    s = torch.where(valid, s, torch.zeros_like(s))
    return select_blocks_by_count(s.cpu(), nb, counts, sink_blocks=sink, local_blocks=local,
                                  num_kv_heads=hkv if shared else None, max_selected=top_k)


def gather(reps, table, lens, bs):
    """reps[physical] for every logical block in use (entries past a sequence: block 0)."""
    nbs = torch.tensor([(n + bs - 1) // bs for n in lens])
    idx = torch.where(torch.arange(table.shape[1])[None] < nbs[:, None], table.long().cpu(), 0)
    return reps.cpu()[idx]


def hash_case(*, lens, hkv, group, d, bs, bits, seed):
    gen = torch.Generator().manual_seed(seed)
    nphys = sum((n + bs - 1) // bs for n in lens) + 4
    table = make_table(lens, bs, nphys, gen)
    codes = torch.randint(0, 256, (nphys, hkv, bs, bits // 8), generator=gen, dtype=torch.uint8)
    # codes of slots past seq_len are poison: all-zero codes would win if they were read
    for i, n in enumerate(lens):
        nb = (n + bs - 1) // bs
        codes[int(table[i, nb - 1]), :, n - (nb - 1) * bs:] = 0
    enc = rp.HashEncoder.random(d, bits, seed=seed + 1)
    # a query bit on the sign boundary could flip with the summation order: keep every projection 1e-4 away
    # from it (fp32 sums of <= 256 terms of this size differ by ~1e-6; 1e-3 left no query at 2048 projections)
    for _ in range(100):
        q = torch.randn((len(lens), hkv * group, d), generator=gen)
        if (q.view(len(lens), hkv, group, d).mean(2) @ enc.weight).abs().min() > 1e-4:
            break
    else:
        raise AssertionError("no query without a bit on the sign boundary")
    block_lens = rp.block_lens_from_seq_lens(torch.tensor(lens), table.shape[1], bs)
    ref_scores = hamming_scores(q, enc, gather(codes, table, lens, bs), block_lens)
    return q, codes, enc.weight, table, torch.tensor(lens, dtype=torch.int32), ref_scores


def rep_case(*, lens, hkv, group, d, bs, seed, mode, integer=True):
    gen = torch.Generator().manual_seed(seed)
    nphys = sum((n + bs - 1) // bs for n in lens) + 4

    def draw(shape):
        if integer:
            return torch.randint(-3, 4, shape, generator=gen).float()
        return torch.randn(shape, generator=gen)

    table = make_table(lens, bs, nphys, gen)
    q = draw((len(lens), hkv * group, d))
    a, c = draw((nphys, hkv, d)), draw((nphys, hkv, d))
    lo, hi = torch.minimum(a, c), torch.maximum(a, c)
    if mode == "dot":
        ref = dot_scores(q, gather(a, table, lens, bs))
        reps = (a,)
    else:
        ref = quest_scores(q, gather(lo, table, lens, bs), gather(hi, table, lens, bs),
                           group="sum" if mode == "quest" else "mean_query")
        reps = (lo, hi)
    return q, reps, table, torch.tensor(lens, dtype=torch.int32), ref


def run_rep(mode, q, reps, table, seq, *, bs, dev, **kw):
    reps = tuple(r.to(dev) for r in reps)
    if mode == "dot":
        return dot_retrieve(q.to(dev), *reps, table.to(dev), seq.to(dev), block_size=bs, **kw)
    return quest_retrieve(q.to(dev), *reps, table.to(dev), seq.to(dev), block_size=bs,
                          quest_group="sum" if mode == "quest" else "mean_query", **kw)


SELECTIONS = [(6, 1, 2), (40, 0, 1), (3, 1, 2), (1, 0, 1)]  # (top_k, sink, local); 40 >= every row's blocks


# ------------------------------------------------------------------ hash


@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("bits,d,group", [(32, 64, 4), (128, 128, 8), (16, 64, 1), (64, 80, 2), (32, 96, 4),
                                          (96, 96, 4), (80, 80, 2), (24, 32, 2), (256, 256, 2), (8, 16, 1),
                                          # the default preset's 4 bits per channel (SmolLM2's d64, 8B-class d128)
                                          (256, 64, 3), (512, 128, 4)])
def test_hash_retrieve_matches_reference(bits, d, group, shared, device):
    lens = [150, 37, 16, 1]
    q, codes, w, table, seq, ref_scores = hash_case(lens=lens, hkv=2, group=group, d=d, bs=16, bits=bits, seed=bits + d)
    for top_k, sink, local in SELECTIONS:
        got = hash_retrieve(q.to(device), codes.to(device), w.to(device), table.to(device), seq.to(device),
                            top_k=top_k, sink_blocks=sink, local_blocks=local, shared=shared, validate=False)
        ref = ref_selection(ref_scores, lens, 16, top_k=top_k, sink=sink, local=local, shared=shared,
                            scoring="hamming")
        assert torch.equal(got.cpu(), ref), (top_k, sink, local, got, ref)


def test_hash_retrieve_tiles_and_radix_knobs_do_not_change_the_result(device):
    lens = [300, 129, 64]
    q, codes, w, table, seq, ref_scores = hash_case(lens=lens, hkv=2, group=2, d=64, bs=16, bits=64, seed=7)
    ref = ref_selection(ref_scores, lens, 16, top_k=7, sink=1, local=2, shared=True, scoring="hamming")
    args = (q.to(device), codes.to(device), w.to(device), table.to(device), seq.to(device))
    for launch in (RetrievalLaunch(tokens_per_tile=16), RetrievalLaunch(tokens_per_tile=64, radix_bits=1),
                   RetrievalLaunch(radix_bits=6, num_warps=4), RetrievalLaunch(topk_chunk=16),
                   RetrievalLaunch(topk_chunk=16, radix_bits=3)):
        got = hash_retrieve(*args, top_k=7, sink_blocks=1, local_blocks=2, launch=launch, validate=False)
        assert torch.equal(got.cpu(), ref), launch


# ------------------------------------------------------------------ dot / Quest


@pytest.mark.parametrize("mode", ["dot", "quest", "quest_mean"])
@pytest.mark.parametrize("shared", [True, False])
def test_rep_retrieve_matches_reference_with_ties(mode, shared, device):
    lens = [200, 33, 32, 7]
    q, reps, table, seq, ref_scores = rep_case(lens=lens, hkv=2, group=4, d=32, bs=16, seed=3, mode=mode)
    scoring = "dot" if mode == "dot" else "quest"
    assert len(torch.unique(ref_scores)) < ref_scores.numel() // 2, "integer data must produce ties"
    for top_k, sink, local in SELECTIONS:
        got = run_rep(mode, q, reps, table, seq, bs=16, dev=device, top_k=top_k, sink_blocks=sink,
                      local_blocks=local, shared=shared)
        ref = ref_selection(ref_scores, lens, 16, top_k=top_k, sink=sink, local=local, shared=shared,
                            scoring=scoring)
        assert torch.equal(got.cpu(), ref), (top_k, sink, local, got, ref)


@pytest.mark.parametrize("d", [80, 96, 128])
def test_quest_retrieve_float_scores_and_padded_head_dims(d, device):
    lens = [500, 77]
    q, reps, table, seq, ref_scores = rep_case(lens=lens, hkv=2, group=2, d=d, bs=16, seed=d, mode="quest",
                                               integer=False)
    ref = ref_selection(ref_scores, lens, 16, top_k=9, sink=1, local=2, shared=False, scoring="quest")
    for launch in (None, RetrievalLaunch(topk_chunk=16, radix_bits=5, blocks_per_tile=2)):
        got = run_rep("quest", q, reps, table, seq, bs=16, dev=device, top_k=9, sink_blocks=1, local_blocks=2,
                      shared=False, launch=launch)
        assert torch.equal(got.cpu(), ref), launch


@pytest.mark.parametrize("radix_bits", [1, 4, 7, 8])
def test_dot_retrieve_float_scores_every_radix_width(radix_bits, device):
    """Distinct float scores end the radix select early (T's bucket holds exactly the keys still needed);
    the integer-data cases above end it with ties in the bucket. Both must give the reference's top-k,
    from a top-k of one block to every candidate, in one chunk and re-read in several."""
    lens = [700, 301, 64]
    q, reps, table, seq, ref_scores = rep_case(lens=lens, hkv=2, group=4, d=64, bs=16, seed=radix_bits,
                                               mode="dot", integer=False)
    first = ref_scores[0, :, : -(-lens[0] // 16)]  # the longest row's blocks in use
    assert len(torch.unique(first)) == first.numel(), "float data must have no ties"
    for top_k, sink, local in [(4, 1, 2), (3, 0, 2), (1, 0, 1), (44, 1, 1), (30, 2, 3)]:
        ref = ref_selection(ref_scores, lens, 16, top_k=top_k, sink=sink, local=local, shared=False, scoring="dot")
        for launch in (RetrievalLaunch(radix_bits=radix_bits), RetrievalLaunch(radix_bits=radix_bits, topk_chunk=16)):
            got = run_rep("dot", q, reps, table, seq, bs=16, dev=device, top_k=top_k, sink_blocks=sink,
                          local_blocks=local, shared=False, launch=launch)
            assert torch.equal(got.cpu(), ref), (top_k, sink, local, launch)


def test_nan_and_inf_scores_rank_as_documented(device):
    """+inf is the best score, -inf the worst candidate, NaN after every other candidate."""
    lens = [16 * 8]
    q = torch.ones((1, 1, 16))
    mean = torch.zeros((10, 1, 16))
    table = torch.arange(1, 9, dtype=torch.int32)[None]
    # logical block i -> physical i + 1; scores: block 3 NaN, block 4 +inf, block 5 -inf, block 6 = 1
    mean[4, 0, 0], mean[5, 0, 0], mean[6, 0, 0], mean[7, 0, 0] = float("nan"), float("inf"), float("-inf"), 1.0
    seq = torch.tensor(lens, dtype=torch.int32)
    got = dot_retrieve(q.to(device), mean.to(device), table.to(device), seq.to(device), block_size=16, top_k=7,
                       sink_blocks=1, local_blocks=1)
    # candidates 1..6: +inf (4), 1 (6), then 0-scores 1, 2 in id order, then -inf (5), NaN (3)
    assert got.cpu().tolist() == [[[0, 1, 2, 4, 5, 6, 7]]]
    got = dot_retrieve(q.to(device), mean.to(device), table.to(device), seq.to(device), block_size=16, top_k=6,
                       sink_blocks=1, local_blocks=1)
    assert got.cpu().tolist() == [[[0, 1, 2, 4, 6, 7]]]


# ------------------------------------------------------------------ edge cases, workspace, guard


def test_edge_cases_one_block_partial_block_and_top_k_beyond_the_table(device):
    lens = [5, 16, 17]
    q, codes, w, table, seq, ref_scores = hash_case(lens=lens, hkv=1, group=2, d=32, bs=16, bits=32, seed=11)
    for top_k in (1, 2, 3, 50):
        got = hash_retrieve(q.to(device), codes.to(device), w.to(device), table.to(device), seq.to(device),
                            top_k=top_k, sink_blocks=0, local_blocks=1, validate=False)
        ref = ref_selection(ref_scores, lens, 16, top_k=top_k, sink=0, local=1, shared=True, scoring="hamming")
        assert torch.equal(got.cpu(), ref), (top_k, got, ref)
    assert got.shape == (3, 1, 50) and bool((got[:, :, 2:] == -1).all())


def test_workspace_is_reused_and_left_clean(device):
    ws = RetrievalWorkspace(device)
    for lens, hkv, shared in (([150, 37], 2, True), ([40, 300, 9], 2, False), ([150, 37], 2, True)):
        q, codes, w, table, seq, ref_scores = hash_case(lens=lens, hkv=hkv, group=2, d=32, bs=16, bits=32,
                                                        seed=len(lens))
        got = hash_retrieve(q.to(device), codes.to(device), w.to(device), table.to(device), seq.to(device),
                            top_k=5, sink_blocks=1, local_blocks=1, shared=shared, workspace=ws)
        ref = ref_selection(ref_scores, lens, 16, top_k=5, sink=1, local=1, shared=shared, scoring="hamming")
        assert torch.equal(got.cpu(), ref)
        assert int(ws.counters.abs().sum()) == 0, "the last program of each row must re-zero its counter"


def test_bad_block_ids_are_not_read_and_flagged(device):
    lens = [150, 150]
    q, codes, w, table, seq, ref_scores = hash_case(lens=lens, hkv=2, group=2, d=32, bs=16, bits=32, seed=5)
    clean = hash_retrieve(q.to(device), codes.to(device), w.to(device), table.to(device), seq.to(device),
                          top_k=4, sink_blocks=1, local_blocks=1, shared=False)
    bad_table = table.clone()
    bad_table[1, 0] = codes.shape[0]  # one past the pool
    bad_table[1, 1] = -7
    guard = IndexGuard(device)
    got = hash_retrieve(q.to(device), codes.to(device), w.to(device), bad_table.to(device), seq.to(device),
                        top_k=4, sink_blocks=1, local_blocks=1, shared=False, validate=False, guard=guard)
    assert torch.equal(got[0], clean[0]), "rows without bad ids are unchanged"
    assert got[1, :, 0].tolist() == [0, 0], "a bad block is never scored, but forced blocks stay forced"
    assert 1 not in got[1].tolist()[0], "a bad candidate block is never chosen over good ones"
    with pytest.raises(IndexOutOfRangeError, match="retrieval: a block_table entry"):
        guard.check("decode step")
    guard.check("next step")  # check() resets the flag
    bad_seq = torch.tensor([150, 10**6], dtype=torch.int32)
    hash_retrieve(q.to(device), codes.to(device), w.to(device), table.to(device), bad_seq.to(device),
                  top_k=4, sink_blocks=1, local_blocks=1, validate=False, guard=guard)
    with pytest.raises(IndexOutOfRangeError, match="retrieval: a seq_lens entry"):
        guard.check("decode step")
    with pytest.raises(ValueError, match=r"block_table\[1\] holds physical block ids"):
        hash_retrieve(q.to(device), codes.to(device), w.to(device), bad_table.to(device), seq.to(device),
                      top_k=4, sink_blocks=1, local_blocks=1)


def test_bad_arguments_are_refused_by_name(device):
    lens = [40]
    q, codes, w, table, seq, _ = hash_case(lens=lens, hkv=2, group=2, d=32, bs=16, bits=32, seed=1)
    q, codes, w, table, seq = (t.to(device) for t in (q, codes, w, table, seq))
    kw = dict(top_k=4, sink_blocks=1, local_blocks=1)
    with pytest.raises(ValueError, match=r"top_k \(2\) must be >= sink_blocks \+ local_blocks"):
        hash_retrieve(q, codes, w, table, seq, top_k=2, sink_blocks=2, local_blocks=1)
    with pytest.raises(ValueError, match="q head_dim must be a multiple of 16"):
        hash_retrieve(q[..., :24].contiguous(), codes, w[:24], table, seq, **kw)
    with pytest.raises(ValueError, match=r"q heads \(3\) must be a positive multiple of the KV heads \(2\)"):
        hash_retrieve(q[:, :3].contiguous(), codes, w, table, seq, **kw)
    with pytest.raises(ValueError, match=r"hash_codes must hold 1 to 128 bytes \(8 to 1024 bits\) per token"):
        hash_retrieve(q, torch.zeros(3, 2, 16, 129, dtype=torch.uint8, device=device), w, table, seq, **kw)
    with pytest.raises(ValueError, match="hash_codes block_size must be a power of two"):
        hash_retrieve(q, codes[:, :, :12].contiguous(), w, table, seq, **kw)
    with pytest.raises(TypeError, match="block_table must have dtype"):
        hash_retrieve(q, codes, w, table.long(), seq, **kw)
    with pytest.raises(TypeError, match="shared must be a bool"):
        hash_retrieve(q, codes, w, table, seq, shared=1, **kw)
    with pytest.raises(TypeError, match="workspace must be a RetrievalWorkspace"):
        hash_retrieve(q, codes, w, table, seq, workspace=object(), **kw)
    with pytest.raises(ValueError, match="quest_group must be"):
        quest_retrieve(q, torch.zeros(3, 2, 32, device=device), torch.zeros(3, 2, 32, device=device), table, seq,
                       block_size=16, quest_group="max", **kw)
    with pytest.raises(ValueError, match="RetrievalLaunch.radix_bits must be in"):
        RetrievalLaunch(radix_bits=9)


# ------------------------------------------------------------------ GPU tier


@pytest.mark.gpu
@pytest.mark.parametrize("bs", [16, 128])
def test_gpu_fused_retrieval_real_shapes_and_graph_replay(bs):
    """32K context, GQA 32/8, d 128, 128-bit codes, bf16 q: hash and Quest vs the reference, then the
    same call captured in a CUDA graph and replayed on new inputs."""
    dev = torch.device("cuda")
    lens = [32768, 20000]
    q, codes, w, table, seq, ref_scores = hash_case(lens=lens, hkv=8, group=4, d=128, bs=bs, bits=128, seed=bs)
    top_k = (32768 // bs) // 8
    ref = ref_selection(ref_scores, lens, bs, top_k=top_k, sink=1, local=2, shared=True, scoring="hamming")
    args = [t.to(dev) for t in (q, codes, w, table, seq)]
    ws = RetrievalWorkspace(dev)
    got = hash_retrieve(*args, top_k=top_k, sink_blocks=1, local_blocks=2, workspace=ws, validate=False)
    assert torch.equal(got.cpu(), ref)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        replay_out = hash_retrieve(*args, top_k=top_k, sink_blocks=1, local_blocks=2, workspace=ws, validate=False)
    args[0].neg_()  # new query in place (every hash bit flips), replay
    g.replay()
    torch.cuda.synchronize()
    scores2 = hamming_scores(-q, rp.HashEncoder.from_weights(w), gather(codes, table, lens, bs),
                             rp.block_lens_from_seq_lens(torch.tensor(lens), table.shape[1], bs))
    ref2 = ref_selection(scores2, lens, bs, top_k=top_k, sink=1, local=2, shared=True, scoring="hamming")
    assert not torch.equal(ref2, ref)
    assert torch.equal(replay_out.cpu(), ref2)
    for mode in ("quest", "dot"):
        qr, reps, table_r, seq_r, ref_r = rep_case(lens=lens, hkv=8, group=4, d=128, bs=bs, seed=2, mode=mode)
        got = run_rep(mode, qr.to(torch.bfloat16), tuple(r.to(torch.bfloat16) for r in reps), table_r, seq_r,
                      bs=bs, dev=dev, top_k=top_k, sink_blocks=1, local_blocks=2, shared=True, workspace=ws)
        ref = ref_selection(ref_r, lens, bs, top_k=top_k, sink=1, local=2, shared=True, scoring=mode)
        assert torch.equal(got.cpu(), ref), mode
