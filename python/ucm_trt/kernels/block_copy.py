"""Copy a list of KV blocks between pools in one launch: ``dst[dst_ids[i]] = src[src_ids[i]]``.

The offload runtime moves blocks between the device pool of a layer and its host block store:
a delta prefetch loads the blocks a new selection needs (host -> device), the write-back saves
blocks that filled (device -> host). One ``copy_`` per block costs a driver call each (thousands
per step when a selection changes a lot); this kernel moves all blocks of a layer in one launch.

The host store is pinned memory (``cudaHostAlloc``), which CUDA maps into the device's unified
address space: the kernel reads (or writes) it directly over the bus, so either side may be the
pinned host tensor. Grid: ``(blocks, chunks of CHUNK elements)``; each program streams one chunk
of one block with wide loads. Block ids are int64 on the kernel's device.

Index safety without a sync (issue 17): a pair whose ``src_ids`` or ``dst_ids`` entry is outside its
pool is skipped (nothing read or written for it; the other pairs are copied). With an
:class:`~ucm_trt.kernels.guard.IndexGuard` the kernel also sets the guard's flag
(:data:`GUARD_CODES`), which the host reads at its next natural sync.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ucm_trt._validation import check_tensor
from ucm_trt.kernels.guard import IndexGuard
from ucm_trt.kernels.guard_flag import raise_flag

__all__ = ["GUARD_CODES", "copy_blocks"]

CHUNK = 4096

GUARD_BAD_SRC_ID = 16
GUARD_BAD_DST_ID = 17
#: IndexGuard flag values this module's kernel sets, and what they mean.
GUARD_CODES = {
    GUARD_BAD_SRC_ID: "copy_blocks: a src_ids entry is outside the source pool; that block was not copied",
    GUARD_BAD_DST_ID: "copy_blocks: a dst_ids entry is outside the destination pool; that block was not copied",
}
_BAD_SRC_ID = tl.constexpr(GUARD_BAD_SRC_ID)
_BAD_DST_ID = tl.constexpr(GUARD_BAD_DST_ID)


@triton.jit
def _copy_blocks_kernel(src_ptr, dst_ptr, src_ids_ptr, dst_ids_ptr, flag_ptr, block_elems, n_src, n_dst,
                        CHUNK: tl.constexpr, GUARD: tl.constexpr):
    i = tl.program_id(0)
    c = tl.program_id(1)
    s = tl.load(src_ids_ptr + i).to(tl.int64)
    d = tl.load(dst_ids_ptr + i).to(tl.int64)
    s_ok = (s >= 0) & (s < n_src)
    d_ok = (d >= 0) & (d < n_dst)
    if GUARD:
        first = c == 0
        raise_flag(flag_ptr, _BAD_SRC_ID, mask=first & (s_ok == 0))
        raise_flag(flag_ptr, _BAD_DST_ID, mask=first & (d_ok == 0))
    s = tl.where(s_ok, s, 0)
    d = tl.where(d_ok, d, 0)
    offs = c * CHUNK + tl.arange(0, CHUNK)
    m = offs < tl.where(s_ok & d_ok, block_elems, 0)  # a bad pair copies nothing
    x = tl.load(src_ptr + s * block_elems + offs, mask=m)
    tl.store(dst_ptr + d * block_elems + offs, x, mask=m)


def _as_bits(t: torch.Tensor) -> torch.Tensor:
    # move raw bits (no conversion): same-size integer view
    return t.view({1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def copy_blocks(
    src: torch.Tensor,
    dst: torch.Tensor,
    src_ids: torch.Tensor,
    dst_ids: torch.Tensor,
    *,
    guard: IndexGuard | None = None,
) -> None:
    """``dst[dst_ids[i]] = src[src_ids[i]]`` for every ``i``, in one launch on the current stream.

    ``src``/``dst``: contiguous pools ``[num_blocks, ...]`` of the same dtype and block shape; one
    may be a pinned host tensor when the other is on a CUDA device (read / written over the bus).
    ``src_ids``/``dst_ids``: int64 ``[n]`` on the kernel's device (the CUDA device, or the CPU under
    Triton's interpreter). ``dst_ids`` must be distinct (the runtime's allocator guarantees it; not
    checked, that would need a host sync). An id outside its pool is skipped, never dereferenced, and
    sets ``guard``'s flag when an :class:`~ucm_trt.kernels.guard.IndexGuard` is given.
    """
    if guard is not None and not isinstance(guard, IndexGuard):
        raise TypeError(f"guard must be an IndexGuard or None, got {type(guard).__name__}")
    for name, t in (("src", src), ("dst", dst)):
        check_tensor(name, t)
        if t.dim() < 1:
            raise ValueError(f"{name} must be a pool [num_blocks, ...], got a 0-d tensor")
    if src.dtype != dst.dtype or src.shape[1:] != dst.shape[1:]:
        raise ValueError(
            f"src and dst must hold blocks of the same dtype and shape, got {src.dtype} {tuple(src.shape)} "
            f"and {dst.dtype} {tuple(dst.shape)}"
        )
    for name, t in (("src", src), ("dst", dst)):
        if not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous")
    cuda = [t for t in (src, dst) if t.device.type == "cuda"]
    dev = cuda[0].device if cuda else torch.device("cpu")
    for name, t in (("src", src), ("dst", dst)):
        if t.device.type == "cpu" and cuda and not t.is_pinned():
            raise ValueError(f"{name} is a host tensor that is not pinned; the kernel can only reach pinned host memory")
        if t.device.type == "cuda" and t.device != dev:
            raise ValueError(f"src and dst are on different CUDA devices ({src.device}, {dst.device})")
    check_tensor("src_ids", src_ids, ndim=1, dtypes=(torch.int64,))
    check_tensor("dst_ids", dst_ids, dtypes=(torch.int64,), shape=(src_ids.shape[0],))
    for name, t in (("src_ids", src_ids), ("dst_ids", dst_ids)):
        if t.device != dev:
            raise ValueError(f"{name} must be on {dev} (the kernel's device), got {t.device}")
    if guard is not None and guard.flag.device != dev:
        raise ValueError(f"guard.flag must be on {dev} (the kernel's device), got {guard.flag.device}")
    n = src_ids.shape[0]
    block_elems = math.prod(src.shape[1:])
    if n == 0 or block_elems == 0:
        return
    if guard is not None:
        for code, words in GUARD_CODES.items():
            guard.codes.setdefault(code, words)
    grid = (n, triton.cdiv(block_elems, CHUNK))
    _copy_blocks_kernel[grid](_as_bits(src), _as_bits(dst), src_ids.contiguous(), dst_ids.contiguous(),
                              src_ids if guard is None else guard.flag, block_elems, src.shape[0], dst.shape[0],
                              CHUNK=CHUNK, GUARD=guard is not None, num_warps=4)
