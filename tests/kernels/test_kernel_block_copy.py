"""copy_blocks: one launch moves a list of KV blocks between pools (device <-> pinned host store)."""

from __future__ import annotations

import pytest
import torch

from ucm_trt.kernels.block_copy import copy_blocks

from .conftest import DEVICE


def _pool(n, dtype, device, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 2, 3, 16, 32, generator=g).to(dtype).to(device)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n", [1, 7, 40])
def test_copy_blocks_matches_indexing_with_permuted_ids(dtype, n):
    src = _pool(64, dtype, DEVICE, 0)
    dst = _pool(50, dtype, DEVICE, 1)
    g = torch.Generator().manual_seed(n)
    src_ids = torch.randint(0, 64, (n,), generator=g)  # repeats allowed on the source side
    dst_ids = torch.randperm(50, generator=g)[:n]  # distinct destinations, any order
    want = dst.clone()
    want[dst_ids] = src[src_ids]
    copy_blocks(src, dst, src_ids.to(DEVICE), dst_ids.to(DEVICE))
    assert torch.equal(dst, want)  # bit-exact, untouched blocks unchanged


def test_copy_blocks_no_ids_is_a_no_op():
    src, dst = _pool(4, torch.float16, DEVICE, 0), _pool(4, torch.float16, DEVICE, 1)
    before = dst.clone()
    empty = torch.zeros(0, dtype=torch.int64, device=DEVICE)
    copy_blocks(src, dst, empty, empty)
    assert torch.equal(dst, before)


def test_copy_blocks_rejects_bad_input():
    src, dst = _pool(4, torch.float16, DEVICE, 0), _pool(4, torch.float16, DEVICE, 1)
    ids = torch.tensor([0, 1], device=DEVICE)
    with pytest.raises(ValueError, match="same dtype and shape"):
        copy_blocks(src, dst.float(), ids, ids)
    with pytest.raises(ValueError, match="same dtype and shape"):
        copy_blocks(src, dst[:, :1].contiguous(), ids, ids)
    with pytest.raises(ValueError, match="dst must be contiguous"):
        copy_blocks(src, dst.transpose(3, 4).contiguous().transpose(3, 4), ids, ids)
    with pytest.raises((TypeError, ValueError), match="src_ids"):
        copy_blocks(src, dst, ids.int(), ids)
    with pytest.raises(ValueError, match="dst_ids"):
        copy_blocks(src, dst, ids, ids[:1])


@pytest.mark.gpu
@pytest.mark.parametrize("direction", ["host_to_device", "device_to_host"])
def test_copy_blocks_reaches_pinned_host_memory(direction):
    """The runtime's delta prefetch (pinned store -> device pool) and write-back (device -> store)."""
    host = _pool(300, torch.bfloat16, "cpu", 0).pin_memory()
    dev = _pool(200, torch.bfloat16, "cuda", 1)
    g = torch.Generator().manual_seed(2)
    h_ids = torch.randperm(300, generator=g)[:150]
    d_ids = torch.randperm(200, generator=g)[:150]
    if direction == "host_to_device":
        want = dev.clone()
        want[d_ids.cuda()] = host[h_ids].cuda()
        copy_blocks(host, dev, h_ids.cuda(), d_ids.cuda())
        torch.cuda.synchronize()
        assert torch.equal(dev, want)
    else:
        want = host.clone()
        want[h_ids] = dev[d_ids.cuda()].cpu()
        copy_blocks(dev, host, d_ids.cuda(), h_ids.cuda())
        torch.cuda.synchronize()
        assert torch.equal(host, want)
    unpinned = _pool(300, torch.bfloat16, "cpu", 0)
    with pytest.raises(ValueError, match="not pinned"):
        copy_blocks(unpinned, dev, h_ids.cuda(), d_ids.cuda())


def test_copy_blocks_skips_and_flags_out_of_range_ids():
    """Issue 17: a bad id must not crash the process (it was exit 139) nor touch memory outside the pools."""
    from ucm_trt.kernels.guard import IndexGuard, IndexOutOfRangeError

    src = _pool(6, torch.float16, DEVICE, 0)
    dst = _pool(5, torch.float16, DEVICE, 1)
    src_ids = torch.tensor([2, 6, 0, -1, 5, 3], device=DEVICE)  # 6 and -1 are outside src
    dst_ids = torch.tensor([0, 1, 2, 3, 99, 4], device=DEVICE)  # 99 is outside dst
    want = dst.clone()
    for s, d in ((2, 0), (0, 2), (3, 4)):
        want[d] = src[s]
    guard = IndexGuard(DEVICE)
    copy_blocks(src, dst, src_ids, dst_ids, guard=guard)
    assert torch.equal(dst, want), "good pairs are copied, bad pairs skipped"
    with pytest.raises(IndexOutOfRangeError, match="copy_blocks: a dst_ids entry is outside the destination pool"):
        guard.check("write-back")
    guard.check("next step")  # reset by check()
    copy_blocks(src, dst, torch.tensor([7], device=DEVICE), torch.tensor([0], device=DEVICE), guard=guard)
    with pytest.raises(IndexOutOfRangeError, match="copy_blocks: a src_ids entry"):
        guard.check("prefetch")
    before = dst.clone()
    copy_blocks(src, dst, torch.tensor([-3], device=DEVICE), torch.tensor([10**9], device=DEVICE))  # no guard
    assert torch.equal(dst, before)
    with pytest.raises(TypeError, match="guard must be an IndexGuard"):
        copy_blocks(src, dst, src_ids, dst_ids, guard=object())
