"""Dense, paged-sparse and ReRoPE references against independent constructions."""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from ucm_trt.reference import (
    apply_rope,
    dense_attention,
    logn_scale,
    paged_rerope_attention,
    paged_sparse_attention,
    rerope_attention,
)


def make_paged(k, v, block_size, *, generator, extra_blocks=3):
    """Scatter contiguous K/V [B, Hkv, L, D] into a pool with randomly permuted physical blocks.

    Physical block 0 is reserved (poisoned with NaN) so a wrong table entry cannot pass.
    """
    b, hkv, length, d = k.shape
    nb = (length + block_size - 1) // block_size
    num_phys = 1 + b * nb + extra_blocks
    pool = torch.full((num_phys, 2, hkv, block_size, d), float("nan"), dtype=k.dtype)
    perm = torch.randperm(num_phys - 1, generator=generator)[: b * nb] + 1
    table = perm.view(b, nb).to(torch.int32)
    for i in range(b):
        for blk in range(nb):
            lo, hi = blk * block_size, min(length, (blk + 1) * block_size)
            pool[table[i, blk], 0, :, : hi - lo] = k[i, :, lo:hi]
            pool[table[i, blk], 1, :, : hi - lo] = v[i, :, lo:hi]
    return pool, table


def sdpa_gqa(q, k, v, tq_offset):
    group = q.shape[1] // k.shape[1]
    kx = k.repeat_interleave(group, 1)
    vx = v.repeat_interleave(group, 1)
    tq, tk = q.shape[2], k.shape[2]
    mask = torch.arange(tk)[None, :] <= (torch.arange(tq)[:, None] + tq_offset)
    return F.scaled_dot_product_attention(q.double(), kx.double(), vx.double(), attn_mask=mask)


@pytest.mark.parametrize("hq,hkv", [(4, 4), (8, 2), (8, 1)])
def test_dense_matches_sdpa(hq, hkv):
    g = torch.Generator().manual_seed(hq * 10 + hkv)
    q = torch.randn(2, hq, 5, 64, generator=g)
    k = torch.randn(2, hkv, 23, 64, generator=g)
    v = torch.randn(2, hkv, 23, 64, generator=g)
    out = dense_attention(q, k, v)
    torch.testing.assert_close(out.double(), sdpa_gqa(q, k, v, 18), rtol=1e-5, atol=1e-5)


def test_dense_fully_masked_rows_are_zero_and_fp64_kept():
    q = torch.randn(1, 2, 3, 8, dtype=torch.float64)
    k = torch.randn(1, 2, 4, 8, dtype=torch.float64)
    v = torch.randn(1, 2, 4, 8, dtype=torch.float64)
    mask = torch.zeros(1, 1, 3, 4, dtype=torch.bool)
    mask[..., 1, :] = True
    out = dense_attention(q, k, v, causal=False, mask=mask)
    assert out.dtype == torch.float64
    assert torch.all(out[:, :, 0] == 0) and torch.all(out[:, :, 2] == 0)
    assert torch.any(out[:, :, 1] != 0)


@settings(max_examples=30, deadline=None)
@given(
    seed=st.integers(0, 2**20),
    group=st.sampled_from([1, 4, 8]),
    d=st.sampled_from([64, 128]),
    block_size=st.sampled_from([4, 16]),
    lengths=st.lists(st.integers(1, 70), min_size=1, max_size=3),
    tq=st.integers(1, 4),
)
def test_paged_select_all_equals_dense(seed, group, d, block_size, lengths, tq):
    """Every block selected (explicitly or as None) reproduces dense causal attention."""
    g = torch.Generator().manual_seed(seed)
    hkv = 2
    hq = hkv * group
    lengths = [max(n, tq) for n in lengths]
    b, lmax = len(lengths), max(lengths)
    k = torch.randn(b, hkv, lmax, d, generator=g)
    v = torch.randn(b, hkv, lmax, d, generator=g)
    q = torch.randn(b, hq, tq, d, generator=g)
    pool, table = make_paged(k, v, block_size, generator=g)
    seq_lens = torch.tensor(lengths, dtype=torch.int32)
    nbmax = (lmax + block_size - 1) // block_size
    sel = torch.full((b, hkv, nbmax), -1, dtype=torch.int32)
    for i, n in enumerate(lengths):
        nb = (n + block_size - 1) // block_size
        sel[i, :, :nb] = torch.arange(nb, dtype=torch.int32)
    out_none = paged_sparse_attention(q, pool, table, seq_lens)
    out_all = paged_sparse_attention(q, pool, table, seq_lens, sel)
    for i, n in enumerate(lengths):
        ref = dense_attention(q[i : i + 1], k[i : i + 1, :, :n], v[i : i + 1, :, :n])
        torch.testing.assert_close(out_none[i : i + 1], ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out_all[i : i + 1], ref, rtol=1e-5, atol=1e-5)


