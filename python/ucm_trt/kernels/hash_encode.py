"""New keys' hash codes written straight into a per-token code cache (GSA On-Device's append), one launch.

``encode_keys_into(k, weight, codes, blocks, offsets)`` sets, for every new token ``n`` and KV head ``h``::

    codes[blocks[n], h, offsets[n], :] = pack_bits(k[n, h].float() @ weight > 0)

the bits :meth:`ucm_trt.sparse.representations.HashEncoder.encode` computes (float32 projection, bit ``j``
of byte ``i`` is bit ``8 i + j``, little-endian). The PyTorch path it replaces on the GPU ran a cuBLAS
float32 GEMM (about 50 us on an H100 for one token's 8 heads, cuBLAS's SIMT kernel for that shape), five
elementwise kernels to pack the bits and an ``index_put`` per layer and decode step; here program
``(n, c)`` projects token ``n``'s heads on bit chunk ``c`` (``tl.dot`` in IEEE float32) and stores the
packed bytes in place. The float32 sums run in another order than cuBLAS's, so a bit whose projection
is within rounding of 0 may differ from the PyTorch path's; every other bit is the same.

Index safety without a sync (issue 17): a token whose block id is outside ``[0, num_blocks)`` or whose
offset is outside ``[0, block_size)`` is not written; with an :class:`~ucm_trt.kernels.guard.IndexGuard`
the kernel also sets the guard's flag (:data:`GUARD_CODES`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ucm_trt._validation import check_same_device, check_tensor
from ucm_trt.kernels._common import KERNEL_FLOAT_DTYPES, check_bool, next_pow2
from ucm_trt.kernels.guard import IndexGuard
from ucm_trt.kernels.guard_flag import raise_flag

__all__ = ["GUARD_CODES", "encode_keys_into"]

GUARD_BAD_SLOT = 56
#: IndexGuard flag values this module's kernel sets, and what they mean.
GUARD_CODES = {
    GUARD_BAD_SLOT: "encode_keys_into: a block id is outside [0, num_blocks) or an offset outside [0, block_size); "
                    "that token's codes were not written",
}
_BAD_SLOT = tl.constexpr(GUARD_BAD_SLOT)
#: bits projected per program (8 code bytes): a [D, 64] float32 weight tile
_BITS_PER_PROGRAM = 64


@triton.jit
def pack_sign_bits(x, ROWS: tl.constexpr, NBITS: tl.constexpr):
    """Projections ``x [ROWS, NBITS]`` -> int32 ``[ROWS, NBITS // 8]``: the bytes of ``x > 0``, bit ``j`` of byte
    ``i`` being bit ``8 i + j`` (the packing of every hash code cache; ``append_kv``'s too)."""
    bits = (x > 0.0).to(tl.int32)
    shifts = tl.arange(0, 8)[None, None, :]
    return tl.sum(tl.reshape(bits, (ROWS, NBITS // 8, 8)) << shifts, 2)


@triton.jit
def _encode_keys_kernel(
    k_ptr, w_ptr, codes_ptr, blk_ptr, off_ptr, guard_ptr,
    stride_kn, stride_kh, stride_cn, stride_ch, stride_ct,
    H, NUM_BLOCKS, BS,
    D: tl.constexpr, DP: tl.constexpr, HP: tl.constexpr, BITS: tl.constexpr, BC: tl.constexpr,
    GUARD: tl.constexpr,
):
    n = tl.program_id(0)
    c = tl.program_id(1)
    blk = tl.load(blk_ptr + n).to(tl.int64)
    off = tl.load(off_ptr + n).to(tl.int64)
    ok = (blk >= 0) & (blk < NUM_BLOCKS) & (off >= 0) & (off < BS)
    if GUARD:
        raise_flag(guard_ptr, _BAD_SLOT, mask=~ok)
    hh = tl.arange(0, HP)
    dd = tl.arange(0, DP)
    bb = c * BC + tl.arange(0, BC)
    k = tl.load(k_ptr + n * stride_kn + hh[:, None] * stride_kh + dd[None, :],
                mask=(hh < H)[:, None] & (dd < D)[None, :], other=0.0).to(tl.float32)  # [HP, DP]
    w = tl.load(w_ptr + dd[:, None] * BITS + bb[None, :], mask=(dd < D)[:, None] & (bb < BITS)[None, :],
                other=0.0)  # [DP, BC] float32
    code = pack_sign_bits(tl.dot(k, w, input_precision="ieee"), HP, BC)  # [HP, BC // 8]
    nb8 = c * (BC // 8) + tl.arange(0, BC // 8)
    dst = codes_ptr + tl.where(ok, blk, 0) * stride_cn + hh[:, None] * stride_ch + tl.where(ok, off, 0) * stride_ct \
        + nb8[None, :]
    row_ok = (hh < H) & ((tl.zeros([HP], tl.int32) + ok.to(tl.int32)) > 0)  # [HP] (a vector mask: the
    tl.store(dst, code.to(tl.uint8), mask=row_ok[:, None] & (nb8 < BITS // 8)[None, :])  # interpreter's rule)


def encode_keys_into(
    k: torch.Tensor,
    weight: torch.Tensor,
    codes: torch.Tensor,
    blocks: torch.Tensor,
    offsets: torch.Tensor,
    *,
    validate: bool = True,
    guard: IndexGuard | None = None,
) -> None:
    """Write the hash codes of ``k [N, Hkv, D]`` (float16 / bfloat16 / float32, last dim contiguous) under
    ``weight [D, bits]`` (float32, ``bits`` a multiple of 8) into ``codes [num_blocks, Hkv, block_size,
    bits // 8]`` (uint8, last dim contiguous) at block ``blocks[n]``, token ``offsets[n]`` (int32 / int64
    ``[N]``). ``validate`` checks the ids on the host (a sync); without it an out-of-range id is skipped on
    the device and, with ``guard``, flagged."""
    check_bool("validate", validate)
    if guard is not None and not isinstance(guard, IndexGuard):
        raise TypeError(f"guard must be an IndexGuard or None, got {type(guard).__name__}")
    check_tensor("k", k, ndim=3, dtypes=KERNEL_FLOAT_DTYPES)
    n, hkv, d = k.shape
    check_tensor("weight", weight, ndim=2, dtypes=(torch.float32,), shape=(d, None))
    bits = weight.shape[1]
    if bits < 8 or bits % 8:
        raise ValueError(f"weight must have a positive multiple of 8 bits (columns), got {bits}")
    check_tensor("codes", codes, ndim=4, dtypes=(torch.uint8,), shape=(None, hkv, None, bits // 8))
    for name, t in (("blocks", blocks), ("offsets", offsets)):
        check_tensor(name, t, ndim=1, dtypes=(torch.int32, torch.int64), shape=(n,))
    check_same_device(k=k, weight=weight, codes=codes, blocks=blocks, offsets=offsets)
    if k.stride(-1) != 1 or codes.stride(-1) != 1:
        raise ValueError("k and codes must have a contiguous last dimension (k[..., d] and codes[..., byte])")
    num_blocks, bs = codes.shape[0], codes.shape[2]
    if validate and n:
        blk, off = blocks.cpu(), offsets.cpu()
        bad = (blk < 0) | (blk >= num_blocks) | (off < 0) | (off >= bs)
        if bool(bad.any()):
            i = int(bad.nonzero()[0])
            raise ValueError(f"token {i}: block id {int(blk[i])} must be in [0, {num_blocks}) and offset "
                             f"{int(off[i])} in [0, {bs})")
    if n == 0:
        return
    if guard is not None:
        for code, words in GUARD_CODES.items():
            guard.codes.setdefault(code, words)
    bc = min(_BITS_PER_PROGRAM, max(16, next_pow2(bits)))
    grid = (n, triton.cdiv(bits, bc))
    _encode_keys_kernel[grid](
        k, weight.contiguous(), codes, blocks, offsets, guard.flag if guard is not None else codes,
        k.stride(0), k.stride(1), codes.stride(0), codes.stride(1), codes.stride(2),
        hkv, num_blocks, bs,
        D=d, DP=max(16, next_pow2(d)), HP=max(16, next_pow2(hkv)), BITS=bits, BC=bc, GUARD=guard is not None,
    )
