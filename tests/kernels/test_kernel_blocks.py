"""KV append + representation update, GPU retrieval (scores, top-k) and delta-RoPE kernels.

References: ucm_trt.sparse.representations (block_mean, block_minmax, block_hash_codes, HashEncoder,
unpack_bits), ucm_trt.sparse.select.select_blocks_by_count (top-k with forced windows) and
ucm_trt.reference.delta_rope. Block scores (Hamming min-over-tokens, dot with the mean, Quest
bound) are recomputed here with small independent torch code, because ucm_trt.sparse.score had
not landed when these tests were written.
"""

from __future__ import annotations

import pytest
import torch

from tests.kernels._kernel_cases import make_paged_case
from ucm_trt import reference as R
from ucm_trt.kernels import (
    append_kv,
    block_topk,
    delta_rope_blocks_,
    dot_block_scores,
    hamming_block_scores,
    hash_retrieve,
    quest_block_scores,
)
from ucm_trt.sparse import representations as rp
from ucm_trt.sparse.select import select_blocks_by_count
from ucm_trt.testing.tolerances import tolerances_for

# ------------------------------------------------------------------ helpers


def _logical_blocks(pool, table, b, nb):
    """K of sequence b's logical blocks: [nb, Hkv, bs, D]."""
    return pool[table[b, :nb].long(), 0]


def _block_lens(n, nb, bs):
    return (n - torch.arange(nb) * bs).clamp(0, bs).to(torch.int32)


# ------------------------------------------------------------------ append