def test_paged_sparse_matches_token_loop_mask():
    """Sparse selection (per KV head) against a mask built token by token."""
    g = torch.Generator().manual_seed(7)
    b, hkv, group, d, bs, tq = 2, 2, 4, 64, 8, 3
    lengths = [61, 40]
    k = torch.randn(b, hkv, 61, d, generator=g)
    v = torch.randn(b, hkv, 61, d, generator=g)
    q = torch.randn(b, hkv * group, tq, d, generator=g)
    pool, table = make_paged(k, v, bs, generator=g)
    sel = torch.tensor(
        [[[0, 3, 7, -1], [0, 1, 5, 7]], [[2, 4, -1, -1], [0, 3, 4, -1]]], dtype=torch.int32
    )
    out = paged_sparse_attention(q, pool, table, torch.tensor(lengths, dtype=torch.int32), sel)
    for i, n in enumerate(lengths):
        mask = torch.zeros(1, hkv * group, tq, n, dtype=torch.bool)
        for h in range(hkv * group):
            chosen = set(sel[i, h // group].tolist())
            for t in range(tq):
                qpos = n - tq + t
                for p in range(n):
                    mask[0, h, t, p] = p <= qpos and (p >= n - tq or (p // bs) in chosen)
        ref = dense_attention(q[i : i + 1], k[i : i + 1, :, :n], v[i : i + 1, :, :n], causal=False, mask=mask)
        torch.testing.assert_close(out[i : i + 1], ref, rtol=1e-5, atol=1e-5)
        dense = dense_attention(q[i : i + 1], k[i : i + 1, :, :n], v[i : i + 1, :, :n])
        assert not torch.allclose(out[i : i + 1], dense, atol=1e-3), "selection had no effect"


def naive_rerope(q, k, v, window, theta, logn_len, q_pos, k_pos):
    """Scalar double loop over (query, key) pairs; fp64; one head, no batch."""
    tq, d = q.shape
    out = torch.zeros(tq, d, dtype=torch.float64)
    for i in range(tq):
        qi = q[i].double()
        if logn_len is not None:
            qi = qi * max(1.0, math.log(q_pos[i] + 1) / math.log(logn_len))
        logits = []
        for j in range(k.shape[0]):
            if k_pos[j] > q_pos[i]:
                logits.append(float("-inf"))
                continue
            kj = k[j].double()
            if q_pos[i] - k_pos[j] < window:
                s = apply_rope(qi[None], torch.tensor([q_pos[i]]), theta=theta)[0] @ apply_rope(
                    kj[None], torch.tensor([k_pos[j]]), theta=theta
                )[0]
            else:
                s = apply_rope(qi[None], torch.tensor([window]), theta=theta)[0] @ kj
            logits.append(float(s) / math.sqrt(d))
        p = torch.softmax(torch.tensor(logits, dtype=torch.float64), 0)
        out[i] = p @ v.double()
    return out


@pytest.mark.parametrize("window,logn", [(3, None), (5, 8), (100, None)])
def test_rerope_matches_naive_loop(window, logn):
    g = torch.Generator().manual_seed(window)
    tq, tk, d = 3, 12, 16
    q = torch.randn(1, 2, tq, d, generator=g)
    k = torch.randn(1, 1, tk, d, generator=g)
    v = torch.randn(1, 1, tk, d, generator=g)
    out = rerope_attention(q, k, v, window=window, theta=1e4, logn_training_length=logn)
    q_pos = list(range(tk - tq, tk))
    for h in range(2):
        ref = naive_rerope(q[0, h], k[0, 0], v[0, 0], window, 1e4, logn, q_pos, list(range(tk)))
        torch.testing.assert_close(out[0, h].double(), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("group", [1, 4])
def test_rerope_large_window_equals_rope_attention(group):
    g = torch.Generator().manual_seed(group)
    q = torch.randn(2, 2 * group, 4, 64, generator=g)
    k = torch.randn(2, 2, 30, 64, generator=g)
    v = torch.randn(2, 2, 30, 64, generator=g)
    out = rerope_attention(q, k, v, window=30, theta=1e4)
    qp, kp = torch.arange(26, 30), torch.arange(30)
    ref = dense_attention(apply_rope(q, qp, theta=1e4), apply_rope(k, kp, theta=1e4), v)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    small = rerope_attention(q, k, v, window=4, theta=1e4)
    assert not torch.allclose(small, ref, atol=1e-3), "window had no effect"


def test_logn_scale_values():
    s = logn_scale(torch.tensor([0, 7, 15, 63]), 8)
    assert s.tolist()[:2] == [1.0, 1.0]
    assert math.isclose(s[2].item(), math.log(16) / math.log(8))
    with pytest.raises(ValueError, match="logn_training_length"):
        logn_scale(torch.tensor([1]), 1)


@pytest.mark.parametrize("group,bs", [(1, 4), (4, 16), (8, 8)])
def test_paged_rerope_select_all_equals_contiguous(group, bs):
    g = torch.Generator().manual_seed(group + bs)
    lengths, tq, d = [37, 21], 2, 64
    k = torch.randn(2, 2, 37, d, generator=g)
    v = torch.randn(2, 2, 37, d, generator=g)
    q = torch.randn(2, 2 * group, tq, d, generator=g)
    pool, table = make_paged(k, v, bs, generator=g)
    out = paged_rerope_attention(
        q, pool, table, torch.tensor(lengths, dtype=torch.int32), window=9, theta=1e4, logn_training_length=16
    )
    for i, n in enumerate(lengths):
        ref = rerope_attention(
            q[i : i + 1], k[i : i + 1, :, :n], v[i : i + 1, :, :n], window=9, theta=1e4, logn_training_length=16
        )
        torch.testing.assert_close(out[i : i + 1], ref, rtol=1e-5, atol=1e-5)


def test_paged_bad_inputs():
    q = torch.randn(1, 4, 1, 8)
    pool = torch.randn(4, 2, 2, 4, 8)
    table = torch.tensor([[1, 2]], dtype=torch.int32)
    lens = torch.tensor([7], dtype=torch.int32)
    with pytest.raises(TypeError, match="block_table"):
        paged_sparse_attention(q, pool, table.long(), lens)
    with pytest.raises(ValueError, match="seq_lens\\[0\\] = 9"):
        paged_sparse_attention(q, pool, table, torch.tensor([9], dtype=torch.int32))
    with pytest.raises(ValueError, match="kv_pool"):
        paged_sparse_attention(q, pool[:, :1], table, lens)
    with pytest.raises(ValueError, match="physical blocks"):
        paged_sparse_attention(q, pool, torch.tensor([[1, 9]], dtype=torch.int32), lens)
    with pytest.raises(ValueError, match="selection\\[0\\]"):
        paged_sparse_attention(q, pool, table, lens, torch.tensor([[[0, 5]] * 2], dtype=torch.int32))
    with pytest.raises(ValueError, match="heads"):
        paged_sparse_attention(torch.randn(1, 3, 1, 8), pool, table, lens)
    with pytest.raises(ValueError, match="window"):
        paged_rerope_attention(q, pool, table, lens, window=0, theta=1e4)


def test_dense_bad_inputs():
    q = torch.randn(1, 4, 2, 8)
    k = torch.randn(1, 2, 5, 8)
    with pytest.raises(ValueError, match="v must"):
        dense_attention(q, k, torch.randn(1, 2, 4, 8))
    with pytest.raises(ValueError, match="q_positions"):
        dense_attention(q, k, k, q_positions=torch.arange(3))
    with pytest.raises(ValueError, match="mask"):
        dense_attention(q, k, k, mask=torch.ones(2, 2, 2, 2, dtype=torch.bool))
    with pytest.raises(TypeError, match="q must"):
        dense_attention(q.int(), k, k)
