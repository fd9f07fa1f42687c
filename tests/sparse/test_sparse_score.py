"""Block scoring against explicit loops."""

from __future__ import annotations

import pytest
import torch

from ucm_trt.sparse.representations import (
    HashEncoder,
    SubBlockRepr,
    block_hash_codes,
    block_lens_from_seq_lens,
    block_minmax,
    block_subblock,
    kvstar_channels,
    unpack_bits,
)
from ucm_trt.sparse.score import (
    dot_scores,
    group_mean_query,
    hamming_distances,
    hamming_scores,
    kvstar_vote_scores,
    popcount_u8,
    quest_scores,
    reduce_scores,
)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _blocks(seed, b, nb, hkv, bs, d, seq_lens):
    g = _gen(seed)
    kb = torch.randn(b, nb, hkv, bs, d, generator=g)
    lens = block_lens_from_seq_lens(torch.tensor(seq_lens), nb, bs)
    kb = torch.where((torch.arange(bs) < lens[..., None])[:, :, None, :, None], kb, float("nan"))
    return kb, lens


GQA = [(4, 4, 64), (8, 2, 64), (16, 2, 128), (8, 1, 128)]  # group sizes 1, 4, 8, 8


def _assert_within_fp32_dot_bound(got, q, reprs, grp) -> None:
    """``got[i, h, n]`` against the exact score, summed in float64 by explicit loops over the very inputs
    given (so fp16 inputs are taken as rounded). Bound: float32 work with unit roundoff u = 2**-24 on
    a group mean of ``grp`` terms then a D-term dot product errs by at most about (grp + D + 2) * u *
    sum_d |mean q_d| * |r_d| (Higham, Accuracy and Stability of Numerical Algorithms, 3.1); the
    factor 2 leaves room for the bound's second-order terms."""
    d = q.shape[-1]
    qd, rd = q.double(), reprs.double()
    for i in range(got.shape[0]):
        for h in range(got.shape[1]):
            qg = sum(qd[i, hh] for hh in range(h * grp, (h + 1) * grp)) / grp
            qabs = sum(qd[i, hh].abs() for hh in range(h * grp, (h + 1) * grp)) / grp
            for n in range(got.shape[2]):
                want = float((qg * rd[i, n, h]).sum())
                bound = 2 * (grp + d + 2) * 2.0**-24 * float((qabs * rd[i, n, h].abs()).sum())
                err = abs(float(got[i, h, n]) - want)
                assert err <= bound, f"[{i},{h},{n}] got {float(got[i, h, n])}, exact {want}, |err| {err} > {bound}"