@pytest.mark.parametrize("d,hkv,bs,bits,t,num_new", [
    (64, 2, 16, 32, 1, None),           # decode: one token per sequence
    (128, 1, 16, 64, 21, [21, 3, 0]),   # ragged prefill chunk crossing block boundaries, one seq idle
    (80, 2, 16, 32, 1, None),           # head_dim 80 / 96: next power-of-two tile, masked lanes
    (96, 1, 32, 64, 21, [21, 3, 0]),
])
def test_append_kv_updates_pool_and_reps(d, hkv, bs, bits, t, num_new, device):
    gen = torch.Generator().manual_seed(d + t)
    old = [20, 5, 17]
    news = [t] * 3 if num_new is None else num_new
    final = [o + n for o, n in zip(old, news, strict=True)]
    case = make_paged_case(lens=tuple(final), hkv=hkv, group=1, d=d, bs=bs, tq=1, dtype=torch.float32,
                           device=device, gen=gen, poison=False)
    pool, table = case.kv_pool, case.block_table
    nphys = pool.shape[0]
    k = torch.randn((3, hkv, t, d), generator=gen).to(device)
    v = torch.randn((3, hkv, t, d), generator=gen).to(device)
    enc = rp.HashEncoder.random(d, bits, seed=5)
    w = enc.weight.to(device)
    mean = torch.full((nphys, hkv, d), float("nan"), device=device)
    kmin, kmax = mean.clone(), mean.clone()
    codes = torch.full((nphys, hkv, bs, bits // 8), 77, dtype=torch.uint8, device=device)
    before = pool.clone()
    codes_before = codes.clone()
    nn_t = None if num_new is None else torch.tensor(num_new, dtype=torch.int32, device=device)
    append_kv(pool, table, case.seq_lens, k, v, num_new=nn_t, block_mean=mean, block_min=kmin, block_max=kmax,
              hash_codes=codes, hash_weight=w)

    expect = before.clone()
    touched = set()
    new_slots = []
    for b in range(3):
        for i in range(news[b]):
            p = old[b] + i
            phys = int(table[b, p // bs])
            expect[phys, 0, :, p % bs] = k[b, :, i]
            expect[phys, 1, :, p % bs] = v[b, :, i]
            touched.add((b, p // bs))
            new_slots.append((phys, p % bs))
    assert torch.equal(pool, expect), "pool must hold exactly the new K/V at their slots and nothing else changed"

    touched_phys = sorted({int(table[b, j]) for b, j in touched})
    for b, j in touched:
        phys = int(table[b, j])
        lens = _block_lens(final[b], j + 1, bs)[j:j + 1].to(device)
        kb = pool[phys:phys + 1, 0]
        torch.testing.assert_close(mean[phys], rp.block_mean(kb, lens)[0], **tolerances_for(torch.float32))
        rmin, rmax = rp.block_minmax(kb, lens)
        assert torch.equal(kmin[phys], rmin[0]) and torch.equal(kmax[phys], rmax[0])
    untouched = torch.ones(nphys, dtype=torch.bool)
    untouched[touched_phys] = False
    assert torch.isnan(mean[untouched.to(device)]).all(), "representations of untouched blocks must not be written"

    # hash codes: exactly the new slots change; bits whose projection is ~0 may differ by rounding
    proj = pool[:, 0].float() @ w  # [nphys, Hkv, bs, bits]
    ref_codes = enc.to(device).encode(pool[:, 0].float())
    got_bits = rp.unpack_bits(codes)
    ref_bits = rp.unpack_bits(ref_codes)
    slot_mask = torch.zeros((nphys, bs), dtype=torch.bool, device=device)
    for phys, s in new_slots:
        slot_mask[phys, s] = True
    ambiguous = proj.abs() < 1e-4
    sm = slot_mask[:, None, :, None].expand_as(got_bits)
    assert torch.equal(got_bits[sm & ~ambiguous], ref_bits[sm & ~ambiguous])
    assert torch.equal(codes[~slot_mask[:, None, :, None].expand_as(codes)],
                       codes_before[~slot_mask[:, None, :, None].expand_as(codes)])


def test_append_kv_bad_inputs(device):
    gen = torch.Generator().manual_seed(0)
    case = make_paged_case(lens=(20,), hkv=2, group=1, d=32, bs=16, tq=1, dtype=torch.float32, device=device,
                           gen=gen, poison=False)
    k = torch.randn(1, 2, 1, 32, device=device)
    with pytest.raises(ValueError, match="block_min and block_max"):
        append_kv(case.kv_pool, case.block_table, case.seq_lens, k, k,
                  block_min=torch.zeros(case.kv_pool.shape[0], 2, 32, device=device))
    with pytest.raises(ValueError, match="num_new"):
        append_kv(case.kv_pool, case.block_table, case.seq_lens, k, k,
                  num_new=torch.tensor([2], dtype=torch.int32, device=device))
    with pytest.raises(ValueError, match="k must have size 2 on axis 1"):
        append_kv(case.kv_pool, case.block_table, case.seq_lens, k[:, :1], k)
    with pytest.raises(ValueError, match="hash_codes and hash_weight"):
        append_kv(case.kv_pool, case.block_table, case.seq_lens, k, k,
                  hash_weight=torch.zeros(32, 16, device=device))


def test_append_kv_bad_ids_are_skipped_and_flagged(device):
    """Issue 17: with validate=False a bad table entry or bad lengths write nothing outside the pool."""
    from ucm_trt.kernels.guard import IndexGuard, IndexOutOfRangeError

    gen = torch.Generator().manual_seed(3)
    final = [40, 33, 20]
    case = make_paged_case(lens=tuple(final), hkv=2, group=1, d=32, bs=16, tq=1, dtype=torch.float32,
                           device=device, gen=gen, poison=False)
    pool, table = case.kv_pool, case.block_table
    k = torch.randn((3, 2, 4, 32), generator=gen).to(device)
    bad_table = table.clone()
    bad_table[1, 2] = pool.shape[0] + 5  # sequence 1 appends into logical block 2 (positions 29..32)
    guard = IndexGuard(device)
    before = pool.clone()
    append_kv(pool, bad_table, case.seq_lens, k, k, validate=False, guard=guard)
    expect = before.clone()
    for b, n in enumerate(final):
        for i, p in enumerate(range(n - 4, n)):
            if b == 1 and p // 16 == 2:
                continue  # the block with the bad id is skipped
            phys = int(table[b, p // 16])
            expect[phys, :, :, p % 16] = k[b, :, i]
    assert torch.equal(pool, expect)
    with pytest.raises(IndexOutOfRangeError, match="append_kv: a block_table entry in use is outside"):
        guard.check("decode step")
    for seq_lens, num_new in (([40, 33, 10**6], None), ([40, 3, 20], None), ([40, 33, 20], [4, 5, 4])):
        before = pool.clone()
        nn_t = None if num_new is None else torch.tensor(num_new, dtype=torch.int32, device=device)
        append_kv(pool, table, torch.tensor(seq_lens, dtype=torch.int32, device=device), k, k, num_new=nn_t,
                  validate=False, guard=guard)
        bad_seq = 2 if seq_lens[2] > 20 else 1
        for b in range(3):
            if b != bad_seq:
                continue
            touched = table[b, : (final[b] + 15) // 16].long()
            assert torch.equal(pool[touched], before[touched]), "a sequence with bad lengths is not written"
        with pytest.raises(IndexOutOfRangeError, match="append_kv: num_new / seq_lens out of range"):
            guard.check("decode step")


# ------------------------------------------------------------------ retrieval


def _ref_hamming(q, pool, table, lens, enc, bs):
    """[B, Hkv, max_blocks] min over valid tokens of popcount(code(q_avg) ^ code(k)); +inf past seq_len."""
    b, hq, d = q.shape
    hkv = pool.shape[2]
    qa = q.float().view(b, hkv, hq // hkv, d).mean(2)
    qbits = rp.unpack_bits(enc.encode(qa))  # [B, Hkv, bits]
    out = torch.full((b, hkv, table.shape[1]), float("inf"), device=q.device)
    for i, n in enumerate(lens):
        nb = (n + bs - 1) // bs
        kb = _logical_blocks(pool, table, i, nb)
        kbits = rp.unpack_bits(rp.block_hash_codes(kb, _block_lens(n, nb, bs).to(q.device), enc))
        dist = (kbits != qbits[i][None, :, None, :]).sum(-1).float()  # [nb, Hkv, bs]
        valid = (torch.arange(nb * bs, device=q.device) < n).view(nb, 1, bs)
        out[i, :, :nb] = torch.where(valid, dist, float("inf")).amin(-1).T
    return out, qa @ enc.weight.to(q.device)


def _ref_rep_scores(q, pool, table, lens, bs, quest):
    b, hq, d = q.shape
    hkv = pool.shape[2]
    qa = q.float().view(b, hkv, hq // hkv, d).mean(2)
    out = torch.full((b, hkv, table.shape[1]), float("-inf"), device=q.device)
    for i, n in enumerate(lens):
        nb = (n + bs - 1) // bs
        kb = _logical_blocks(pool, table, i, nb)
        bl = _block_lens(n, nb, bs).to(q.device)
        if quest:
            lo, hi = rp.block_minmax(kb, bl)
            s = torch.maximum(qa[i] * lo, qa[i] * hi).sum(-1)
        else:
            s = (rp.block_mean(kb, bl) * qa[i]).sum(-1)
        out[i, :, :nb] = s.T
    return out


def _retrieval_case(device, d=64, bs=16, lens=(150, 37, 16), hkv=2, group=4, bits=32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    case = make_paged_case(lens=lens, hkv=hkv, group=group, d=d, bs=bs, tq=1, dtype=torch.float32,
                           device=device, gen=gen, poison=False)
    enc = rp.HashEncoder.random(d, bits, seed=seed + 1).to(device)
    codes = rp.block_hash_codes(case.kv_pool[:, 0], torch.full((case.kv_pool.shape[0],), bs, dtype=torch.int32,
                                                                device=device), enc)
    # poison the codes of tokens past seq_len: a kernel reading them would change the scores
    for i, n in enumerate(lens):
        nb = (n + bs - 1) // bs
        codes[int(case.block_table[i, nb - 1]), :, n - (nb - 1) * bs:] = 0
    return case, enc, codes, case.q[:, :, 0]


@pytest.mark.parametrize("d,group", [(64, 4), (128, 8), (64, 1), (96, 4), (80, 2)])
def test_hamming_scores_match_reference(d, group, device):
    case, enc, codes, q = _retrieval_case(device, d=d, group=group, hkv=2 if group < 8 else 1)
    ref, qproj = _ref_hamming(q, case.kv_pool, case.block_table, case.seq_lens.tolist(), enc, 16)
    assert qproj.abs().min() > 1e-4, "test data must not put a query bit on the sign boundary"
    got = hamming_block_scores(q, codes, enc.weight.to(device), case.block_table, case.seq_lens)
    assert torch.equal(got, ref)


@pytest.mark.parametrize("quest,d", [(False, 64), (True, 64), (True, 96), (False, 80)])
def test_dot_and_quest_scores_match_reference(quest, d, device):
    case, enc, codes, q = _retrieval_case(device, d=d, group=4, seed=3)
    nphys = case.kv_pool.shape[0]
    full = torch.full((nphys,), 16, dtype=torch.int32, device=device)
    lens = case.seq_lens.tolist()
    # representations of the pool (last blocks: only their valid tokens)
    bl = full.clone()
    for i, n in enumerate(lens):
        nb = (n + 15) // 16
        bl[int(case.block_table[i, nb - 1])] = n - (nb - 1) * 16
    ref = _ref_rep_scores(q, case.kv_pool, case.block_table, lens, 16, quest)
    if quest:
        lo, hi = rp.block_minmax(case.kv_pool[:, 0], bl)
        got = quest_block_scores(q, lo, hi, case.block_table, case.seq_lens, block_size=16)
    else:
        got = dot_block_scores(q, rp.block_mean(case.kv_pool[:, 0], bl), case.block_table, case.seq_lens,
                               block_size=16)
    torch.testing.assert_close(got, ref, **tolerances_for(torch.float32))


def _ref_topk(scores, lens, bs, top_k, sink, local, largest, shared):
    s = scores if largest else -scores
    nb = torch.tensor([(n + bs - 1) // bs for n in lens], device=scores.device)
    hkv = scores.shape[1]
    if shared:
        s = s.amax(1, keepdim=True)
    forced = torch.stack([
        ((torch.arange(scores.shape[2], device=scores.device) < min(sink, n))
         | ((torch.arange(scores.shape[2], device=scores.device) >= n - local)
            & (torch.arange(scores.shape[2], device=scores.device) < n))).sum()
        for n in nb.tolist()])
    counts = (top_k - forced).clamp(min=0)[:, None]
    s = torch.where(torch.isfinite(s), s, torch.zeros_like(s))  # non-candidates' scores are never read
    return select_blocks_by_count(s, nb, counts, sink_blocks=sink, local_blocks=local,
                                  num_kv_heads=hkv if shared else None, max_selected=top_k)


@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("largest", [True, False])
def test_block_topk_matches_select(shared, largest, device):
    gen = torch.Generator().manual_seed(int(shared) * 2 + int(largest))
    lens = [1000, 300, 32, 20 * 32]
    bs, mb = 32, 36
    # integer scores make many ties: the lower block id must win them, as in ucm_trt.sparse.select;
    # signed random floats exercise every bit of the radix select
    tied = torch.randint(0, 6, (4, 2, mb), generator=gen).float()
    floats = torch.randn((4, 2, mb), generator=gen) * torch.logspace(-3, 3, mb)
    seq = torch.tensor(lens, dtype=torch.int32, device=device)
    for scores in (tied.to(device), floats.to(device)):
        for top_k, sink, local in ((8, 1, 2), (40, 0, 1), (3, 1, 2)):
            got = block_topk(scores, seq, top_k=top_k, block_size=bs, sink_blocks=sink, local_blocks=local,
                             largest=largest, shared=shared)
            ref = _ref_topk(scores, lens, bs, top_k, sink, local, largest, shared)
            assert torch.equal(got, ref), (top_k, sink, local, got, ref)


def test_hash_retrieve_end_to_end(device):
    case, enc, codes, q = _retrieval_case(device, d=64, group=4, seed=9, lens=(300, 100))
    lens = case.seq_lens.tolist()
    ref_scores, _ = _ref_hamming(q, case.kv_pool, case.block_table, lens, enc, 16)
    for shared in (True, False):
        got = hash_retrieve(q, codes, enc.weight.to(device), case.block_table, case.seq_lens, top_k=6,
                            sink_blocks=1, local_blocks=2, shared=shared)
        ref = _ref_topk(ref_scores, lens, 16, 6, 1, 2, False, shared)
        assert torch.equal(got, ref)
    with pytest.raises(ValueError, match="top_k"):
        hash_retrieve(q, codes, enc.weight.to(device), case.block_table, case.seq_lens, top_k=2,
                      sink_blocks=1, local_blocks=2)


# ------------------------------------------------------------------ delta-RoPE


@pytest.mark.parametrize("d,dtype", [(64, torch.float32), (128, torch.float32), (64, torch.bfloat16),
                                     (80, torch.float32), (96, torch.bfloat16)])
def test_delta_rope_blocks(d, dtype, device):
    gen = torch.Generator().manual_seed(d)
    pool = torch.randn((9, 2, 2, 16, d), generator=gen).to(dtype).to(device)
    ids = torch.tensor([7, 2, 5], dtype=torch.int32, device=device)
    offs = torch.tensor([3, -40, 131071], dtype=torch.int64, device=device)
    before = pool.clone()
    delta_rope_blocks_(pool, ids, offs, theta=10000.0)
    expect = before.clone()
    for i, o in zip(ids.tolist(), offs.tolist(), strict=True):
        expect[i, 0] = R.delta_rope(before[i, 0], torch.tensor([o], device=device), theta=10000.0).to(dtype)
    torch.testing.assert_close(pool.float(), expect.float(), **tolerances_for(dtype))
    untouched = [i for i in range(9) if i not in ids.tolist()]
    assert torch.equal(pool[untouched], before[untouched]) and torch.equal(pool[:, 1], before[:, 1])
    with pytest.raises(ValueError, match="distinct"):
        delta_rope_blocks_(pool, torch.tensor([1, 1], dtype=torch.int32, device=device),
                           torch.tensor([1, 2], device=device), theta=1e4)
    with pytest.raises(ValueError, match="block_ids must be in"):
        delta_rope_blocks_(pool, torch.tensor([9], dtype=torch.int32, device=device),
                           torch.tensor([1], device=device), theta=1e4)


def test_delta_rope_bad_ids_are_skipped_and_flagged(device):
    from ucm_trt.kernels.guard import IndexGuard, IndexOutOfRangeError

    gen = torch.Generator().manual_seed(0)
    pool = torch.randn((5, 2, 2, 16, 32), generator=gen).to(device)
    before = pool.clone()
    guard = IndexGuard(device)
    delta_rope_blocks_(pool, torch.tensor([2, 5, -1], dtype=torch.int32, device=device),
                       torch.tensor([7, 7, 7], device=device), theta=1e4, validate=False, guard=guard)
    expect = before.clone()
    expect[2, 0] = R.delta_rope(before[2, 0], torch.tensor([7], device=device), theta=1e4)
    torch.testing.assert_close(pool, expect, **tolerances_for(torch.float32))
    assert torch.equal(pool[[0, 1, 3, 4]], before[[0, 1, 3, 4]]), "the bad ids touch nothing"
    with pytest.raises(IndexOutOfRangeError, match="delta_rope_blocks_: a block_ids entry is outside the pool"):
        guard.check("blend")


# ------------------------------------------------------------------ GPU tier


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_append_and_retrieval(dtype):
    dev = torch.device("cuda")
    gen = torch.Generator().manual_seed(1)
    bs, d, hkv, bits = 128, 128, 8, 128
    old = [20000, 4095, 131]
    t = 200
    final = [n + t for n in old]
    case = make_paged_case(lens=tuple(final), hkv=hkv, group=4, d=d, bs=bs, tq=1, dtype=dtype, device=dev,
                           gen=gen, poison=False)
    nphys = case.kv_pool.shape[0]
    enc = rp.HashEncoder.random(d, bits, seed=2).to(dev)
    k = torch.randn((3, hkv, t, d), generator=gen).to(dtype).to(dev)
    v = torch.randn((3, hkv, t, d), generator=gen).to(dtype).to(dev)
    mean = torch.full((nphys, hkv, d), float("nan"), device=dev)
    kmin, kmax = mean.clone(), mean.clone()
    codes = torch.zeros((nphys, hkv, bs, bits // 8), dtype=torch.uint8, device=dev)
    append_kv(case.kv_pool, case.block_table, case.seq_lens, k, v, block_mean=mean, block_min=kmin,
              block_max=kmax, hash_codes=codes, hash_weight=enc.weight.to(dev))
    for b in range(3):
        for j in range(old[b] // bs, (final[b] - 1) // bs + 1):
            phys = int(case.block_table[b, j])
            lens = _block_lens(final[b], j + 1, bs)[j:j + 1].to(dev)
            kb = case.kv_pool[phys:phys + 1, 0]
            torch.testing.assert_close(mean[phys], rp.block_mean(kb, lens)[0], rtol=1e-5, atol=1e-5)
            rmin, rmax = rp.block_minmax(kb, lens)
            assert torch.equal(kmin[phys], rmin[0]) and torch.equal(kmax[phys], rmax[0])
        pos = torch.arange(old[b], final[b], device=dev)
        phys = case.block_table[b, (pos // bs).long()].long()
        kk = case.kv_pool[phys, 0, :, pos % bs].float()  # [t, Hkv, D]
        proj = kk @ enc.weight.to(dev)
        ok = proj.abs() > 1e-3
        got_bits = rp.unpack_bits(codes[phys, :, pos % bs])
        assert torch.equal(got_bits[ok], (proj > 0)[ok])
    # retrieval on the codes of the whole pool (written with the reference encoder)
    full = rp.block_hash_codes(case.kv_pool[:, 0], torch.full((nphys,), bs, dtype=torch.int32, device=dev), enc)
    q = case.q[:, :, 0]
    ref, _ = _ref_hamming(q, case.kv_pool, case.block_table, final, enc, bs)
    got = hamming_block_scores(q, full, enc.weight.to(dev), case.block_table, case.seq_lens)
    # an ambiguous query bit (|q_avg . w| tiny) could flip in fp32; compare where the query code agrees
    assert (got == ref).float().mean() > 0.99
    sel = block_topk(ref, case.seq_lens, top_k=24, block_size=bs, sink_blocks=1, local_blocks=2, largest=False,
                     shared=True)
    assert torch.equal(sel, _ref_topk(ref, final, bs, 24, 1, 2, False, True))
