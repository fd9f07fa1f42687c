"""Paged sparse / ReRoPE attention kernels against the fp32 references (ucm_trt.reference).

CPU tier: tiny shapes under TRITON_INTERPRET=1 (fp32 mostly; fp16/bf16 loads and stores once).
GPU tier (``gpu``): real shapes in bf16 and fp16. Every output is poisoned with NaN first.
"""

from __future__ import annotations

import dataclasses
import zlib

import pytest
import torch

from tests.kernels._kernel_cases import all_selection, make_paged_case, nan_like, random_selection
from ucm_trt import reference as R
from ucm_trt.kernels import AttentionLaunch, paged_rerope_attention, paged_sparse_attention
from ucm_trt.kernels.attention import ATTENTION_GUARD_CODES, plan_attention
from ucm_trt.kernels.guard import IndexGuard, IndexOutOfRangeError
from ucm_trt.testing.tolerances import tolerances_for

# name: (lens, hkv, group, d, block_size, tq)
CPU_CASES = {
    "decode-g1-d64": ((37, 70, 16), 2, 1, 64, 16, 1),
    "decode-g4-d128-single-block": ((5, 90), 2, 4, 128, 16, 1),
    "decode-g8-d64-tq4": ((33, 64), 1, 8, 64, 16, 4),
    "prefill-g4-d64": ((21, 50), 2, 4, 64, 16, 21),
    "prefill-g8-d128": ((100,), 1, 8, 128, 32, 40),
    # head_dims that are not powers of two run in padded tiles with masked lanes
    "decode-g4-d80": ((37, 70), 2, 4, 80, 16, 1),
    "decode-g1-d96-tq3": ((50, 17), 2, 1, 96, 32, 3),
    "prefill-g2-d96": ((40,), 2, 2, 96, 16, 19),
    "decode-g2-d16": ((33,), 1, 2, 16, 16, 1),
}