@pytest.mark.parametrize(("hq", "hkv", "d"), GQA)
def test_group_mean_and_dot_match_loops(hq, hkv, d) -> None:
    g = _gen(1)
    b, nb = 2, 5
    q = torch.randn(b, hq, d, generator=g)
    reprs = torch.randn(b, nb, hkv, d, generator=g)
    grp = hq // hkv
    qg = group_mean_query(q, hkv)
    for i in range(b):
        for h in range(hkv):
            torch.testing.assert_close(qg[i, h], q[i, h * grp : (h + 1) * grp].mean(0))
    got = dot_scores(q, reprs)
    assert got.shape == (b, hkv, nb) and got.dtype == torch.float32
    _assert_within_fp32_dot_bound(got, q, reprs, grp)
    # unbatched representations are shared by the batch
    torch.testing.assert_close(dot_scores(q, reprs[0]), dot_scores(q, reprs[0:1].expand(b, -1, -1, -1)))
    # half-precision input is upcast: the scores are those of the fp16-rounded inputs, to fp32 accuracy
    _assert_within_fp32_dot_bound(dot_scores(q.half(), reprs.half()), q.half(), reprs.half(), grp)
    # shared reduction = ESA's flattened dot product
    flat = torch.einsum("bf,bnf->bn", qg.reshape(b, -1), reprs.reshape(b, nb, -1))
    torch.testing.assert_close(reduce_scores(got, "dot")[:, 0], flat, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(("hq", "hkv", "d"), GQA)
def test_quest_matches_loop_and_bounds_every_token(hq, hkv, d) -> None:
    b, nb, bs = 2, 4, 8
    kb, lens = _blocks(2, b, nb, hkv, bs, d, [29, 9])
    q = torch.randn(b, hq, d, generator=_gen(3))
    kmin, kmax = block_minmax(kb, lens)
    grp = hq // hkv
    s_sum = quest_scores(q, kmin, kmax)
    s_mean = quest_scores(q, kmin, kmax, group="mean_query")
    qg = group_mean_query(q, hkv)
    for i in range(b):
        for h in range(hkv):
            for n in range(nb):
                ub = sum(
                    float(torch.maximum(q[i, hh] * kmin[i, n, h], q[i, hh] * kmax[i, n, h]).sum())
                    for hh in range(h * grp, (h + 1) * grp)
                )
                ubm = float(torch.maximum(qg[i, h] * kmin[i, n, h], qg[i, h] * kmax[i, n, h]).sum())
                assert abs(float(s_sum[i, h, n]) - ub) < 1e-3 * (1 + abs(ub))
                assert abs(float(s_mean[i, h, n]) - ubm) < 1e-3 * (1 + abs(ubm))
                cnt = int(lens[i, n])
                if cnt == 0:
                    continue
                toks = kb[i, n, h, :cnt]
                true_sum = (toks @ q[i, h * grp : (h + 1) * grp].T).sum(-1).max()
                true_mean = (toks @ qg[i, h]).max()
                assert float(s_sum[i, h, n]) >= float(true_sum) - 1e-4
                assert float(s_mean[i, h, n]) >= float(true_mean) - 1e-4
                # per query head, the bound holds for every single head too
                for hh in range(h * grp, (h + 1) * grp):
                    one = float(torch.maximum(q[i, hh] * kmin[i, n, h], q[i, hh] * kmax[i, n, h]).sum())
                    assert one >= float((toks @ q[i, hh]).max()) - 1e-4


@pytest.mark.parametrize(("hq", "hkv", "d"), [(8, 2, 64), (4, 4, 128)])
def test_hamming_matches_loop(hq, hkv, d) -> None:
    b, nb, bs = 2, 4, 4
    kb, lens = _blocks(4, b, nb, hkv, bs, d, [14, 4])
    enc = HashEncoder.random(d, d, seed=5)
    codes = block_hash_codes(kb, lens, enc)
    q = torch.randn(b, hq, d, generator=_gen(6))
    qc = enc.encode(group_mean_query(q, hkv))
    dist = hamming_distances(qc, codes, lens)
    for i in range(b):
        for h in range(hkv):
            qbits = unpack_bits(qc[i, h])
            for n in range(nb):
                cnt = int(lens[i, n])
                if cnt == 0:
                    assert dist[i, h, n] == float("inf")
                    continue
                per_tok = [int((qbits ^ unpack_bits(codes[i, n, h, t])).sum()) for t in range(cnt)]
                assert float(dist[i, h, n]) == min(per_tok)
    s = hamming_scores(q, enc, codes, lens)
    assert torch.equal(s, -dist)
    shared = reduce_scores(s, "hamming")
    assert torch.equal(shared[:, 0], -dist.amin(1))
    # unbatched codes are shared by the batch
    d0 = hamming_distances(qc, codes[0], lens[0])
    assert torch.equal(d0[0], dist[0])


def _kvstar_loop(q, sub: SubBlockRepr, block_mask, query_mask):
    b, hq, tv, d = q.shape
    _, nb, m, hkv, dp = sub.values.shape
    grp = hq // hkv
    out = torch.zeros(b, hkv, nb, dtype=torch.float64)
    for i in range(b):
        for hh in range(hq):
            h = hh // grp
            ch = sub.channels[i, h]
            for x in range(tv):
                if query_mask is not None and not bool(query_mask[i, x]):
                    continue
                pos = [(n, s) for n in range(nb) for s in range(m)
                       if bool(block_mask[i, n]) and int(sub.counts[i, n, s]) > 0]
                if not pos:
                    continue
                logits = torch.tensor([float(q[i, hh, x, ch].double() @ sub.values[i, n, s, h].double()) for n, s in pos],
                                      dtype=torch.float64)
                p = torch.softmax(logits, 0)
                for (n, _), w in zip(pos, p.tolist(), strict=True):
                    out[i, h, n] += w
    return out.float()


@pytest.mark.parametrize(("hq", "hkv"), [(4, 4), (8, 2)])
def test_kvstar_vote_matches_loop(hq, hkv) -> None:
    b, nb, bs, d, tv = 2, 5, 8, 16, 3
    kb, lens = _blocks(7, b, nb, hkv, bs, d, [37, 9])
    ch = kvstar_channels(kb, lens, 4)
    sub = block_subblock(kb, lens, ch, 2)
    q = torch.randn(b, hq, tv, d, generator=_gen(8))
    bm = torch.tensor([[False, True, True, True, False], [True, True, False, False, False]])
    qm = torch.tensor([[True, False, True], [True, True, True]])
    got = kvstar_vote_scores(q, sub, block_mask=bm, query_mask=qm)
    torch.testing.assert_close(got, _kvstar_loop(q, sub, bm, qm), rtol=1e-4, atol=1e-5)
    # mass conservation: each voting (query, head) spreads exactly 1 over the allowed blocks
    grp = hq // hkv
    torch.testing.assert_close(got.sum(-1), (qm.sum(-1, keepdim=True) * grp).float().expand(b, hkv))
    assert float(got[~bm[:, None, :].expand_as(got)].abs().max()) == 0.0
    # default masks: every block and query
    full = kvstar_vote_scores(q, sub)
    torch.testing.assert_close(full, _kvstar_loop(q, sub, torch.ones(b, nb, dtype=torch.bool), None),
                               rtol=1e-4, atol=1e-5)
    # the empty block (index 2 of sequence 1 has no tokens) gets nothing
    assert float(full[1, :, 2].abs().max()) == 0.0
    torch.testing.assert_close(reduce_scores(full, "kvstar_vote")[:, 0], full.sum(1))


def test_reduce_scores_quest_is_sum() -> None:
    s = torch.randn(2, 3, 5, generator=_gen(9))
    torch.testing.assert_close(reduce_scores(s, "quest"), s.sum(1, keepdim=True))


# ---------------------------------------------------------------------------------------------
# bad input

Q = torch.zeros(2, 8, 16)
R = torch.zeros(2, 5, 2, 16)
ENC = HashEncoder.random(16, 16, seed=0)
KC = torch.zeros(2, 5, 2, 4, 2, dtype=torch.uint8)
QC = torch.zeros(2, 2, 2, dtype=torch.uint8)
LENS = torch.full((2, 5), 4, dtype=torch.int32)
SUB = block_subblock(torch.zeros(2, 5, 2, 4, 16), LENS, torch.tensor([[0, 5, 10, 15], [1, 2, 3, 12]]), 2)


@pytest.mark.parametrize(
    ("call", "exc", "match"),
    [
        (lambda: group_mean_query(torch.zeros(6, 16), 4), ValueError, "heads"),
        (lambda: group_mean_query(torch.zeros(16), 4), ValueError, "q"),
        (lambda: group_mean_query(Q, 2.0), TypeError, "num_kv_heads"),
        (lambda: dot_scores(Q[0], R), ValueError, "q"),
        (lambda: dot_scores(Q.long(), R), TypeError, "q"),
        (lambda: dot_scores(Q, R[..., :8]), ValueError, "reprs"),
        (lambda: dot_scores(Q, torch.zeros(3, 5, 2, 16)), ValueError, "reprs"),
        (lambda: dot_scores(Q, torch.zeros(2, 5, 3, 16)), ValueError, "heads"),
        (lambda: quest_scores(Q, R, R[:, :4]), ValueError, "kmin and kmax"),
        (lambda: quest_scores(Q, R, R, group="max"), ValueError, "group"),
        (lambda: quest_scores(Q, R.int(), R), TypeError, "kmin"),
        (lambda: hamming_distances(QC.float(), KC, LENS), TypeError, "q_codes"),
        (lambda: hamming_distances(QC, KC[..., :1], LENS), ValueError, "k_codes"),
        (lambda: hamming_distances(QC, KC, LENS[:, :3]), ValueError, "block_lens"),
        (lambda: hamming_distances(QC, KC, LENS + 1), ValueError, "block_lens"),
        (lambda: hamming_distances(QC, KC, LENS.float()), TypeError, "block_lens"),
        (lambda: hamming_scores(Q, "enc", KC, LENS), TypeError, "encoder"),
        (lambda: hamming_scores(Q, HashEncoder.random(8, 16, seed=0), KC, LENS), ValueError, "encoder.dim"),
        (lambda: hamming_scores(Q, ENC, KC[0, 0], LENS), ValueError, "k_codes"),
        (lambda: kvstar_vote_scores(Q, SUB), ValueError, "q"),
        (lambda: kvstar_vote_scores(Q[:, :, None], "sub"), TypeError, "sub"),
        (lambda: kvstar_vote_scores(torch.zeros(2, 3, 1, 16), SUB), ValueError, "heads"),
        (lambda: kvstar_vote_scores(Q[:, :, None], SUB, block_mask=torch.ones(2, 4, dtype=torch.bool)),
         ValueError, "block_mask"),
        (lambda: kvstar_vote_scores(Q[:, :, None], SUB, block_mask=torch.ones(2, 5)), TypeError, "block_mask"),
        (lambda: kvstar_vote_scores(Q[:, :, None], SUB, query_mask=torch.ones(2, 2, dtype=torch.bool)),
         ValueError, "query_mask"),
        (lambda: kvstar_vote_scores(Q[:, :, None, :8], SUB), ValueError, "channels"),
        (lambda: reduce_scores(R, "dot"), ValueError, "scores"),
        (lambda: popcount_u8(torch.zeros(3, dtype=torch.int32)), TypeError, "x"),
        (lambda: dot_scores(Q, R.to("meta")), ValueError, "device|one device"),
        (lambda: hamming_distances(QC, KC.to("meta"), LENS), ValueError, "one device"),
        (lambda: reduce_scores(R[0], "cosine"), ValueError, "scoring"),
    ],
)
def test_bad_input(call, exc, match) -> None:
    with pytest.raises(exc, match=match):
        call()
