"""Split-K merged inside the attention kernel (one launch) against the fp32 reference.

Every split writes its partial output and log2-sum-exp to the caller's :class:`AttentionWorkspace`
and takes a ticket from its tile's arrival counter; the last one merges and re-zeroes the counter.
The workspace's partials are poisoned with NaN before each test (a merge that read a row nobody
wrote fails) and the counters must be all zero after every launch (two launches in a row reuse
them: a counter left non-zero would make the second launch merge too early or never).

CPU tier: tiny shapes in Triton's interpreter (its programs run one after another, so every
arrival order there is "split order"; the GPU tier runs them concurrently).
"""

from __future__ import annotations

import zlib

import pytest
import torch

from tests.kernels._kernel_cases import all_selection, make_paged_case, nan_like, random_selection
from ucm_trt import reference as R
from ucm_trt.kernels import (
    AttentionLaunch,
    AttentionWorkspace,
    paged_rerope_attention,
    paged_sparse_attention,
)
from ucm_trt.kernels.attention import merge_tile, min_splits, plan_attention, split_scratch_sizes
from ucm_trt.testing.tolerances import tolerances_for


def _workspace(device) -> AttentionWorkspace:
    ws = AttentionWorkspace(device)
    counters, partials = ws.buffers(64, 1 << 16)
    partials.fill_(float("nan"))
    return ws


def _check(got, ref, dtype, what):
    assert not torch.isnan(got).any(), what
    torch.testing.assert_close(got.float(), ref, **tolerances_for(dtype), msg=lambda m: f"{what}: {m}")


# name: (lens, hkv, group, d, block_size, tq); partial last blocks everywhere, permuted physical blocks
CASES = {
    "decode-g1": ((37, 70, 16), 2, 1, 32, 16, 1),
    "decode-g4": ((45, 90), 2, 4, 64, 16, 1),
    "decode-g8-one-block": ((9, 14), 1, 8, 32, 16, 1),
    "chunk-g4-tq3": ((50, 23), 2, 4, 32, 16, 3),
    "chunk-g3-tq2": ((45, 30), 1, 3, 32, 16, 2),  # a group that is not a power of two (masked merge rows)
    "prefill-g2": ((40,), 2, 2, 32, 16, 19),
}


