"""Hypothesis fuzz over the inputs of the retrieval, append, copy and delta-RoPE kernels (issue 17 item 5).

Block tables with ids outside the pool, lengths past the table or negative, top-k below the forced
windows, odd head dims, empty copy lists. For every draw the launcher either refuses with a one-line
``ValueError``/``TypeError`` that names the argument, or runs without touching memory outside its
buffers and sets the IndexGuard flag exactly when an id or length was out of range. Outputs that
ran are checked for their contract (selection: sorted ids of the sequence, -1 padding, the forced
windows in; copies: the good pairs copied).
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from ucm_trt.kernels import (
    append_kv,
    copy_blocks,
    delta_rope_blocks_,
    dot_retrieve,
    hash_retrieve,
    quest_retrieve,
)
from ucm_trt.kernels.guard import IndexGuard

from .conftest import DEVICE

FUZZ = settings(max_examples=30, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def _assert_clean_refusal(err: Exception, names: tuple[str, ...]) -> None:
    msg = str(err)
    event(f"refused: {msg.split(' ')[0]}")
    assert "\n" not in msg, f"refusal must be one line: {msg!r}"
    assert any(msg.startswith(n) or f" {n}" in msg or f"{n} " in msg for n in names), (
        f"refusal must name the argument ({names}): {msg!r}")


def _used(seq: int, bs: int, mb: int) -> int:
    return min(max(seq, 0), mb * bs) // bs + (1 if 0 < min(max(seq, 0), mb * bs) % bs else 0)


RETRIEVAL_ARGS = ("q", "hash_codes", "hash_weight", "block_min", "block_max", "block_mean", "block_table",
                  "seq_lens", "top_k", "sink_blocks", "local_blocks", "block_size", "shared")


@settings(FUZZ, max_examples=80)
@given(data=st.data())
def test_fuzz_fused_retrieval(data):
    mode = data.draw(st.sampled_from(["hash", "quest", "dot"]), label="mode")
    bs = data.draw(st.sampled_from([16, 32]), label="bs")
    hkv = data.draw(st.integers(1, 3), label="hkv")
    group = data.draw(st.integers(1, 3), label="group")
    d = data.draw(st.sampled_from([16, 32, 48, 32, 48, 24]), label="d")  # 24 is refused (not a multiple of 16)
    b = data.draw(st.integers(1, 3), label="batch")
    mb = data.draw(st.integers(1, 6), label="max_blocks")
    nphys = data.draw(st.integers(1, 10), label="num_blocks")
    ids = st.integers(-2, nphys + 2)
    table = torch.tensor(data.draw(st.lists(st.lists(ids, min_size=mb, max_size=mb), min_size=b, max_size=b),
                                   label="table"), dtype=torch.int32)
    seqs = data.draw(st.lists(st.integers(-2, mb * bs + 3), min_size=b, max_size=b), label="seq_lens")
    sink = data.draw(st.sampled_from([0, 1, 2, 0, 1, 2, -1]), label="sink")
    local = data.draw(st.integers(0, 2), label="local")
    top_k = max(sink, 0) + local + data.draw(st.integers(-1, 7), label="top_k - forced")
    shared = data.draw(st.booleans(), label="shared")
    validate = data.draw(st.booleans(), label="validate")
    gen = torch.Generator().manual_seed(0)
    q = torch.randn((b, hkv * group, d), generator=gen).to(DEVICE)
    guard = IndexGuard(DEVICE)
    kw = dict(top_k=top_k, sink_blocks=sink, local_blocks=local, shared=shared, validate=validate, guard=guard)
    args = (table.to(DEVICE), torch.tensor(seqs, dtype=torch.int32, device=DEVICE))
    try:
        if mode == "hash":
            nbytes = data.draw(st.sampled_from([4, 1, 3, 10]), label="code bytes")
            codes = torch.randint(0, 256, (nphys, hkv, bs, nbytes), generator=gen, dtype=torch.uint8).to(DEVICE)
            w = torch.randn((d, nbytes * 8), generator=gen).to(DEVICE)
            out = hash_retrieve(q, codes, w, *args, **kw)
        elif mode == "quest":
            lo = torch.randn((nphys, hkv, d), generator=gen).to(DEVICE)
            out = quest_retrieve(q, lo, lo + 1, *args, block_size=bs, **kw)
        else:
            mean = torch.randn((nphys, hkv, d), generator=gen).to(DEVICE)
            out = dot_retrieve(q, mean, *args, block_size=bs, **kw)
    except (ValueError, TypeError) as err:
        _assert_clean_refusal(err, RETRIEVAL_ARGS)
        return
    event("ran")
    cap = mb * bs
    bad_len = any(s < 0 or s > cap for s in seqs)
    bad_id = any(not 0 <= int(table[i, j]) < nphys for i, s in enumerate(seqs) for j in range(_used(s, bs, mb)))
    assert not (validate and (bad_id or bad_len or min(seqs) < 1)), "validate=True must refuse bad contents"
    assert (guard.value() != 0) == (bad_id or bad_len)
    assert out.shape == (b, hkv, top_k)
    for i, s in enumerate(seqs):
        nb = _used(s, bs, mb)
        for h in range(hkv):
            row = out[i, h].tolist()
            chosen = [x for x in row if x >= 0]
            assert row == chosen + [-1] * (top_k - len(chosen)), row
            assert chosen == sorted(set(chosen)) and all(x < nb for x in chosen), (row, nb)
            assert len(chosen) == min(top_k, nb)
            forced = {j for j in range(nb) if j < sink or j >= nb - local}
            assert forced <= set(chosen), (row, forced)
        if shared:
            assert bool((out[i] == out[i, :1]).all())


@FUZZ
@given(data=st.data())
def test_fuzz_copy_blocks(data):
    n_src = data.draw(st.integers(0, 6), label="n_src")
    n_dst = data.draw(st.integers(1, 6), label="n_dst")
    n = data.draw(st.integers(0, 5), label="pairs")
    src_ids = data.draw(st.lists(st.integers(-3, n_src + 3), min_size=n, max_size=n), label="src_ids")
    dst_pool = list(range(n_dst)) + [-1, n_dst, n_dst + 7]
    dst_ids = data.draw(st.lists(st.sampled_from(dst_pool), min_size=n, max_size=n, unique=True), label="dst_ids")
    id_dtype = data.draw(st.sampled_from([torch.int64, torch.int32]), label="id_dtype")
    src = torch.arange(n_src * 2 * 16, dtype=torch.float32).view(n_src, 2, 16).to(DEVICE)
    dst = torch.full((n_dst, 2, 16), -1.0).to(DEVICE)
    guard = IndexGuard(DEVICE)
    try:
        copy_blocks(src, dst, torch.tensor(src_ids, dtype=id_dtype, device=DEVICE),
                    torch.tensor(dst_ids, dtype=id_dtype, device=DEVICE), guard=guard)
    except (ValueError, TypeError) as err:
        _assert_clean_refusal(err, ("src", "dst", "src_ids", "dst_ids", "guard"))
        assert id_dtype != torch.int64
        return
    want = torch.full((n_dst, 2, 16), -1.0)
    bad = False
    for s, d in zip(src_ids, dst_ids, strict=True):
        if 0 <= s < n_src and 0 <= d < n_dst:
            want[d] = src[s].cpu()
        else:
            bad = True
    assert torch.equal(dst.cpu(), want)
    assert (guard.value() != 0) == bad


@FUZZ
@given(data=st.data())
def test_fuzz_append_kv(data):
    bs = 16
    b = data.draw(st.integers(1, 3), label="batch")
    mb = data.draw(st.integers(1, 3), label="max_blocks")
    nphys = data.draw(st.integers(1, 6), label="num_blocks")
    t = data.draw(st.integers(0, 20), label="T")
    d = data.draw(st.sampled_from([16, 48]), label="d")
    table = torch.tensor(data.draw(st.lists(st.lists(st.integers(-1, nphys + 1), min_size=mb, max_size=mb),
                                            min_size=b, max_size=b), label="table"), dtype=torch.int32)
    seqs = data.draw(st.lists(st.integers(-1, mb * bs + 2), min_size=b, max_size=b), label="seq_lens")
    news = data.draw(st.lists(st.integers(-1, 21), min_size=b, max_size=b), label="num_new")
    validate = data.draw(st.booleans(), label="validate")
    gen = torch.Generator().manual_seed(1)
    pool = torch.randn((nphys, 2, 1, bs, d), generator=gen).to(DEVICE)
    before = pool.clone()
    k = torch.randn((b, 1, t, d), generator=gen).to(DEVICE)
    mean = torch.zeros((nphys, 1, d), device=DEVICE)
    guard = IndexGuard(DEVICE)
    try:
        append_kv(pool, table.to(DEVICE), torch.tensor(seqs, dtype=torch.int32, device=DEVICE), k, k,
                  num_new=torch.tensor(news, dtype=torch.int32, device=DEVICE), block_mean=mean,
                  validate=validate, guard=guard)
    except (ValueError, TypeError) as err:
        _assert_clean_refusal(err, ("kv_pool", "k", "v", "block_table", "seq_lens", "num_new"))
        assert validate
        return
    if t == 0:
        return
    bad = False
    written = set()
    for i, (s, n) in enumerate(zip(seqs, news, strict=True)):
        if not (0 <= n <= min(t, s) and s <= mb * bs):
            bad = True
            continue
        for p in range(s - n, s):
            phys = int(table[i, p // bs])
            if 0 <= phys < nphys:
                written.add(phys)
            else:
                bad = True
    assert not (validate and bad)
    assert (guard.value() != 0) == bad
    untouched = [p for p in range(nphys) if p not in written]
    assert torch.equal(pool[untouched], before[untouched]), "only the blocks of valid new tokens change"


@FUZZ
@given(ids=st.lists(st.integers(-3, 8), max_size=5, unique=True), validate=st.booleans())
def test_fuzz_delta_rope_ids(ids, validate):
    pool = torch.randn((5, 2, 1, 16, 32), generator=torch.Generator().manual_seed(2)).to(DEVICE)
    before = pool.clone()
    guard = IndexGuard(DEVICE)
    try:
        delta_rope_blocks_(pool, torch.tensor(ids, dtype=torch.int32, device=DEVICE),
                           torch.full((len(ids),), 3, device=DEVICE), theta=1e4, validate=validate, guard=guard)
    except ValueError as err:
        _assert_clean_refusal(err, ("block_ids",))
        assert validate and any(not 0 <= i < 5 for i in ids)
        return
    bad = any(not 0 <= i < 5 for i in ids)
    assert (guard.value() != 0) == bad
    keep = [p for p in range(5) if p not in ids]
    assert torch.equal(pool[keep], before[keep])


def test_refusals_name_the_argument_examples():
    """Fixed examples of the refusals the fuzz tests accept, so a change of wording is seen here."""
    q = torch.randn(1, 2, 32, device=DEVICE)
    mean = torch.randn(4, 2, 32, device=DEVICE)
    table = torch.zeros(1, 2, dtype=torch.int32, device=DEVICE)
    seq = torch.tensor([5], dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match=r"^top_k must be > 0, got 0$"):
        dot_retrieve(q, mean, table, seq, block_size=16, top_k=0, sink_blocks=0, local_blocks=0)
    with pytest.raises(ValueError, match=r"^sink_blocks must be >= 0"):
        dot_retrieve(q, mean, table, seq, block_size=16, top_k=2, sink_blocks=-1, local_blocks=0)
    with pytest.raises(ValueError, match=r"^block_size must be a power of two in \[16, 256\], got 24$"):
        dot_retrieve(q, mean, table, seq, block_size=24, top_k=2, sink_blocks=0, local_blocks=0)