def _selections(case, hkv, gen, device):
    nbs = case.num_blocks
    width = max(2, max(nbs) // 2)
    return {
        "none": None,
        "all": all_selection(nbs, hkv, device),
        "random": random_selection(nbs, hkv, width, gen, device, empty_row=True),
        "one-block": random_selection(nbs, hkv, 1, gen, device),
    }


def _run_sparse(case, sel, launch):
    out = nan_like(case.q)
    got = paged_sparse_attention(case.q, case.kv_pool, case.block_table, case.seq_lens, sel, out=out, launch=launch)
    assert got is out
    return got


@pytest.mark.parametrize("name", list(CPU_CASES))
def test_sparse_attention_matches_reference(name, device):
    lens, hkv, group, d, bs, tq = CPU_CASES[name]
    gen = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    case = make_paged_case(lens=lens, hkv=hkv, group=group, d=d, bs=bs, tq=tq, dtype=torch.float32,
                           device=device, gen=gen)
    for sel_name, sel in _selections(case, hkv, gen, device).items():
        ref = R.paged_sparse_attention(case.q, case.kv_pool, case.block_table, case.seq_lens, sel)
        # default tiles gather 2-4 small blocks per key tile; block_n=16 walks one block per tile (with a
        # register cap, Triton's maxnreg: the interpreter ignores it, so this only checks the launch takes it)
        for launch in (AttentionLaunch(), AttentionLaunch(num_splits=3, block_t=7, block_n=16, max_registers=128)):
            got = _run_sparse(case, sel, launch)
            assert not torch.isnan(got).any(), (sel_name, launch)
            torch.testing.assert_close(got, ref, **tolerances_for(torch.float32), msg=lambda m, s=sel_name, la=launch: f"{s} {la}: {m}")


def test_select_all_equals_dense_attention(device):
    """'Select all' through the pool equals dense causal attention on the contiguous tensors."""
    gen = torch.Generator().manual_seed(7)
    case = make_paged_case(lens=(45, 45), hkv=2, group=4, d=64, bs=16, tq=3, dtype=torch.float32,
                           device=device, gen=gen)
    got = paged_sparse_attention(case.q, case.kv_pool, case.block_table, case.seq_lens,
                                 all_selection(case.num_blocks, 2, device))
    k = torch.stack([torch.cat([case.kv_pool[p, 0] for p in case.block_table[b, :3].tolist()], 1)[:, :45]
                     for b in range(2)])
    v = torch.stack([torch.cat([case.kv_pool[p, 1] for p in case.block_table[b, :3].tolist()], 1)[:, :45]
                     for b in range(2)])
    ref = R.dense_attention(case.q, k, v)
    torch.testing.assert_close(got, ref, **tolerances_for(torch.float32))


@pytest.mark.parametrize("d", [64, 96])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_sparse_attention_half_dtypes(dtype, d, device):
    gen = torch.Generator().manual_seed(11)
    case = make_paged_case(lens=(29, 47), hkv=2, group=4, d=d, bs=16, tq=2, dtype=dtype, device=device, gen=gen)
    sel = random_selection(case.num_blocks, 2, 2, gen, device)
    got = _run_sparse(case, sel, AttentionLaunch(num_splits=2))
    assert got.dtype == dtype
    ref = R.paged_sparse_attention(case.q, case.kv_pool, case.block_table, case.seq_lens, sel)
    torch.testing.assert_close(got.float(), ref, **tolerances_for(dtype))


RERPOE_CPU = {
    # name: (lens, hkv, group, d, bs, tq, window, logn)
    "decode-g4-d64-logn": ((70, 37), 2, 4, 64, 16, 1, 24, 16),
    "decode-g1-d128": ((50,), 2, 1, 128, 16, 2, 7, None),
    "prefill-g8-d64-logn": ((60,), 1, 8, 64, 16, 30, 13, 8),
    "decode-window-covers-all": ((40,), 2, 4, 64, 16, 1, 4096, None),
    "decode-g4-d80-logn": ((53, 30), 2, 4, 80, 16, 2, 9, 16),
    "prefill-g2-d96": ((44,), 1, 2, 96, 16, 17, 11, None),
}


@pytest.mark.parametrize("name", list(RERPOE_CPU))
def test_rerope_attention_matches_reference(name, device):
    lens, hkv, group, d, bs, tq, window, logn = RERPOE_CPU[name]
    gen = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    case = make_paged_case(lens=lens, hkv=hkv, group=group, d=d, bs=bs, tq=tq, dtype=torch.float32,
                           device=device, gen=gen)
    sels = {"none": None, "random": random_selection(case.num_blocks, hkv, 3, gen, device, empty_row=True)}
    for sel_name, sel in sels.items():
        ref = R.paged_rerope_attention(case.q, case.kv_pool, case.block_table, case.seq_lens, sel,
                                       window=window, theta=10000.0, logn_training_length=logn)
        out = nan_like(case.q)
        got = paged_rerope_attention(case.q, case.kv_pool, case.block_table, case.seq_lens, sel, window=window,
                                     theta=10000.0, logn_training_length=logn, out=out,
                                     launch=AttentionLaunch(num_splits=2, block_t=8,
                                                            block_n=16 if sel_name == "none" else None))
        assert not torch.isnan(got).any()
        torch.testing.assert_close(got, ref, **tolerances_for(torch.float32), msg=lambda m, s=sel_name: f"{s}: {m}")


def test_rerope_with_large_window_is_rope_attention(device):
    """Window beyond every distance, no log-n: equals ordinary attention over rotated q and K, computed by
    the fp32 reference (not by the sparse kernel, which shares the launcher and the softmax with this one)."""
    gen = torch.Generator().manual_seed(3)
    case = make_paged_case(lens=(35,), hkv=2, group=2, d=64, bs=16, tq=1, dtype=torch.float32, device=device,
                           gen=gen, poison=False)
    got = paged_rerope_attention(case.q, case.kv_pool, case.block_table, case.seq_lens, window=1000, theta=500.0)
    rot = case.kv_pool.clone()
    for j, p in enumerate(case.block_table[0, :3].tolist()):
        pos = torch.arange(16 * j, 16 * j + 16, device=device)
        rot[p, 0] = R.apply_rope(case.kv_pool[p, 0], pos, theta=500.0)
    q_rot = R.apply_rope(case.q, torch.tensor([34], device=device), theta=500.0)
    ref = R.paged_sparse_attention(q_rot, rot, case.block_table, case.seq_lens)
    torch.testing.assert_close(got, ref, **tolerances_for(torch.float32))


# ------------------------------------------------------------------ bad input


def _small(device):
    gen = torch.Generator().manual_seed(0)
    return make_paged_case(lens=(20,), hkv=2, group=2, d=32, bs=16, tq=1, dtype=torch.float32, device=device,
                           gen=gen)


def test_bad_inputs_raise(device):
    c = _small(device)
    args = (c.q, c.kv_pool, c.block_table, c.seq_lens)
    with pytest.raises(TypeError, match="kv_pool"):
        paged_sparse_attention(c.q, c.kv_pool.half(), c.block_table, c.seq_lens)
    with pytest.raises(TypeError, match="block_table"):
        paged_sparse_attention(c.q, c.kv_pool, c.block_table.long(), c.seq_lens)
    with pytest.raises(ValueError, match="heads"):
        paged_sparse_attention(c.q[:, :3], c.kv_pool, c.block_table, c.seq_lens)
    with pytest.raises(ValueError, match=r"seq_lens\[0\] = 100"):
        paged_sparse_attention(*args[:3], torch.tensor([100], dtype=torch.int32, device=device))
    bad_table = c.block_table.clone()
    bad_table[0, 0] = 999
    with pytest.raises(ValueError, match="block_table"):
        paged_sparse_attention(c.q, c.kv_pool, bad_table, c.seq_lens)
    unsorted = torch.tensor([[[1, 0], [0, -1]]], dtype=torch.int32, device=device)
    with pytest.raises(ValueError, match="sorted"):
        paged_sparse_attention(*args, unsorted)
    gap = torch.tensor([[[-1, 0], [0, -1]]], dtype=torch.int32, device=device)
    with pytest.raises(ValueError, match="padding last"):
        paged_sparse_attention(*args, gap)
    too_big = torch.tensor([[[0, 2], [0, -1]]], dtype=torch.int32, device=device)
    with pytest.raises(ValueError, match="logical block 2"):
        paged_sparse_attention(*args, too_big)
    with pytest.raises(ValueError, match="window"):
        paged_rerope_attention(*args, window=0, theta=1e4)
    with pytest.raises(ValueError, match="logn_training_length"):
        paged_rerope_attention(*args, window=4, theta=1e4, logn_training_length=1)
    with pytest.raises(ValueError, match="num_splits"):
        AttentionLaunch(num_splits=0)
    with pytest.raises(ValueError, match=r"max_registers must be in \[24, 255\].*got 300"):
        AttentionLaunch(max_registers=300)
    odd = make_paged_case(lens=(20,), hkv=2, group=2, d=40, bs=16, tq=1, dtype=torch.float32, device=device,
                          gen=torch.Generator().manual_seed(1))
    with pytest.raises(ValueError, match="head_dim must be a multiple of 16"):
        paged_sparse_attention(odd.q, odd.kv_pool, odd.block_table, odd.seq_lens)
    with pytest.raises(TypeError, match="guard must be an IndexGuard"):
        paged_sparse_attention(*args, guard=c.seq_lens)


# ------------------------------------------------------------------ index safety without a sync


def _guard_case(device):
    gen = torch.Generator().manual_seed(5)
    case = make_paged_case(lens=(50, 70, 33), hkv=2, group=2, d=32, bs=16, tq=1, dtype=torch.float32,
                           device=device, gen=gen)
    sel = random_selection(case.num_blocks, 2, 3, gen, device)
    return case, sel


@pytest.mark.parametrize("bad", ["selection_too_big", "selection_below_minus_one", "table_entry", "seq_len"])
def test_bad_id_without_validation_is_clamped_and_flagged(bad, device):
    """validate=False with a bad id in row 1: no crash, no read outside the pool (the pool is padded
    with NaN guard blocks on both sides, so reading them would poison the output), rows 0 and 2
    unchanged, and guard.check() raises naming the op."""
    case, sel = _guard_case(device)
    n, two, hkv, bs, d = case.kv_pool.shape
    nan_pad = torch.full((8, two, hkv, bs, d), float("nan"), device=device)
    big = torch.cat([nan_pad, case.kv_pool, nan_pad])
    pool = big[8:8 + n]  # a view: memory just outside it is NaN
    good = paged_sparse_attention(case.q, pool, case.block_table, case.seq_lens, sel)
    table, seq, sel2 = case.block_table.clone(), case.seq_lens.clone(), sel.clone()
    if bad == "selection_too_big":
        sel2[1, 0, 1] = 10_000
    elif bad == "selection_below_minus_one":
        sel2[1, 1, 0] = -7
    elif bad == "table_entry":
        table[1, int(sel2[1, 0, 0])] = n + 3
        table[1, 0] = -2
    else:
        seq[1] = table.shape[1] * bs + 500
    guard = IndexGuard(device, ATTENTION_GUARD_CODES)
    out = nan_like(case.q)
    for launch in (AttentionLaunch(), AttentionLaunch(num_splits=3)):
        got = paged_sparse_attention(case.q, pool, table, seq, sel2, out=out, validate=False, guard=guard,
                                     launch=launch)
        # a clamped seq_len reads the table's unused entries (the pool's NaN null block 0): row 1 is
        # invalid then; every other case reads only real blocks
        assert not torch.isnan(got if bad != "seq_len" else got[[0, 2]]).any()
        torch.testing.assert_close(got[[0, 2]], good[[0, 2]], **tolerances_for(torch.float32))
        with pytest.raises(IndexOutOfRangeError, match="paged attention"):
            guard.check("decode step")
        guard.check("after reset")  # check() cleared the flag


def test_guard_stays_clear_on_good_input(device):
    case, sel = _guard_case(device)
    guard = IndexGuard(device, ATTENTION_GUARD_CODES)
    ref = paged_sparse_attention(case.q, case.kv_pool, case.block_table, case.seq_lens, sel)
    got = paged_sparse_attention(case.q, case.kv_pool, case.block_table, case.seq_lens, sel, validate=False,
                                 guard=guard)
    torch.testing.assert_close(got, ref)
    assert guard.value() == 0


def test_launch_rule_fills_the_gpu_and_splits_evenly():
    # batch-1 decode, 8 KV heads, 132 SMs: splits make >= 2 programs per SM
    p = plan_attention(batch=1, num_kv_heads=8, group=4, tq=1, head_dim=128, block_size=64, work_items=258,
                       sms=132, launch=AttentionLaunch())
    assert p.splits * 8 >= 2 * 132 and p.splits * p.items_per_split >= 258
    assert (p.splits - 1) * p.items_per_split < 258  # no empty split
    # batch 8 dense 32K (512 blocks): 5 splits would be 320 programs = 2.4 rounds on 132 SMs; 6 = 2.9
    p = plan_attention(batch=8, num_kv_heads=8, group=4, tq=1, head_dim=128, block_size=64, work_items=514,
                       sms=132, launch=AttentionLaunch())
    assert p.splits == 6 and 8 * 8 * p.splits / (-(-8 * 8 * p.splits // 132) * 132) > 0.95
    # small blocks: several per key tile
    assert plan_attention(batch=1, num_kv_heads=8, group=4, tq=1, head_dim=128, block_size=16, work_items=99,
                          sms=132, launch=AttentionLaunch()).block_n == 64
    assert p.block_m == 16 and p.n_qtiles == 1
    # batch 64 fills the GPU alone: one split
    assert plan_attention(batch=64, num_kv_heads=8, group=4, tq=1, head_dim=128, block_size=64, work_items=258,
                          sms=132, launch=AttentionLaunch()).splits == 1
    # prefill: 64-row tiles
    p = plan_attention(batch=1, num_kv_heads=8, group=4, tq=500, head_dim=96, block_size=16, work_items=40,
                       sms=132, launch=AttentionLaunch())
    assert (p.block_t, p.block_m, p.block_n) == (16, 64, 64)
    # a register cap is the launch's (None: the compiler's choice), and changes nothing else of the plan
    assert p.max_registers is None
    capped = plan_attention(batch=1, num_kv_heads=8, group=4, tq=500, head_dim=96, block_size=16, work_items=40,
                            sms=132, launch=AttentionLaunch(max_registers=128))
    assert capped.max_registers == 128 and dataclasses.replace(capped, max_registers=None) == p


# ------------------------------------------------------------------ GPU tier


def _gpu_selection(nbs, hkv, frac, gen, device, *, sink=1, local=2):
    """Sorted selection of ~frac of each row's blocks with sink + local always in (as retrieval gives)."""
    width = max(sink + local, int(max(nbs) * frac))
    sel = torch.full((len(nbs), hkv, width), -1, dtype=torch.int32)
    for b, nb in enumerate(nbs):
        for h in range(hkv):
            forced = set(range(min(sink, nb))) | set(range(max(0, nb - local), nb))
            rest = [i for i in torch.randperm(nb, generator=gen).tolist() if i not in forced]
            ids = sorted(forced | set(rest[: max(0, min(width, nb) - len(forced))]))
            sel[b, h, : len(ids)] = torch.tensor(ids, dtype=torch.int32)
    return sel.to(device)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bs", [16, 64, 128])
@pytest.mark.parametrize("group,tq", [(4, 1), (8, 1), (1, 4)])
def test_gpu_sparse_decode(dtype, bs, group, tq):
    dev = torch.device("cuda")
    gen = torch.Generator().manual_seed(bs * 100 + group * 10 + tq)
    lens = (8191, 5000, 12345, 777)
    case = make_paged_case(lens=lens, hkv=8 if group < 8 else 4, group=group, d=128, bs=bs, tq=tq, dtype=dtype,
                           device=dev, gen=gen)
    hkv = case.kv_pool.shape[2]
    for sel in (_gpu_selection(case.num_blocks, hkv, 1 / 8, gen, dev), None):
        ref = R.paged_sparse_attention(case.q, case.kv_pool, case.block_table, case.seq_lens, sel)
        got = _run_sparse(case, sel, AttentionLaunch())
        torch.testing.assert_close(got.float(), ref, **tolerances_for(dtype))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("d", [64, 128])
def test_gpu_sparse_prefill(dtype, d):
    dev = torch.device("cuda")
    gen = torch.Generator().manual_seed(d)
    case = make_paged_case(lens=(3000, 1537), hkv=8, group=4, d=d, bs=64, tq=517, dtype=dtype, device=dev, gen=gen)
    for sel in (_gpu_selection(case.num_blocks, 8, 1 / 4, gen, dev), None):
        ref = R.paged_sparse_attention(case.q, case.kv_pool, case.block_table, case.seq_lens, sel)
        got = _run_sparse(case, sel, AttentionLaunch())
        torch.testing.assert_close(got.float(), ref, **tolerances_for(dtype))


@pytest.mark.gpu
@pytest.mark.parametrize("bs", [64, 16])
@pytest.mark.parametrize("d", [128, 96])
def test_gpu_odd_head_dims_and_small_blocks(bs, d):
    """head_dim 96 (padded tile) and block 16 (4 blocks per key tile) at real sizes, sparse and ReRoPE."""
    dev = torch.device("cuda")
    gen = torch.Generator().manual_seed(bs + d)
    case = make_paged_case(lens=(6000, 3001), hkv=8, group=4, d=d, bs=bs, tq=1, dtype=torch.bfloat16, device=dev,
                           gen=gen)
    sel = _gpu_selection(case.num_blocks, 8, 1 / 8, gen, dev)
    ref = R.paged_sparse_attention(case.q, case.kv_pool, case.block_table, case.seq_lens, sel)
    torch.testing.assert_close(_run_sparse(case, sel, AttentionLaunch()).float(), ref,
                               **tolerances_for(torch.bfloat16))
    ref = R.paged_rerope_attention(case.q, case.kv_pool, case.block_table, case.seq_lens, sel, window=1024,
                                   theta=1e6, logn_training_length=4096)
    got = paged_rerope_attention(case.q, case.kv_pool, case.block_table, case.seq_lens, sel, window=1024, theta=1e6,
                                 logn_training_length=4096, out=nan_like(case.q))
    torch.testing.assert_close(got.float(), ref, **tolerances_for(torch.bfloat16))


@pytest.mark.gpu
def test_gpu_guard_flags_without_sync_and_keeps_good_rows():
    dev = torch.device("cuda")
    gen = torch.Generator().manual_seed(17)
    case = make_paged_case(lens=(5000, 7000), hkv=8, group=4, d=128, bs=64, tq=1, dtype=torch.bfloat16, device=dev,
                           gen=gen)
    sel = _gpu_selection(case.num_blocks, 8, 1 / 8, gen, dev)
    good = paged_sparse_attention(case.q, case.kv_pool, case.block_table, case.seq_lens, sel)
    bad = sel.clone()
    bad[1, 3, 2] = 1_000_000
    guard = IndexGuard(dev, ATTENTION_GUARD_CODES)
    got = paged_sparse_attention(case.q, case.kv_pool, case.block_table, case.seq_lens, bad, validate=False,
                                 guard=guard)
    torch.testing.assert_close(got[0], good[0])
    with pytest.raises(IndexOutOfRangeError, match="selection id"):
        guard.check("gpu step")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("tq", [1, 300])
def test_gpu_rerope(dtype, tq):
    dev = torch.device("cuda")
    gen = torch.Generator().manual_seed(tq)
    case = make_paged_case(lens=(9000, 4100), hkv=8, group=4, d=128, bs=64, tq=tq, dtype=dtype, device=dev, gen=gen)
    for sel in (_gpu_selection(case.num_blocks, 8, 1 / 4, gen, dev), None):
        ref = R.paged_rerope_attention(case.q, case.kv_pool, case.block_table, case.seq_lens, sel,
                                       window=2048, theta=1e6, logn_training_length=4096)
        out = nan_like(case.q)
        got = paged_rerope_attention(case.q, case.kv_pool, case.block_table, case.seq_lens, sel, window=2048,
                                     theta=1e6, logn_training_length=4096, out=out)
        torch.testing.assert_close(got.float(), ref, **tolerances_for(dtype))


def test_launch_rule_padded_dense_decode_tile():
    """Dense decode over a padded head_dim (80, 96) with blocks >= 64 takes the H100-swept tile (128 keys,
    8 warps, 3 stages); a selection, head_dim 128, small blocks, prefill or an explicit launch keep theirs."""
    def plan(**kw):
        args = dict(batch=8, num_kv_heads=8, group=4, tq=1, head_dim=80, block_size=64, work_items=2049, sms=132,
                    launch=AttentionLaunch(), dense=True)
        args.update(kw)
        p = plan_attention(**args)
        return p.block_n, p.num_warps, p.num_stages

    assert plan() == plan(head_dim=96) == (128, 8, 3)
    assert plan(dense=False) == plan(head_dim=128) == plan(block_size=32) == (64, 4, 2)
    assert plan(tq=64) == (64, 4, 2)  # a prefill chunk
    assert plan(launch=AttentionLaunch(num_warps=4, num_stages=2, block_n=64)) == (64, 4, 2)
    assert plan(launch=AttentionLaunch(num_warps=2)) == (128, 2, 3)  # only what the launch leaves open


@pytest.mark.parametrize("d", [80, 96])
def test_padded_dense_decode_tile_matches_reference(d):
    """The padded dense decode tile (two 64-token blocks per 128-key tile, masked lanes 80/96 of 128)
    against the fp32 reference, with a partial last block and a one-block sequence."""
    gen = torch.Generator().manual_seed(d)
    case = make_paged_case(lens=(300, 64, 1), hkv=2, group=4, d=d, bs=64, tq=1, dtype=torch.float32,
                           device=torch.device("cpu"), gen=gen)
    p = plan_attention(batch=3, num_kv_heads=2, group=4, tq=1, head_dim=d, block_size=64,
                       work_items=case.block_table.shape[1] + 2, sms=4, launch=AttentionLaunch(), dense=True)
    assert (p.block_n, p.num_warps, p.num_stages) == (128, 8, 3)
    ref = R.paged_sparse_attention(case.q, case.kv_pool, case.block_table, case.seq_lens, None)
    got = paged_sparse_attention(case.q, case.kv_pool, case.block_table, case.seq_lens, None, out=nan_like(case.q))
    torch.testing.assert_close(got.float(), ref, **tolerances_for(torch.float32))
