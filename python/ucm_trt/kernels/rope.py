"""Delta-RoPE: rotate the cached (already rotated) K of given physical blocks in place.

Blend moves reused KV to new positions; RoPE rotations compose, so rotating by the position
offset fixes K without the un-rotated keys (NeoX half rotation, HF ``rotate_half``). Angles are
formed in float64 as turns, reduced modulo one turn, then turned into fp32 radians for the
sine/cosine, so offsets of 128K+ keep fp32 accuracy. A head_dim that is not a power of two (80,
96, ...) runs in the next power-of-two tile of ``D/2`` lanes with the extra lanes masked.

Index safety without a sync (issue 17): with ``validate=False`` a ``block_ids`` entry outside the
pool is skipped (never dereferenced); with an :class:`~ucm_trt.kernels.guard.IndexGuard` the kernel
also sets the guard's flag (:data:`GUARD_CODES`).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ucm_trt._validation import check_same_device, check_tensor
from ucm_trt.kernels._common import (
    KERNEL_FLOAT_DTYPES,
    check_bool,
    check_float,
    check_last_dim_contiguous,
    next_pow2,
)
from ucm_trt.kernels.guard import IndexGuard
from ucm_trt.kernels.guard_flag import raise_flag
from ucm_trt.limits import check_block_size, check_head_dim

__all__ = ["GUARD_CODES", "delta_rope_blocks_"]

GUARD_BAD_BLOCK_ID = 64
#: IndexGuard flag values this module's kernel sets, and what they mean.
GUARD_CODES = {GUARD_BAD_BLOCK_ID: "delta_rope_blocks_: a block_ids entry is outside the pool; that block was not rotated"}
_BAD_BLOCK_ID = tl.constexpr(GUARD_BAD_BLOCK_ID)


@triton.jit
def _delta_rope_kernel(
    pool_ptr, ids_ptr, off_ptr, turns_ptr, flag_ptr,
    stride_pn, stride_ph, stride_pt, NUM_PHYS,
    HALF: tl.constexpr, HP: tl.constexpr, BS: tl.constexpr, GUARD: tl.constexpr,
):
    n = tl.program_id(0)
    h = tl.program_id(1)
    phys = tl.load(ids_ptr + n).to(tl.int64)
    ok = (phys >= 0) & (phys < NUM_PHYS)
    if GUARD:
        raise_flag(flag_ptr, _BAD_BLOCK_ID, mask=(ok == 0) & (h == 0))
    phys = tl.where(ok, phys, 0)
    off = tl.load(off_ptr + n).to(tl.float64)
    dh = tl.arange(0, HP)
    lane_ok = dh < tl.where(ok, HALF, 0)
    # turns = offset * inv_freq / (2 pi) in float64; keep the fraction, then radians in fp32
    turns = off * tl.load(turns_ptr + dh, mask=dh < HALF, other=0.0)
    frac = (turns - tl.floor(turns)).to(tl.float32)
    ang32 = frac * 6.283185307179586
    c = tl.cos(ang32)[None, :]
    s = tl.sin(ang32)[None, :]
    tok = tl.arange(0, BS)
    ptrs = pool_ptr + phys * stride_pn + h * stride_ph + tok[:, None] * stride_pt + dh[None, :]
    m = lane_ok[None, :]
    k1 = tl.load(ptrs, mask=m, other=0.0).to(tl.float32)
    k2 = tl.load(ptrs + HALF, mask=m, other=0.0).to(tl.float32)
    dt = pool_ptr.dtype.element_ty
    tl.store(ptrs, (k1 * c - k2 * s).to(dt), mask=m)
    tl.store(ptrs + HALF, (k2 * c + k1 * s).to(dt), mask=m)


def delta_rope_blocks_(
    kv_pool: torch.Tensor,
    block_ids: torch.Tensor,
    offsets: torch.Tensor,
    *,
    theta: float,
    validate: bool = True,
    guard: IndexGuard | None = None,
) -> torch.Tensor:
    """Rotate K of physical blocks ``block_ids`` (int32 ``[N]``, distinct) by ``offsets`` (int32/int64 ``[N]``
    positions, may be negative), all heads and all slots of each block, in place. Returns ``kv_pool``.

    ``validate`` checks the ids on the host (a sync); without it an out-of-range id is skipped on the
    device and flagged in ``guard`` (an :class:`~ucm_trt.kernels.guard.IndexGuard`) when one is given."""
    check_bool("validate", validate)
    if guard is not None and not isinstance(guard, IndexGuard):
        raise TypeError(f"guard must be an IndexGuard or None, got {type(guard).__name__}")
    theta = check_float("theta", theta)
    check_tensor("kv_pool", kv_pool, ndim=5, dtypes=KERNEL_FLOAT_DTYPES)
    nblocks, two, hkv, bs, d = kv_pool.shape
    if two != 2:
        raise ValueError(f"kv_pool must have shape [num_blocks, 2, Hkv, block_size, D], got {tuple(kv_pool.shape)}")
    check_block_size("kv_pool", bs)
    check_head_dim("kv_pool", d)
    check_last_dim_contiguous("kv_pool", kv_pool)
    check_tensor("block_ids", block_ids, ndim=1, dtypes=(torch.int32,))
    n = block_ids.shape[0]
    check_tensor("offsets", offsets, dtypes=(torch.int32, torch.int64), shape=(n,))
    check_same_device(kv_pool=kv_pool, block_ids=block_ids, offsets=offsets,
                      guard=None if guard is None else guard.flag)
    if validate and n:
        lo, hi = int(block_ids.min()), int(block_ids.max())
        if lo < 0 or hi >= nblocks:
            raise ValueError(f"block_ids must be in [0, {nblocks}) (kv_pool num_blocks), got range [{lo}, {hi}]")
        if int(torch.unique(block_ids).numel()) != n:
            raise ValueError(f"block_ids must be distinct (each block rotated once), got {block_ids.tolist()}")
    if n == 0 or hkv == 0:
        return kv_pool
    if guard is not None:
        for code, words in GUARD_CODES.items():
            guard.codes.setdefault(code, words)
    half = d // 2
    inv_freq = theta ** (-torch.arange(0, d, 2, dtype=torch.float64, device=kv_pool.device) / d)
    turns_per_pos = inv_freq / (2.0 * math.pi)
    _delta_rope_kernel[(n, hkv)](
        kv_pool, block_ids.contiguous(), offsets.contiguous(), turns_per_pos,
        block_ids if guard is None else guard.flag,
        kv_pool.stride(0), kv_pool.stride(2), kv_pool.stride(3), nblocks,
        HALF=half, HP=next_pow2(half), BS=bs, GUARD=guard is not None, num_warps=4,
    )
    return kv_pool
