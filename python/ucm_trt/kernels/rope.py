"""Delta-RoPE: rotate the cached (already rotated) K of given physical blocks in place.

Blend moves reused KV to new positions; RoPE rotations compose, so rotating by the position
offset fixes K without the un-rotated keys (NeoX half rotation, HF ``rotate_half``). Angles are
formed in float64 as turns, reduced modulo one turn, then turned into fp32 radians for the
sine/cosine, so offsets of 128K+ keep fp32 accuracy.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ucm_trt._validation import check_same_device, check_tensor
from ucm_trt.kernels._common import (
    KERNEL_FLOAT_DTYPES,
    check_block_size,
    check_bool,
    check_float,
    check_last_dim_contiguous,
    is_pow2,
)


@triton.jit
def _delta_rope_kernel(
    pool_ptr, ids_ptr, off_ptr, turns_ptr,
    stride_pn, stride_ph, stride_pt,
    HALF: tl.constexpr, BS: tl.constexpr,
):
    n = tl.program_id(0)
    h = tl.program_id(1)
    phys = tl.load(ids_ptr + n).to(tl.int64)
    off = tl.load(off_ptr + n).to(tl.float64)
    dh = tl.arange(0, HALF)
    # turns = offset * inv_freq / (2 pi) in float64; keep the fraction, then radians in fp32
    turns = off * tl.load(turns_ptr + dh)
    frac = (turns - tl.floor(turns)).to(tl.float32)
    ang32 = frac * 6.283185307179586
    c = tl.cos(ang32)[None, :]
    s = tl.sin(ang32)[None, :]
    tok = tl.arange(0, BS)
    ptrs = pool_ptr + phys * stride_pn + h * stride_ph + tok[:, None] * stride_pt + dh[None, :]
    k1 = tl.load(ptrs).to(tl.float32)
    k2 = tl.load(ptrs + HALF).to(tl.float32)
    dt = pool_ptr.dtype.element_ty
    tl.store(ptrs, (k1 * c - k2 * s).to(dt))
    tl.store(ptrs + HALF, (k2 * c + k1 * s).to(dt))


def delta_rope_blocks_(
    kv_pool: torch.Tensor,
    block_ids: torch.Tensor,
    offsets: torch.Tensor,
    *,
    theta: float,
    validate: bool = True,
) -> torch.Tensor:
    """Rotate K of physical blocks ``block_ids`` (int32 ``[N]``, distinct) by ``offsets`` (int32/int64 ``[N]``
    positions, may be negative), all heads and all slots of each block, in place. Returns ``kv_pool``."""
    check_bool("validate", validate)
    theta = check_float("theta", theta)
    check_tensor("kv_pool", kv_pool, ndim=5, dtypes=KERNEL_FLOAT_DTYPES)
    nblocks, two, hkv, bs, d = kv_pool.shape
    if two != 2:
        raise ValueError(f"kv_pool must have shape [num_blocks, 2, Hkv, block_size, D], got {tuple(kv_pool.shape)}")
    check_block_size("kv_pool", bs)
    if not (is_pow2(d) and 2 <= d <= 512):
        raise ValueError(f"kv_pool head_dim must be an even power of two <= 512, got {d}")
    check_last_dim_contiguous("kv_pool", kv_pool)
    check_tensor("block_ids", block_ids, ndim=1, dtypes=(torch.int32,))
    n = block_ids.shape[0]
    check_tensor("offsets", offsets, dtypes=(torch.int32, torch.int64), shape=(n,))
    check_same_device(kv_pool=kv_pool, block_ids=block_ids, offsets=offsets)
    if validate and n:
        lo, hi = int(block_ids.min()), int(block_ids.max())
        if lo < 0 or hi >= nblocks:
            raise ValueError(f"block_ids must be in [0, {nblocks}) (kv_pool num_blocks), got range [{lo}, {hi}]")
        if int(torch.unique(block_ids).numel()) != n:
            raise ValueError(f"block_ids must be distinct (each block rotated once), got {block_ids.tolist()}")
    if n == 0:
        return kv_pool
    half = d // 2
    inv_freq = theta ** (-torch.arange(0, d, 2, dtype=torch.float64, device=kv_pool.device) / d)
    turns_per_pos = inv_freq / (2.0 * math.pi)
    _delta_rope_kernel[(n, hkv)](
        kv_pool, block_ids.contiguous(), offsets.contiguous(), turns_per_pos,
        kv_pool.stride(0), kv_pool.stride(2), kv_pool.stride(3),
        HALF=half, BS=bs, num_warps=4,
    )
    return kv_pool
