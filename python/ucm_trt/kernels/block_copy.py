"""Copy a list of KV blocks between pools in one launch: ``dst[dst_ids[i]] = src[src_ids[i]]``.

The offload runtime moves blocks between the device pool of a layer and its host block store:
a delta prefetch loads the blocks a new selection needs (host -> device), the write-back saves
blocks that filled (device -> host). One ``copy_`` per block costs a driver call each (thousands
per step when a selection changes a lot); this kernel moves all blocks of a layer in one launch.

The host store is pinned memory (``cudaHostAlloc``), which CUDA maps into the device's unified
address space: the kernel reads (or writes) it directly over the bus, so either side may be the
pinned host tensor. Grid: ``(blocks, chunks of CHUNK elements)``; each program streams one chunk
of one block with wide loads. Block ids are int64 on the kernel's device.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ucm_trt._validation import check_tensor

__all__ = ["copy_blocks"]

CHUNK = 4096


@triton.jit
def _copy_blocks_kernel(src_ptr, dst_ptr, src_ids_ptr, dst_ids_ptr, block_elems, CHUNK: tl.constexpr):
    i = tl.program_id(0)
    c = tl.program_id(1)
    s = tl.load(src_ids_ptr + i).to(tl.int64)
    d = tl.load(dst_ids_ptr + i).to(tl.int64)
    offs = c * CHUNK + tl.arange(0, CHUNK)
    m = offs < block_elems
    x = tl.load(src_ptr + s * block_elems + offs, mask=m)
    tl.store(dst_ptr + d * block_elems + offs, x, mask=m)


def _as_bits(t: torch.Tensor) -> torch.Tensor:
    # move raw bits (no conversion): same-size integer view
    return t.view({1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def copy_blocks(src: torch.Tensor, dst: torch.Tensor, src_ids: torch.Tensor, dst_ids: torch.Tensor) -> None:
    """``dst[dst_ids[i]] = src[src_ids[i]]`` for every ``i``, in one launch on the current stream.

    ``src``/``dst``: contiguous pools ``[num_blocks, ...]`` of the same dtype and block shape; one
    may be a pinned host tensor when the other is on a CUDA device (read / written over the bus).
    ``src_ids``/``dst_ids``: int64 ``[n]`` on the kernel's device (the CUDA device, or the CPU under
    Triton's interpreter). Ids must be in range and ``dst_ids`` distinct (not checked on the device:
    that would need a host sync; the runtime's allocator guarantees it).
    """
    check_tensor("src", src)
    check_tensor("dst", dst)
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
    n = src_ids.shape[0]
    if n == 0:
        return
    block_elems = src[0].numel()
    grid = (n, triton.cdiv(block_elems, CHUNK))
    _copy_blocks_kernel[grid](_as_bits(src), _as_bits(dst), src_ids.contiguous(), dst_ids.contiguous(),
                              block_elems, CHUNK=CHUNK, num_warps=4)
