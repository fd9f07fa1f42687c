"""The runtime's PyTorch attention (ucm_trt.runtime.torch_attention) against the independent fp32
oracle (ucm_trt.reference): paged sparse and ReRoPE attention, scattered dense queries, RoPE."""

from __future__ import annotations

import pytest
import torch

from ucm_trt import reference
from ucm_trt.runtime import torch_attention as ta


def _case(seed: int, *, b=3, hq=8, hkv=2, d=32, bs=16, t=1, lens=(37, 64, 5), select=True):
    g = torch.Generator().manual_seed(seed)
    max_blocks = max(-(-n // bs) for n in lens) + 1
    num_phys = b * max_blocks + 3
    pool = torch.randn(num_phys, 2, hkv, bs, d, generator=g)
    perm = torch.randperm(num_phys, generator=g)[: b * max_blocks].view(b, max_blocks).to(torch.int32)
    seq_lens = torch.tensor(lens, dtype=torch.int32)
    q = torch.randn(b, hq, t, d, generator=g)
    sel = None
    if select:
        s = max_blocks
        sel = torch.full((b, hkv, s), -1, dtype=torch.int32)
        for i, n in enumerate(lens):
            nb = -(-n // bs)
            for h in range(hkv):
                ids = torch.randperm(nb, generator=g)[: max(1, nb // 2)]
                sel[i, h, : ids.numel()] = ids.to(torch.int32)
    return q, pool, perm, seq_lens, sel


@pytest.mark.parametrize("select", [False, True])
@pytest.mark.parametrize("t", [1, 5])
def test_paged_sparse_matches_the_reference(select, t):
    q, pool, table, lens, sel = _case(0, t=t, select=select)
    got = ta.paged_sparse_attention(q, pool, table, lens, sel, scale=0.3)
    want = reference.paged_sparse_attention(q, pool, table, lens, sel, scale=0.3)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("select", [False, True])
def test_prefill_chunks_match_the_reference(select, dtype):
    """Chunks of many queries (the fused-attention path), a chunk that is the whole sequence and GQA 4."""
    q, pool, table, lens, sel = _case(5, t=48, hq=8, hkv=2, lens=(48, 131, 200), select=select)
    q, pool = q.to(dtype), pool.to(dtype)
    got = ta.paged_sparse_attention(q, pool, table, lens, sel, scale=0.2)
    want = reference.paged_sparse_attention(q, pool, table, lens, sel, scale=0.2)
    assert got.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 1e-10
    torch.testing.assert_close(got, want.to(dtype), atol=tol, rtol=tol)


@pytest.mark.parametrize("logn", [None, 16])
@pytest.mark.parametrize("window", [3, 20, 1000])
def test_paged_rerope_matches_the_reference(logn, window):
    q, pool, table, lens, sel = _case(1, t=4, lens=(40, 29, 17))
    kw = dict(window=window, theta=10000.0, logn_training_length=logn, scale=None)
    got = ta.paged_rerope_attention(q, pool, table, lens, sel, **kw)
    want = reference.paged_rerope_attention(q, pool, table, lens, sel, **kw)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_a_selection_changes_the_output():
    """The selection is applied (a wrong mask that ignores it would pass the all-blocks case only)."""
    q, pool, table, lens, sel = _case(2, lens=(64, 64, 64))
    assert not torch.allclose(ta.paged_sparse_attention(q, pool, table, lens, sel),
                              ta.paged_sparse_attention(q, pool, table, lens, None), atol=1e-3)


def test_dense_attention_at_scattered_positions_matches_the_reference():
    g = torch.Generator().manual_seed(3)
    q = torch.randn(1, 4, 3, 16, generator=g)
    k, v = torch.randn(2, 1, 2, 20, 16, generator=g)
    pos = torch.tensor([2, 11, 19])
    got = ta.dense_attention_at(q, k, v, pos, scale=0.25)
    want = reference.dense_attention(q, k, v, scale=0.25, causal=True, q_positions=pos, k_positions=torch.arange(20))
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)


def test_rope_matches_the_reference_and_composes():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 3, 7, 64, generator=g)
    pos = torch.tensor([0, 1, 5, 100, 4096, 70000, 131071])
    torch.testing.assert_close(ta.rope_rotate(x, pos, theta=1e5), reference.apply_rope(x, pos, theta=1e5))
    cos, sin = ta.rope_cos_sin(pos, 64, 1e4)
    rcos, rsin = reference.rope_cos_sin(pos, 64, 1e4)
    torch.testing.assert_close((cos, sin), (rcos, rsin), atol=0, rtol=0)
    a, b = torch.tensor([13]), torch.tensor([29])
    torch.testing.assert_close(ta.rope_rotate(ta.rope_rotate(x, a, theta=1e4), b, theta=1e4),
                               ta.rope_rotate(x, a + b, theta=1e4), atol=1e-5, rtol=1e-5)