@pytest.mark.parametrize("name", list(CASES))
def test_split_k_matches_reference_for_every_split_count(name, device):
    """Splits 1 .. more than any row has blocks (later splits of short rows are empty), with no
    selection, all blocks, a random subset (one row empty) and a single block; one workspace for all."""
    lens, hkv, group, d, bs, tq = CASES[name]
    gen = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    case = make_paged_case(lens=lens, hkv=hkv, group=group, d=d, bs=bs, tq=tq, dtype=torch.float32, device=device,
                           gen=gen)
    nbs = case.num_blocks
    sels = {
        "none": None,
        "all": all_selection(nbs, hkv, device),
        "random": random_selection(nbs, hkv, max(2, max(nbs) // 2), gen, device, empty_row=True),
        "one": random_selection(nbs, hkv, 1, gen, device),
    }
    ws = _workspace(device)
    for sel_name, sel in sels.items():
        ref = R.paged_sparse_attention(case.q, case.kv_pool, case.block_table, case.seq_lens, sel)
        for splits in (1, 2, 3, max(nbs) + 4):
            got = paged_sparse_attention(case.q, case.kv_pool, case.block_table, case.seq_lens, sel,
                                         out=nan_like(case.q), launch=AttentionLaunch(num_splits=splits),
                                         workspace=ws)
            _check(got, ref, torch.float32, f"{sel_name} splits={splits}")
            assert int(ws.counters.abs().sum()) == 0, f"{sel_name} splits={splits}: counters left non-zero"


def test_split_k_merges_more_splits_than_one_merge_step(device):
    """24 to 48 splits, more than the MERGE_SPLITS (16) the last program merges per step: the merge
    walks several steps, the last one partial."""
    gen = torch.Generator().manual_seed(9)
    case = make_paged_case(lens=(700, 333), hkv=1, group=8, d=64, bs=16, tq=1, dtype=torch.float32, device=device,
                           gen=gen)
    assert merge_tile(8, 64) == {"MERGE_ROWS": 8, "MERGE_SPLITS": 16}
    assert merge_tile(4, 128) == {"MERGE_ROWS": 4, "MERGE_SPLITS": 16}  # the shape: 33 splits in 3 loads
    ws = _workspace(device)
    for sel in (None, random_selection(case.num_blocks, 1, 30, gen, device)):
        ref = R.paged_sparse_attention(case.q, case.kv_pool, case.block_table, case.seq_lens, sel)
        for splits in (32, 48):
            plan_splits = plan_attention(batch=2, num_kv_heads=1, group=8, tq=1, head_dim=64, block_size=16,
                                         work_items=(46 if sel is None else 30) + 2, sms=8,
                                         launch=AttentionLaunch(num_splits=splits)).splits
            assert plan_splits > 16
            got = paged_sparse_attention(case.q, case.kv_pool, case.block_table, case.seq_lens, sel,
                                         out=nan_like(case.q), launch=AttentionLaunch(num_splits=splits), workspace=ws)
            _check(got, ref, torch.float32, f"splits={splits}")
            assert int(ws.counters.abs().sum()) == 0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_split_k_half_dtypes_twice_on_one_workspace(dtype, device):
    """fp16/bf16, the default launch rule (splits > 1 here) run twice on one workspace: the same output
    both times and the counters zero after each launch (CUDA-graph replay needs exactly this)."""
    gen = torch.Generator().manual_seed(21)
    case = make_paged_case(lens=(61, 33), hkv=2, group=4, d=64, bs=16, tq=1, dtype=dtype, device=device, gen=gen)
    sel = random_selection(case.num_blocks, 2, 3, gen, device)
    ref = R.paged_sparse_attention(case.q, case.kv_pool, case.block_table, case.seq_lens, sel)
    ws = _workspace(device)
    outs = []
    for _ in range(2):
        outs.append(paged_sparse_attention(case.q, case.kv_pool, case.block_table, case.seq_lens, sel,
                                           out=nan_like(case.q), launch=AttentionLaunch(num_splits=3), workspace=ws))
        assert int(ws.counters.abs().sum()) == 0
        _check(outs[-1], ref, dtype, str(dtype))
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)


def test_split_k_rerope(device):
    gen = torch.Generator().manual_seed(5)
    case = make_paged_case(lens=(70, 37), hkv=2, group=4, d=64, bs=16, tq=2, dtype=torch.float32, device=device,
                           gen=gen)
    sel = random_selection(case.num_blocks, 2, 3, gen, device)
    ws = _workspace(device)
    for s in (None, sel):
        ref = R.paged_rerope_attention(case.q, case.kv_pool, case.block_table, case.seq_lens, s, window=24,
                                       theta=10000.0, logn_training_length=16)
        got = paged_rerope_attention(case.q, case.kv_pool, case.block_table, case.seq_lens, s, window=24,
                                     theta=10000.0, logn_training_length=16, out=nan_like(case.q),
                                     launch=AttentionLaunch(num_splits=4), workspace=ws)
        _check(got, ref, torch.float32, "rerope")
        assert int(ws.counters.abs().sum()) == 0


def test_split_k_without_workspace_allocates_one(device):
    gen = torch.Generator().manual_seed(2)
    case = make_paged_case(lens=(50,), hkv=2, group=2, d=32, bs=16, tq=1, dtype=torch.float32, device=device, gen=gen)
    ref = R.paged_sparse_attention(case.q, case.kv_pool, case.block_table, case.seq_lens)
    got = paged_sparse_attention(case.q, case.kv_pool, case.block_table, case.seq_lens,
                                 launch=AttentionLaunch(num_splits=3))
    _check(got, ref, torch.float32, "no workspace")


def test_workspace_grows_and_keeps_counters_zero(device):
    ws = AttentionWorkspace(device)
    c, p = ws.buffers(5, 100)
    assert c.numel() >= 5 and p.numel() >= 100 and int(c.abs().sum()) == 0
    c2, p2 = ws.buffers(3, 50)  # smaller: the same buffers
    assert c2.data_ptr() == c.data_ptr() and p2.data_ptr() == p.data_ptr()
    c3, _ = ws.buffers(11, 100)
    assert c3.numel() >= 11 and int(c3.abs().sum()) == 0
    # the outgrown counters stay allocated (a graph captured before the growth still uses them)
    assert any(t.data_ptr() == c.data_ptr() for t in ws._outgrown)


def test_workspace_argument_errors(device):
    gen = torch.Generator().manual_seed(0)
    c = make_paged_case(lens=(20,), hkv=2, group=2, d=32, bs=16, tq=1, dtype=torch.float32, device=device, gen=gen)
    with pytest.raises(TypeError, match="workspace must be an AttentionWorkspace"):
        paged_sparse_attention(c.q, c.kv_pool, c.block_table, c.seq_lens, workspace=c.seq_lens)
    if device.type == "cuda":
        with pytest.raises(ValueError, match="workspace must live on q's device"):
            paged_sparse_attention(c.q, c.kv_pool, c.block_table, c.seq_lens, workspace=AttentionWorkspace("cpu"))


def test_scratch_sizes_and_min_splits():
    assert split_scratch_sizes(batch=2, num_kv_heads=8, n_qtiles=3, splits=1, block_m=16, dv=128) == (48, 48 * 16 * 129)
    assert split_scratch_sizes(batch=2, num_kv_heads=8, n_qtiles=3, splits=5, block_m=16, dv=128) == (
        48, 48 * 5 * 16 * 129)
    cdiv = lambda a, b: -(-a // b)  # noqa: E731
    assert min_splits(8, 2, 132, cdiv) == 33  # batch-1 decode, 8 KV heads: 264 programs
    assert min_splits(64, 2, 132, cdiv) == 5
    assert min_splits(1000, 2, 132, cdiv) == 1
    # the JIT rule starts from min_splits and balances rounds within 1x-2x of it
    p = plan_attention(batch=8, num_kv_heads=8, group=4, tq=1, head_dim=128, block_size=64, work_items=514,
                       sms=132, launch=AttentionLaunch())
    assert 5 <= p.splits <= 10


# ------------------------------------------------------------------ GPU tier: concurrent arrivals


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("group", [1, 4, 8])
def test_gpu_split_k_concurrent_and_graph_replay(dtype, group):
    """Real sizes, 1 to 64 splits (programs arrive in any order), then the same launch captured in a
    CUDA graph and replayed 3 times on one workspace: same output, counters zero."""
    dev = torch.device("cuda")
    gen = torch.Generator().manual_seed(group)
    hkv = 8 if group < 8 else 4
    case = make_paged_case(lens=(8191, 3001), hkv=hkv, group=group, d=128, bs=64, tq=1, dtype=dtype, device=dev,
                           gen=gen)
    sel = random_selection(case.num_blocks, hkv, 16, gen, dev)
    ref = R.paged_sparse_attention(case.q, case.kv_pool, case.block_table, case.seq_lens, sel)
    ws = AttentionWorkspace(dev)
    for splits in (None, 1, 7, 64):
        launch = AttentionLaunch() if splits is None else AttentionLaunch(num_splits=splits)
        got = paged_sparse_attention(case.q, case.kv_pool, case.block_table, case.seq_lens, sel,
                                     out=nan_like(case.q), launch=launch, workspace=ws, validate=False)
        _check(got, ref, dtype, f"splits={splits}")
        assert int(ws.counters.abs().sum()) == 0
    out = nan_like(case.q)
    launch = AttentionLaunch(num_splits=16)
    paged_sparse_attention(case.q, case.kv_pool, case.block_table, case.seq_lens, sel, out=out, launch=launch,
                           workspace=ws, validate=False)  # sizes the workspace before capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        paged_sparse_attention(case.q, case.kv_pool, case.block_table, case.seq_lens, sel, out=out, launch=launch,
                               workspace=ws, validate=False)
    first = None
    for _ in range(3):
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        _check(out, ref, dtype, "graph replay")
        assert int(ws.counters.abs().sum()) == 0
        first = out.clone() if first is None else first
        torch.testing.assert_close(out, first, rtol=0, atol=0)
