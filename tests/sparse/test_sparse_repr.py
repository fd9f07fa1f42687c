"""Block representations against straightforward loop references; hash encoder; incremental state."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ucm_trt.config import KVStarConfig
from ucm_trt.sparse.representations import (
    BlockReprState,
    HashEncoder,
    attention_token_weights,
    block_first,
    block_hash_codes,
    block_lens_from_seq_lens,
    block_mean,
    block_minmax,
    block_subblock,
    block_weighted_mean,
    kvstar_channels,
    kvstar_subblock,
    pack_bits,
    tokens_to_blocks,
    unpack_bits,
)
from ucm_trt.sparse.score import popcount_u8


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _pool_blocks(seed: int, *, b: int, nb: int, hkv: int, bs: int, d: int, seq_lens: list[int],
                 dtype: torch.dtype = torch.float32):
    """K blocks gathered from a paged pool with permuted physical ids; invalid tokens hold NaN."""
    g = _gen(seed)
    num_phys = b * nb + 3
    pool = torch.randn(num_phys, 2, hkv, bs, d, generator=g).to(dtype)
    perm = torch.randperm(num_phys, generator=g)[: b * nb].reshape(b, nb).to(torch.int32)
    lens = block_lens_from_seq_lens(torch.tensor(seq_lens, dtype=torch.int32), nb, bs)
    kb = pool[perm.long(), 0].clone()  # [B, nb, Hkv, bs, D]
    tok = torch.arange(bs)
    kb[~(tok < lens[..., None])[:, :, None, :, None].expand_as(kb)] = float("nan")
    return kb, lens


CASES = [
    dict(b=2, nb=5, hkv=2, bs=8, d=16, seq_lens=[37, 8]),  # partial last block, empty blocks
    dict(b=1, nb=1, hkv=1, bs=4, d=8, seq_lens=[3]),  # one block, partial
    dict(b=3, nb=3, hkv=4, bs=16, d=64, seq_lens=[48, 1, 17]),  # full, single-token
]


def _loop_reprs(kb: torch.Tensor, lens: torch.Tensor):
    b, nb, h, bs, d = kb.shape
    mean = torch.zeros(b, nb, h, d)
    mn = torch.zeros(b, nb, h, d)
    mx = torch.zeros(b, nb, h, d)
    first = torch.zeros(b, nb, h, d)
    for i in range(b):
        for j in range(nb):
            n = int(lens[i, j])
            for hh in range(h):
                if n == 0:
                    continue
                toks = kb[i, j, hh, :n].double()
                mean[i, j, hh] = toks.mean(0).float()
                mn[i, j, hh] = toks.min(0).values.float()
                mx[i, j, hh] = toks.max(0).values.float()
                first[i, j, hh] = toks[0].float()
    return mean, mn, mx, first


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_dense_reprs_match_loops(case, dtype) -> None:
    kb, lens = _pool_blocks(1, dtype=dtype, **case)
    mean, mn, mx, first = _loop_reprs(kb.float(), lens)
    tol = dict(rtol=1e-5, atol=1e-5)
    got_mean = block_mean(kb, lens)
    assert got_mean.dtype == torch.float32
    torch.testing.assert_close(got_mean, mean, **tol)
    gmn, gmx = block_minmax(kb, lens)
    torch.testing.assert_close(gmn, mn, **tol)
    torch.testing.assert_close(gmx, mx, **tol)
    torch.testing.assert_close(block_first(kb, lens), first, **tol)
    assert torch.isfinite(got_mean).all() and torch.isfinite(gmn).all()


@pytest.mark.parametrize("case", CASES)
def test_weighted_mean_matches_loop(case) -> None:
    kb, lens = _pool_blocks(2, **case)
    b, nb, h, bs, d = kb.shape
    w = torch.rand(b, nb, h, bs, generator=_gen(3))
    w[..., 0] = 0.0  # a zero weight inside the block
    w_shared = torch.rand(b, nb, bs, generator=_gen(4))
    for weights in (w, w_shared):
        want = torch.zeros(b, nb, h, d)
        for i in range(b):
            for j in range(nb):
                n = int(lens[i, j])
                for hh in range(h):
                    ww = weights[i, j, hh, :n] if weights.dim() == 4 else weights[i, j, :n]
                    if n == 0 or float(ww.sum()) == 0:
                        continue
                    want[i, j, hh] = (ww[:, None].double() * kb[i, j, hh, :n].double()).sum(0).float() / float(
                        ww.double().sum()
                    )
        torch.testing.assert_close(block_weighted_mean(kb, lens, weights), want, rtol=1e-5, atol=1e-5)
    # uniform weights give the plain mean
    torch.testing.assert_close(block_weighted_mean(kb, lens, torch.ones(b, nb, bs)), block_mean(kb, lens))


def test_attention_token_weights_matches_loop() -> None:
    g = _gen(5)
    b, hq, hkv, to, t, d = 2, 4, 2, 3, 11, 8
    q = torch.randn(b, hq, to, d, generator=g)
    k = torch.randn(b, hkv, t, d, generator=g)
    got = attention_token_weights(q, k)
    want = torch.zeros(b, hkv, t)
    for i in range(b):
        for h in range(hq):
            for x in range(to):
                pos = t - to + x
                logits = torch.tensor([float(q[i, h, x] @ k[i, h // 2, j]) / math.sqrt(d) for j in range(pos + 1)])
                want[i, h // 2, : pos + 1] += torch.softmax(logits, 0)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.sum(-1), torch.full((b, hkv), float(to * hq // hkv)))


def test_tokens_to_blocks_roundtrip() -> None:
    x = torch.randn(2, 3, 21, 4, generator=_gen(6))
    blocks, lens = tokens_to_blocks(x, 8)
    assert blocks.shape == (2, 3, 3, 8, 4) and lens.tolist() == [[8, 8, 5]] * 2
    back = blocks.movedim(-4, -3).reshape(2, 3, 24, 4)[:, :, :21]
    assert torch.equal(back, x)
    assert torch.equal(blocks[:, 2, :, 5:], torch.zeros(2, 3, 3, 4))
    assert block_lens_from_seq_lens(torch.tensor([0, 5, 8, 9]), 2, 8).tolist() == [[0, 0], [5, 0], [8, 0], [8, 1]]


# ---------------------------------------------------------------------------------------------
# hash codes


def test_pack_bits_little_endian() -> None:
    bits = torch.zeros(16, dtype=torch.bool)
    bits[0] = True  # byte 0, weight 1
    bits[3] = True  # byte 0, weight 8
    bits[15] = True  # byte 1, weight 128
    assert pack_bits(bits).tolist() == [9, 128]
    rnd = torch.rand(3, 5, 24, generator=_gen(7)) > 0.5
    assert torch.equal(unpack_bits(pack_bits(rnd)), rnd)
    # explicit: byte b = sum_i bit[8b+i] << i
    codes = pack_bits(rnd)
    manual = sum(rnd[..., i::8].to(torch.int64) << i for i in range(8))
    assert torch.equal(codes.to(torch.int64), manual)


def test_encode_is_sign_of_projection_packed() -> None:
    enc = HashEncoder.random(16, 32, seed=11)
    x = torch.randn(4, 3, 16, generator=_gen(8))
    codes = enc.encode(x)
    assert codes.dtype == torch.uint8 and codes.shape == (4, 3, 4)
    proj = x.double() @ enc.weight.double()
    assert torch.equal(unpack_bits(codes), proj > 0)
    assert enc.bits == 32 and enc.num_bytes == 4 and enc.dim == 16


def test_hamming_popcount_equals_xor_bitcount() -> None:
    a = torch.randint(0, 256, (50, 16), generator=_gen(9), dtype=torch.int64).to(torch.uint8)
    bb = torch.randint(0, 256, (50, 16), generator=_gen(10), dtype=torch.int64).to(torch.uint8)
    got = popcount_u8(a ^ bb).sum(-1, dtype=torch.int32)
    want = [sum(bin(int(x) ^ int(y)).count("1") for x, y in zip(ra, rb, strict=True)) for ra, rb in zip(a.tolist(), bb.tolist(), strict=True)]
    assert got.tolist() == want
    assert popcount_u8(torch.arange(256, dtype=torch.int64).to(torch.uint8)).tolist() == [bin(i).count("1") for i in range(256)]


@pytest.mark.parametrize(("dim", "bits"), [(64, 64), (128, 128), (64, 32), (16, 48)])
def test_random_encoder_orthogonal_seeded(dim, bits) -> None:
    state = torch.get_rng_state()
    e1 = HashEncoder.random(dim, bits, seed=3)
    e2 = HashEncoder.random(dim, bits, seed=3)
    e3 = HashEncoder.random(dim, bits, generator=torch.Generator().manual_seed(3))
    e4 = HashEncoder.random(dim, bits, seed=4)
    assert torch.equal(torch.get_rng_state(), state), "global RNG must not be used"
    assert torch.equal(e1.weight, e2.weight) and torch.equal(e1.weight, e3.weight)
    assert not torch.equal(e1.weight, e4.weight)
    w = e1.weight.double()
    assert w.shape == (dim, bits)
    gram = w.T @ w if bits <= dim else w @ w.T
    torch.testing.assert_close(gram, torch.eye(min(dim, bits), dtype=torch.float64), atol=1e-5, rtol=0)


def test_per_head_encoder_and_block_codes() -> None:
    kb, lens = _pool_blocks(12, b=2, nb=3, hkv=2, bs=4, d=8, seq_lens=[10, 5])
    enc = HashEncoder.random(8, 16, seed=1, num_heads=2)
    codes = block_hash_codes(kb, lens, enc)
    assert codes.shape == (2, 3, 2, 4, 2)
    w = enc.weight
    for i in range(2):
        for j in range(3):
            n = int(lens[i, j])
            for h in range(2):
                for t in range(4):
                    if t < n:
                        want = pack_bits((kb[i, j, h, t].double() @ w[h].double()) > 0)
                    else:
                        want = torch.zeros(2, dtype=torch.uint8)
                    assert torch.equal(codes[i, j, h, t], want)
    shared = HashEncoder.random(8, 16, seed=1)
    sc = block_hash_codes(kb, lens, shared)
    assert torch.equal(sc[0, 0, 1, 2], shared.encode(kb[0, 0, 1, 2]))


def test_encoder_load_save(tmp_path) -> None:
    enc = HashEncoder.random(8, 16, seed=2)
    for name in ("w.pt", "w.safetensors"):
        p = tmp_path / name
        enc.save(p)
        loaded = HashEncoder.load(p)
        assert torch.equal(loaded.weight, enc.weight)
    torch.save({"layer.0": enc.weight, "layer.1": enc.weight * 2}, tmp_path / "multi.pt")
    with pytest.raises(ValueError, match="key"):
        HashEncoder.load(tmp_path / "multi.pt")
    assert torch.equal(HashEncoder.load(tmp_path / "multi.pt", key="layer.1").weight, enc.weight * 2)
    with pytest.raises(ValueError, match="key"):
        HashEncoder.load(tmp_path / "multi.pt", key="layer.9")
    torch.save(enc.weight, tmp_path / "plain.pt")
    assert torch.equal(HashEncoder.load(tmp_path / "plain.pt").weight, enc.weight)
    trained = torch.randn(8, 24, generator=_gen(1))
    assert torch.equal(HashEncoder.from_weights(trained).weight, trained)
    with pytest.raises(AttributeError):
        enc._weight = None  # type: ignore[misc]


# ---------------------------------------------------------------------------------------------
# KVStar


def test_kvstar_channels_and_subblocks_match_loops() -> None:
    kb, lens = _pool_blocks(13, b=2, nb=3, hkv=2, bs=8, d=16, seq_lens=[21, 8])
    cfg = KVStarConfig(channel_ratio=0.25, token_merge=2)
    sub = kvstar_subblock(kb, lens, cfg)
    b, nb, h, bs, d = kb.shape
    dp = round(d * 0.25)
    m = bs // 2
    assert sub.values.shape == (b, nb, m, h, dp) and sub.counts.shape == (b, nb, m)
    for i in range(b):
        for hh in range(h):
            toks = torch.cat([kb[i, j, hh, : int(lens[i, j])] for j in range(nb)])
            mean_abs = toks.abs().double().mean(0)
            want = sorted(sorted(range(d), key=lambda c: (-float(mean_abs[c]), c))[:dp])
            assert sub.channels[i, hh].tolist() == want
        for j in range(nb):
            n = int(lens[i, j])
            for s in range(m):
                toks = list(range(2 * s, min(2 * s + 2, n)))
                assert int(sub.counts[i, j, s]) == len(toks)
                for hh in range(h):
                    ch = sub.channels[i, hh]
                    want = kb[i, j, hh, toks][:, ch].double().mean(0).float() if toks else torch.zeros(dp)
                    torch.testing.assert_close(sub.values[i, j, s, hh], want, rtol=1e-5, atol=1e-6)
    # explicit channels shared across the batch
    ch = torch.tensor([[0, 3], [5, 1]])
    sub2 = block_subblock(kb, lens, ch, 4)
    torch.testing.assert_close(sub2.values[1, 0, 0, 1], kb[1, 0, 1, :4][:, [5, 1]].mean(0))
    assert kvstar_channels(kb, lens, 16).shape == (2, 2, 16)


# ---------------------------------------------------------------------------------------------
# incremental update


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 2**31 - 1), st.lists(st.integers(0, 11), min_size=1, max_size=5), st.booleans())
def test_incremental_equals_recompute(seed, chunks, per_head) -> None:
    g = _gen(seed)
    b, nb, h, bs, d = 2, 6, 2, 4, 8
    enc = HashEncoder.random(d, 16, seed=seed % 1000, num_heads=h if per_head else None)
    state = BlockReprState(batch=b, max_blocks=nb, num_kv_heads=h, block_size=bs, head_dim=d, encoder=enc)
    tokens = [torch.zeros(h, 0, d) for _ in range(b)]
    for tn in chunks:
        new = torch.randn(b, h, tn, d, generator=g)
        num_new = torch.randint(0, tn + 1, (b,), generator=g)
        room = nb * bs - state.seq_lens
        num_new = torch.minimum(num_new, room)
        state.append(new, num_new)
        for i in range(b):
            tokens[i] = torch.cat([tokens[i], new[i, :, : int(num_new[i])]], dim=1)
    seq = torch.tensor([t.shape[1] for t in tokens])
    assert state.seq_lens.tolist() == seq.tolist()
    kb = torch.full((b, nb * bs, h, d), float("nan"))
    for i in range(b):
        kb[i, : seq[i]] = tokens[i].transpose(0, 1)
    kb = kb.reshape(b, nb, bs, h, d).transpose(2, 3)
    lens = block_lens_from_seq_lens(seq, nb, bs)
    assert torch.equal(state.block_lens, lens)
    torch.testing.assert_close(state.mean(), block_mean(kb, lens), rtol=1e-6, atol=1e-6)
    mn, mx = block_minmax(kb, lens)
    smn, smx = state.minmax()
    assert torch.equal(smn, mn) and torch.equal(smx, mx)
    assert torch.equal(state.first(), block_first(kb, lens))
    assert torch.equal(state.codes(), block_hash_codes(kb, lens, enc))
    # from_blocks reproduces the same state, and appending a token equals recomputing with it
    st2 = BlockReprState.from_blocks(torch.nan_to_num(kb), lens, encoder=enc)
    torch.testing.assert_close(st2.mean(), state.mean(), rtol=1e-6, atol=1e-6)
    if int(seq.max()) < nb * bs:
        one = torch.randn(b, h, 1, d, generator=g)
        state.append(one)
        kb2 = kb.transpose(2, 3).reshape(b, nb * bs, h, d).clone()
        for i in range(b):
            kb2[i, seq[i]] = one[i, :, 0]
        kb2 = kb2.reshape(b, nb, bs, h, d).transpose(2, 3)
        lens2 = block_lens_from_seq_lens(seq + 1, nb, bs)
        torch.testing.assert_close(state.mean(), block_mean(kb2, lens2), rtol=1e-6, atol=1e-6)
        assert torch.equal(state.minmax()[1], block_minmax(kb2, lens2)[1])
        assert torch.equal(state.codes(), block_hash_codes(kb2, lens2, enc))


def test_state_capacity_and_no_encoder() -> None:
    st_ = BlockReprState(batch=1, max_blocks=1, num_kv_heads=1, block_size=2, head_dim=4)
    st_.append(torch.zeros(1, 1, 2, 4))
    with pytest.raises(ValueError, match="capacity"):
        st_.append(torch.zeros(1, 1, 1, 4))
    with pytest.raises(ValueError, match="encoder"):
        st_.codes()


# ---------------------------------------------------------------------------------------------
# bad input

KB = torch.zeros(2, 3, 2, 4, 8)
LENS = torch.full((2, 3), 4, dtype=torch.int32)
ENC = HashEncoder.random(8, 8, seed=0)


@pytest.mark.parametrize(
    ("call", "exc", "match"),
    [
        (lambda: block_mean(KB[0, 0], LENS), ValueError, "k_blocks"),
        (lambda: block_mean(KB.long(), LENS), TypeError, "k_blocks"),
        (lambda: block_mean(KB, LENS.float()), TypeError, "block_lens"),
        (lambda: block_mean(KB, LENS[0]), ValueError, "block_lens"),
        (lambda: block_mean(KB, LENS + 1), ValueError, "block_lens"),
        (lambda: block_minmax(KB, -LENS), ValueError, "block_lens"),
        (lambda: block_first("x", LENS), TypeError, "k_blocks"),
        (lambda: block_weighted_mean(KB, LENS, torch.ones(2, 3, 5)), ValueError, "weights"),
        (lambda: block_weighted_mean(KB, LENS, -torch.ones(2, 3, 4)), ValueError, "weights"),
        (lambda: block_weighted_mean(KB, LENS, torch.ones(2, 3, 4, dtype=torch.int32)), TypeError, "weights"),
        (lambda: attention_token_weights(torch.zeros(1, 3, 1, 8), torch.zeros(1, 2, 4, 8)), ValueError, "heads"),
        (lambda: attention_token_weights(torch.zeros(1, 2, 5, 8), torch.zeros(1, 2, 4, 8)), ValueError, "q"),
        (lambda: attention_token_weights(torch.zeros(2, 8), torch.zeros(1, 2, 4, 8)), ValueError, "q"),
        (lambda: tokens_to_blocks(torch.zeros(4, 8), 4), ValueError, "x"),
        (lambda: tokens_to_blocks(torch.zeros(1, 4, 8), 0), ValueError, "block_size"),
        (lambda: block_lens_from_seq_lens(torch.tensor([9]), 2, 4), ValueError, "seq_lens"),
        (lambda: pack_bits(torch.ones(7, dtype=torch.bool)), ValueError, "bits"),
        (lambda: pack_bits(torch.ones(8)), TypeError, "bits"),
        (lambda: unpack_bits(torch.ones(8)), TypeError, "codes"),
        (lambda: HashEncoder(torch.zeros(8, 12)), ValueError, "multiple of 8"),
        (lambda: HashEncoder(torch.zeros(8)), ValueError, "weight"),
        (lambda: HashEncoder(torch.full((8, 8), float("nan"))), ValueError, "finite"),
        (lambda: HashEncoder.random(8, 12, seed=0), ValueError, "bits"),
        (lambda: HashEncoder.random(8, 8), ValueError, "seed"),
        (lambda: HashEncoder.random(8, 8, seed=1, generator=torch.Generator()), ValueError, "seed"),
        (lambda: HashEncoder.random(8, 8, seed=-1), ValueError, "seed"),
        (lambda: HashEncoder.random(0, 8, seed=1), ValueError, "dim"),
        (lambda: HashEncoder.load("/nonexistent/w.pt"), ValueError, "path"),
        (lambda: HashEncoder.load(3), TypeError, "path"),
        (lambda: ENC.save("/tmp/w.npy"), ValueError, "path"),
        (lambda: HashEncoder.from_weights(torch.zeros(8, 8, dtype=torch.int32)), TypeError, "weight"),
        (lambda: block_mean(KB, LENS.to("meta")), ValueError, "one device"),
        (lambda: ENC.encode(torch.zeros(3, 7)), ValueError, "x"),
        (lambda: ENC.encode(torch.zeros(3, 8, dtype=torch.int32)), TypeError, "x"),
        (lambda: HashEncoder.random(8, 8, seed=0, num_heads=3).encode(torch.zeros(2, 8)), ValueError, "H"),
        (lambda: block_hash_codes(KB, LENS, "enc"), TypeError, "encoder"),
        (lambda: block_hash_codes(KB, LENS, HashEncoder.random(16, 8, seed=0)), ValueError, "encoder.dim"),
        (lambda: block_hash_codes(KB, LENS, HashEncoder.random(8, 8, seed=0, num_heads=3)), ValueError, "heads"),
        (lambda: kvstar_channels(KB, LENS, 9), ValueError, "num_channels"),
        (lambda: kvstar_channels(KB, LENS, 0), ValueError, "num_channels"),
        (lambda: block_subblock(KB, LENS, torch.zeros(2, 2, dtype=torch.int64), 3), ValueError, "token_merge"),
        (lambda: block_subblock(KB, LENS, torch.full((2, 2), 8), 2), ValueError, "channels"),
        (lambda: block_subblock(KB, LENS, torch.zeros(3, 2, dtype=torch.int64), 2), ValueError, "channels"),
        (lambda: block_subblock(KB, LENS, torch.zeros(2, 2), 2), TypeError, "channels"),
        (lambda: kvstar_subblock(KB, LENS, KVStarConfig(token_merge=3)), ValueError, "token_merge"),
        (lambda: kvstar_subblock(KB, LENS, "cfg"), TypeError, "config"),
        (lambda: BlockReprState(batch=0, max_blocks=1, num_kv_heads=1, block_size=2, head_dim=4), ValueError, "batch"),
        (lambda: BlockReprState(batch=1, max_blocks=1, num_kv_heads=1, block_size=2, head_dim=4, encoder=ENC),
         ValueError, "head_dim"),
        (lambda: BlockReprState.from_blocks(KB, torch.tensor([[4, 0, 4], [4, 4, 4]], dtype=torch.int32)),
         ValueError, "prefix"),
        (lambda: BlockReprState.from_blocks(KB[0], LENS[0]), ValueError, "k_blocks"),
        (lambda: BlockReprState(batch=1, max_blocks=2, num_kv_heads=1, block_size=2, head_dim=4).append(
            torch.zeros(1, 2, 1, 4)), ValueError, "k_new"),
        (lambda: BlockReprState(batch=1, max_blocks=2, num_kv_heads=1, block_size=2, head_dim=4).append(
            torch.zeros(1, 1, 1, 4), torch.tensor([2])), ValueError, "num_new"),
    ],
)
def test_bad_input(call, exc, match) -> None:
    with pytest.raises(exc, match=match):
        call()
