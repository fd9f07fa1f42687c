"""KV append into the paged pool + block representation / hash-code update, in one pass.

Program ``(b, kv_head, i)`` owns the ``i``-th logical block touched by sequence ``b``'s new
tokens. It writes the new K/V of that block by slot (block table + position), then
recomputes the block's representations from the full block held in registers (old tokens
read from the pool, new ones from the inputs, so nothing is read back after being written):

* ``block_mean``  ``[num_blocks, Hkv, D]``: mean of K over the block's valid tokens;
* ``block_min`` / ``block_max`` ``[num_blocks, Hkv, D]``: element-wise min / max of K (Quest);
* ``hash_codes`` ``[num_blocks, Hkv, block_size, bits // 8]`` uint8: per-token
  ``sign(k . W) > 0`` bits packed little-endian (bit ``j`` of byte ``i`` is bit ``8 i + j``),
  written for the new tokens only.

Representations are computed from K as stored (rounded to the pool dtype), in fp32. A head_dim
that is not a power of two (80, 96, ...) runs in the next power-of-two tile with the extra lanes
masked.

Index safety without a sync (issue 17): a block-table entry outside ``[0, num_blocks)`` is never
written (that block's new tokens are dropped); a sequence whose ``num_new`` / ``seq_lens`` are out of
range (``num_new`` in ``[0, min(T, seq_len)]``, ``seq_len`` within the table) is not written at all.
With an :class:`~ucm_trt.kernels.guard.IndexGuard` the kernel also sets the guard's flag
(:data:`GUARD_CODES`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ucm_trt._validation import check_same_device, check_tensor
from ucm_trt.kernels._common import (
    KERNEL_FLOAT_DTYPES,
    check_block_table_contents,
    check_bool,
    check_last_dim_contiguous,
    is_pow2,
    next_pow2,
)
from ucm_trt.kernels.guard import IndexGuard
from ucm_trt.kernels.guard_flag import raise_flag
from ucm_trt.kernels.hash_encode import pack_sign_bits
from ucm_trt.limits import check_block_size, check_head_dim

__all__ = ["GUARD_CODES", "append_kv"]

GUARD_BAD_BLOCK_ID = 32
GUARD_BAD_LENGTHS = 33
#: IndexGuard flag values this module's kernel sets, and what they mean.
GUARD_CODES = {
    GUARD_BAD_BLOCK_ID: "append_kv: a block_table entry in use is outside [0, num_blocks); that block was not written",
    GUARD_BAD_LENGTHS: "append_kv: num_new / seq_lens out of range (num_new in [0, min(T, seq_len)], seq_len within "
                       "the block table); that sequence was not written",
}
_BAD_BLOCK_ID = tl.constexpr(GUARD_BAD_BLOCK_ID)
_BAD_LENGTHS = tl.constexpr(GUARD_BAD_LENGTHS)


@triton.jit
def _append_kv_kernel(
    k_ptr, v_ptr, pool_ptr, bt_ptr, seqlen_ptr, nnew_ptr,
    mean_ptr, min_ptr, max_ptr, hash_ptr, w_ptr,
    stride_kb, stride_kh, stride_kt,
    stride_vb, stride_vh, stride_vt,
    stride_pn, stride_pkv, stride_ph, stride_pt,
    stride_btb, MAX_BLOCKS, H_KV, T,
    stride_rn, stride_rh,
    stride_hn, stride_hh, stride_ht,
    NUM_PHYS, flag_ptr,
    D: tl.constexpr, DP: tl.constexpr, BS: tl.constexpr, BITS: tl.constexpr,
    HAS_NNEW: tl.constexpr, DO_MEAN: tl.constexpr, DO_MINMAX: tl.constexpr, DO_HASH: tl.constexpr,
    GUARD: tl.constexpr,
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    i = tl.program_id(2)
    seq_len = tl.load(seqlen_ptr + b)
    if HAS_NNEW:
        n_new = tl.load(nnew_ptr + b)
    else:
        n_new = seq_len * 0 + T
    # index safety without a sync: a sequence whose lengths make no sense is not written at all, a
    # block whose table entry is outside the pool is skipped; both set the guard's flag
    seq_ok = (n_new >= 0) & (n_new <= T) & (n_new <= seq_len) & (seq_len <= MAX_BLOCKS * BS)
    start = seq_len - n_new
    blk = tl.where(seq_ok, start // BS + i, 0)
    active = seq_ok & (n_new > 0) & (blk * BS < seq_len) & (blk < MAX_BLOCKS)
    phys = tl.load(bt_ptr + b.to(tl.int64) * stride_btb + blk, mask=active, other=0).to(tl.int64)
    phys_bad = active & ((phys < 0) | (phys >= NUM_PHYS))
    if GUARD:
        raise_flag(flag_ptr, _BAD_BLOCK_ID, mask=phys_bad)
        raise_flag(flag_ptr, _BAD_LENGTHS, mask=(seq_ok == 0) & (i == 0) & (h == 0))
    active = active & (phys_bad == 0)
    phys = tl.where(active, phys, 0)

    tok = tl.arange(0, BS)
    dd = tl.arange(0, DP)
    d_ok = dd < tl.where(active, D, 0)
    pos = blk * BS + tok
    lim_hi = tl.where(active, seq_len, 0)  # inactive program: every slot masked
    is_new = (pos >= start) & (pos < lim_hi)
    is_old = pos < tl.minimum(start, lim_hi)
    src_t = tl.where(is_new, pos - start, 0)

    kdt = pool_ptr.dtype.element_ty
    new_m = is_new[:, None] & d_ok[None, :]
    k_new = tl.load(k_ptr + b.to(tl.int64) * stride_kb + h * stride_kh + src_t[:, None] * stride_kt + dd[None, :],
                    mask=new_m, other=0.0).to(kdt)
    v_new = tl.load(v_ptr + b.to(tl.int64) * stride_vb + h * stride_vh + src_t[:, None] * stride_vt + dd[None, :],
                    mask=new_m, other=0.0).to(kdt)
    k_slot = pool_ptr + phys * stride_pn + h * stride_ph + tok[:, None] * stride_pt + dd[None, :]
    tl.store(k_slot, k_new, mask=new_m)
    tl.store(k_slot + stride_pkv, v_new, mask=new_m)

    if DO_MEAN or DO_MINMAX or DO_HASH:
        k_old = tl.load(k_slot, mask=is_old[:, None] & d_ok[None, :], other=0.0)
        k = tl.where(is_new[:, None], k_new, k_old).to(tl.float32)
        valid = (is_new | is_old)[:, None]
        r_off = phys * stride_rn + h * stride_rh + dd
        if DO_MEAN:
            cnt = tl.sum((is_new | is_old).to(tl.float32), 0)
            mean = tl.sum(tl.where(valid, k, 0.0), 0) / tl.maximum(cnt, 1.0)
            tl.store(mean_ptr + r_off, mean.to(mean_ptr.dtype.element_ty), mask=d_ok)
        if DO_MINMAX:
            kmin = tl.min(tl.where(valid, k, float("inf")), 0)
            kmax = tl.max(tl.where(valid, k, float("-inf")), 0)
            tl.store(min_ptr + r_off, kmin.to(min_ptr.dtype.element_ty), mask=d_ok)
            tl.store(max_ptr + r_off, kmax.to(max_ptr.dtype.element_ty), mask=d_ok)
        if DO_HASH:
            bb = tl.arange(0, BITS)
            w = tl.load(w_ptr + dd[:, None] * BITS + bb[None, :], mask=(dd < D)[:, None], other=0.0)
            code = pack_sign_bits(tl.dot(k, w, input_precision="ieee"), BS, BITS)  # [BS, BITS // 8]
            nb8 = tl.arange(0, BITS // 8)
            h_ptrs = hash_ptr + phys * stride_hn + h * stride_hh + tok[:, None] * stride_ht + nb8[None, :]
            tl.store(h_ptrs, code.to(tl.uint8), mask=is_new[:, None])


def append_kv(
    kv_pool: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    num_new: torch.Tensor | None = None,
    block_mean: torch.Tensor | None = None,
    block_min: torch.Tensor | None = None,
    block_max: torch.Tensor | None = None,
    hash_codes: torch.Tensor | None = None,
    hash_weight: torch.Tensor | None = None,
    validate: bool = True,
    guard: IndexGuard | None = None,
) -> None:
    """Write new K/V into ``kv_pool`` in place and refresh the touched blocks' representations.

    ``k``, ``v`` ``[B, Hkv, T, D]``: sequence ``b``'s new tokens are ``k[b, :, :n]`` with
    ``n = num_new[b]`` (int32 ``[B]``, default ``T`` for all), at logical positions
    ``seq_lens[b] - n .. seq_lens[b] - 1`` (``seq_lens`` are the lengths *after* the append).
    ``block_mean``/``block_min``/``block_max`` ``[num_blocks, Hkv, D]`` (float; min and max
    together) and ``hash_codes`` ``[num_blocks, Hkv, block_size, bits // 8]`` uint8 with
    ``hash_weight`` ``[D, bits]`` float32 are optional and updated in place. ``guard``: an
    :class:`~ucm_trt.kernels.guard.IndexGuard` whose flag the kernel sets on an out-of-range id.
    """
    check_bool("validate", validate)
    if guard is not None and not isinstance(guard, IndexGuard):
        raise TypeError(f"guard must be an IndexGuard or None, got {type(guard).__name__}")
    check_tensor("kv_pool", kv_pool, ndim=5, dtypes=KERNEL_FLOAT_DTYPES)
    nblocks, two, hkv, bs, d = kv_pool.shape
    if two != 2:
        raise ValueError(f"kv_pool must have shape [num_blocks, 2, Hkv, block_size, D], got {tuple(kv_pool.shape)}")
    check_block_size("kv_pool", bs)
    check_head_dim("kv_pool", d)
    check_tensor("k", k, ndim=4, dtypes=KERNEL_FLOAT_DTYPES, shape=(None, hkv, None, d))
    b, _, t, _ = k.shape
    check_tensor("v", v, ndim=4, dtypes=KERNEL_FLOAT_DTYPES, shape=(b, hkv, t, d))
    check_tensor("block_table", block_table, ndim=2, dtypes=(torch.int32,), shape=(b, None))
    if block_table.shape[1] == 0:
        raise ValueError(f"block_table must have at least one column, got shape {tuple(block_table.shape)}")
    check_tensor("seq_lens", seq_lens, dtypes=(torch.int32,), shape=(b,))
    if num_new is not None:
        check_tensor("num_new", num_new, dtypes=(torch.int32,), shape=(b,))
    if (block_min is None) != (block_max is None):
        raise ValueError("block_min and block_max must be given together (Quest min/max representation)")
    for name, rep in (("block_mean", block_mean), ("block_min", block_min), ("block_max", block_max)):
        if rep is not None:
            check_tensor(name, rep, dtypes=KERNEL_FLOAT_DTYPES, shape=(nblocks, hkv, d))
            check_last_dim_contiguous(name, rep)
    if block_min is not None and block_min.stride() != block_max.stride():
        raise ValueError(
            f"block_min and block_max must have equal strides, got {tuple(block_min.stride())} "
            f"and {tuple(block_max.stride())}"
        )
    if block_mean is not None and block_min is not None and block_mean.stride() != block_min.stride():
        raise ValueError(
            f"block_mean and block_min must have equal strides, got {tuple(block_mean.stride())} "
            f"and {tuple(block_min.stride())}"
        )
    if (hash_codes is None) != (hash_weight is None):
        raise ValueError("hash_codes and hash_weight must be given together")
    bits = 8
    if hash_weight is not None:
        check_tensor("hash_weight", hash_weight, ndim=2, dtypes=(torch.float32,), shape=(d, None))
        bits = hash_weight.shape[1]
        if not (is_pow2(bits) and 16 <= bits <= 1024):
            raise ValueError(f"hash_weight must have a power-of-two number of bits in [16, 1024], got {bits}")
        check_tensor("hash_codes", hash_codes, dtypes=(torch.uint8,), shape=(nblocks, hkv, bs, bits // 8))
        check_last_dim_contiguous("hash_codes", hash_codes)
        hash_weight = hash_weight.contiguous()
    for name, x in (("kv_pool", kv_pool), ("k", k), ("v", v), ("block_table", block_table)):
        check_last_dim_contiguous(name, x)
    check_same_device(kv_pool=kv_pool, block_table=block_table, seq_lens=seq_lens, k=k, v=v, num_new=num_new,
                      block_mean=block_mean, block_min=block_min, block_max=block_max,
                      hash_codes=hash_codes, hash_weight=hash_weight, guard=None if guard is None else guard.flag)
    if validate:
        lens = check_block_table_contents(block_table, seq_lens, bs, nblocks)
        news = [t] * b if num_new is None else num_new.tolist()
        for i, (n, m) in enumerate(zip(lens, news, strict=True)):
            if not 0 <= m <= min(t, n):
                raise ValueError(f"num_new[{i}] = {m} must be in [0, min(T={t}, seq_lens[{i}]={n})]")
    if t == 0 or b == 0:
        return
    if guard is not None:
        for code, words in GUARD_CODES.items():
            guard.codes.setdefault(code, words)
    # T consecutive positions span at most (T + bs - 2) // bs + 1 blocks
    touched = min((t + bs - 2) // bs + 1, block_table.shape[1])
    rep = block_mean if block_mean is not None else block_min
    dummy = kv_pool
    _append_kv_kernel[(b, hkv, touched)](
        k, v, kv_pool, block_table, seq_lens, num_new if num_new is not None else seq_lens,
        block_mean if block_mean is not None else dummy,
        block_min if block_min is not None else dummy,
        block_max if block_max is not None else dummy,
        hash_codes if hash_codes is not None else dummy,
        hash_weight if hash_weight is not None else dummy,
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        kv_pool.stride(0), kv_pool.stride(1), kv_pool.stride(2), kv_pool.stride(3),
        block_table.stride(0), block_table.shape[1], hkv, t,
        rep.stride(0) if rep is not None else 0, rep.stride(1) if rep is not None else 0,
        hash_codes.stride(0) if hash_codes is not None else 0,
        hash_codes.stride(1) if hash_codes is not None else 0,
        hash_codes.stride(2) if hash_codes is not None else 0,
        nblocks, seq_lens if guard is None else guard.flag,
        D=d, DP=next_pow2(d), BS=bs, BITS=next_pow2(bits),
        HAS_NNEW=num_new is not None, DO_MEAN=block_mean is not None,
        DO_MINMAX=block_min is not None, DO_HASH=hash_codes is not None, GUARD=guard is not None,
        num_warps=4,
    )
