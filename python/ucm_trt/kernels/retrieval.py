"""GPU block retrieval: block scoring (Hamming / dot with mean / Quest bound) and block top-k.

Scoring kernels write ``scores`` float32 ``[B, Hkv, max_blocks]``, one per logical block:

* **Hamming** (GSA On-Device / HATA): the query of each KV head is the mean of its GQA group
  (``q_avg``); its code is ``sign(q_avg . W) > 0`` packed like the keys'. A block's score is
  the *minimum* over its valid tokens of ``popcount(code_q XOR code_k)``; smaller is better;
  blocks at or past ``seq_len`` score ``+inf``.
* **dot**: ``q_avg . block_mean``; larger is better; past ``seq_len``: ``-inf``.
* **Quest**: upper bound of ``q_avg . k`` over the block, ``sum_d max(q_d min_d, q_d max_d)``;
  larger is better; past ``seq_len``: ``-inf``.

:func:`block_topk` turns scores into a selection: sink blocks (the first ``sink_blocks``) and
the local window (the last ``local_blocks`` blocks, which hold the partial last block) are
forced in, the best of the rest fill ``top_k`` (ties go to the lower block id), the result is
sorted ascending and padded with -1 when a sequence has fewer than ``top_k`` blocks. With
``shared=True`` the per-head scores are first reduced over KV heads (min for smaller-is-better,
max for larger-is-better) and every head gets the same selection.

These are the separate score and top-k launches (scores come back to the caller). Retrieval itself
(scores + top-k in one launch) is :mod:`ucm_trt.kernels.fused_retrieval` (``hash_retrieve``,
``quest_retrieve``, ``dot_retrieve``). A head_dim that is not a power of two runs in the next
power-of-two tile with masked lanes.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ucm_trt._validation import check_positive_int, check_same_device, check_tensor
from ucm_trt.kernels._common import (
    KERNEL_FLOAT_DTYPES,
    check_block_table_contents,
    check_bool,
    check_last_dim_contiguous,
    is_pow2,
    next_pow2,
)
from ucm_trt.kernels.fused_retrieval import (
    MAX_RETRIEVAL_BLOCKS,
    check_block_size_arg,
    check_decode_query,
    check_hash_codes,
    check_q_head_dim,
    check_selection_args,
    check_table_args,
    selection_out,
)


@triton.jit
def _group_mean_query(q_ptr, stride_qb, stride_qh, b, h, G: tl.constexpr, D: tl.constexpr, DP: tl.constexpr):
    dd = tl.arange(0, DP)
    acc = tl.zeros([DP], tl.float32)
    for g in tl.static_range(G):
        acc += tl.load(q_ptr + b.to(tl.int64) * stride_qb + (h * G + g) * stride_qh + dd, mask=dd < D,
                       other=0.0).to(tl.float32)
    return acc / G


@triton.jit
def _hash_query_kernel(
    q_ptr, w_ptr, code_ptr, stride_qb, stride_qh, H_KV,
    G: tl.constexpr, D: tl.constexpr, DP: tl.constexpr, BITS: tl.constexpr,
):
    """code[b, h] = sign(q_avg . W) > 0 packed little-endian into bytes (held as int32)."""
    pid = tl.program_id(0)
    b = pid // H_KV
    h = pid % H_KV
    NB8: tl.constexpr = BITS // 8
    dd = tl.arange(0, DP)
    bb = tl.arange(0, BITS)
    qa = _group_mean_query(q_ptr, stride_qb, stride_qh, b, h, G, D, DP)
    w = tl.load(w_ptr + dd[:, None] * BITS + bb[None, :], mask=(dd < D)[:, None], other=0.0)
    x = tl.sum(qa[:, None] * w, 0)
    qbits = tl.reshape((x > 0.0).to(tl.int32), (NB8, 8))
    qcode = tl.sum(qbits << tl.arange(0, 8)[None, :], 1)
    tl.store(code_ptr + pid * NB8 + tl.arange(0, NB8), qcode)


@triton.jit
def _hamming_scores_kernel(
    qcode_ptr, codes_ptr, bt_ptr, seqlen_ptr, out_ptr,
    stride_cn, stride_ch, stride_ct,
    stride_btb, stride_ob, stride_oh,
    H_KV, MAX_BLOCKS,
    NB8: tl.constexpr, BS: tl.constexpr, CB: tl.constexpr,
):
    """CB blocks per program, loaded as one [CB * BS, NB8] tile of codes."""
    pid = tl.program_id(0)
    chunk = tl.program_id(1)
    b = pid // H_KV
    h = pid % H_KV
    nb8 = tl.arange(0, NB8)
    qcode = tl.load(qcode_ptr + pid * NB8 + nb8)
    seq_len = tl.load(seqlen_ptr + b)
    r = tl.arange(0, CB * BS)
    blk = chunk * CB + r // BS
    pos = blk * BS + r % BS
    tmask = (pos < seq_len) & (blk < MAX_BLOCKS)
    phys = tl.load(bt_ptr + b.to(tl.int64) * stride_btb + blk, mask=tmask, other=0).to(tl.int64)
    codes = tl.load(codes_ptr + phys[:, None] * stride_cn + h * stride_ch + (r % BS)[:, None] * stride_ct
                    + nb8[None, :], mask=tmask[:, None], other=0).to(tl.int32)
    xo = codes ^ qcode[None, :]
    xo = xo - ((xo >> 1) & 0x55)
    xo = (xo & 0x33) + ((xo >> 2) & 0x33)
    xo = (xo + (xo >> 4)) & 0x0F
    dist = tl.sum(xo, 1).to(tl.float32)
    dist = tl.where(tmask, dist, float("inf"))
    score = tl.min(tl.reshape(dist, (CB, BS)), 1)
    cblk = chunk * CB + tl.arange(0, CB)
    tl.store(out_ptr + b.to(tl.int64) * stride_ob + h * stride_oh + cblk, score, mask=cblk < MAX_BLOCKS)


@triton.jit
def _rep_scores_kernel(
    q_ptr, r0_ptr, r1_ptr, bt_ptr, seqlen_ptr, out_ptr,
    stride_qb, stride_qh, stride_rn, stride_rh,
    stride_btb, stride_ob, stride_oh,
    H_KV, MAX_BLOCKS,
    G: tl.constexpr, D: tl.constexpr, DP: tl.constexpr, BS: tl.constexpr, CB: tl.constexpr,
    QUEST: tl.constexpr,
):
    pid = tl.program_id(0)
    chunk = tl.program_id(1)
    b = pid // H_KV
    h = pid % H_KV
    dd = tl.arange(0, DP)
    qa = _group_mean_query(q_ptr, stride_qb, stride_qh, b, h, G, D, DP)
    seq_len = tl.load(seqlen_ptr + b)
    cc = tl.arange(0, CB)
    blk = chunk * CB + cc
    in_table = blk < MAX_BLOCKS
    live = in_table & (blk * BS < seq_len)
    phys = tl.load(bt_ptr + b.to(tl.int64) * stride_btb + blk, mask=live, other=0).to(tl.int64)
    offs = phys[:, None] * stride_rn + h * stride_rh + dd[None, :]
    r_m = live[:, None] & (dd < D)[None, :]
    r0 = tl.load(r0_ptr + offs, mask=r_m, other=0.0).to(tl.float32)
    if QUEST:
        r1 = tl.load(r1_ptr + offs, mask=r_m, other=0.0).to(tl.float32)
        s = tl.sum(tl.maximum(qa[None, :] * r0, qa[None, :] * r1), 1)
    else:
        s = tl.sum(qa[None, :] * r0, 1)
    s = tl.where(live, s, float("-inf"))
    tl.store(out_ptr + b.to(tl.int64) * stride_ob + h * stride_oh + blk, s, mask=in_table)


@triton.jit
def _block_topk_kernel(
    scores_ptr, seqlen_ptr, out_ptr,
    stride_sb, stride_sh, stride_ob, stride_oh,
    H_KV, MAX_BLOCKS, TOP_K, SINK, LOCAL,
    BS: tl.constexpr, NBLK: tl.constexpr, HP: tl.constexpr,
    LARGEST: tl.constexpr, SHARED: tl.constexpr,
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    seq_len = tl.load(seqlen_ptr + b)
    nb = (seq_len + BS - 1) // BS
    idx = tl.arange(0, NBLK)
    in_seq = (idx < nb) & (idx < MAX_BLOCKS)
    base = scores_ptr + b.to(tl.int64) * stride_sb
    if SHARED:
        hh = tl.arange(0, HP)
        sc = tl.load(base + hh[:, None] * stride_sh + idx[None, :],
                     mask=(hh[:, None] < H_KV) & in_seq[None, :], other=float("nan"))
        if LARGEST:
            sc = tl.where(sc == sc, -sc, float("inf"))
        else:
            sc = tl.where(sc == sc, sc, float("inf"))
        s = tl.min(sc, 0)
    else:
        s = tl.load(base + h * stride_sh + idx, mask=in_seq, other=0.0)
        if LARGEST:
            s = -s
    # smaller is better from here; forced blocks first, then ties by lower block id
    forced = (idx < SINK) | (idx >= nb - LOCAL)
    s = tl.where(forced, float("-inf"), s)
    s = tl.where(s != s, float("inf"), s)  # NaN scores rank last
    bits = s.to(tl.int32, bitcast=True)
    key = bits ^ ((bits >> 31) & 0x7FFFFFFF)  # monotone float -> int32
    k_eff = tl.minimum(TOP_K, nb)
    # k-th smallest key among the blocks of the sequence: binary search on the int32 key
    # (32 count-reductions instead of a sort); ties at the threshold go to lower block ids.
    key64 = key.to(tl.int64)
    lo = tl.min(tl.where(in_seq, key64, 2147483647), 0)  # count(key <= lo - 1) == 0 < k_eff
    hi = tl.max(tl.where(in_seq, key64, -2147483648), 0)  # count(key <= hi) == nb >= k_eff
    for _ in range(32):
        mid = lo + (hi - lo) // 2
        cnt = tl.sum((in_seq & (key64 <= mid)).to(tl.int32), 0)
        ge = cnt >= k_eff
        hi = tl.where(ge, mid, hi)
        lo = tl.where(ge, lo, mid + 1)
    below = in_seq & (key64 < hi)
    at = in_seq & (key64 == hi)
    need = k_eff - tl.sum(below.to(tl.int32), 0)
    tie_rank = tl.cumsum(at.to(tl.int32), 0)
    chosen = below | (at & (tie_rank <= need))
    slot = tl.cumsum(chosen.to(tl.int32), 0) - 1
    out_row = out_ptr + b.to(tl.int64) * stride_ob
    if SHARED:
        for hq in range(H_KV):
            tl.store(out_row + hq * stride_oh + slot, idx, mask=chosen)
            tl.store(out_row + hq * stride_oh + idx, -1, mask=(idx >= k_eff) & (idx < TOP_K))
    else:
        tl.store(out_row + h * stride_oh + slot, idx, mask=chosen)
        tl.store(out_row + h * stride_oh + idx, -1, mask=(idx >= k_eff) & (idx < TOP_K))


def _check_table(block_table, seq_lens, b, bs, nblocks, validate):
    check_table_args(block_table, seq_lens, b)
    if validate:
        check_block_table_contents(block_table, seq_lens, bs, nblocks)


def hamming_block_scores(
    q: torch.Tensor,
    hash_codes: torch.Tensor,
    hash_weight: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    *,
    blocks_per_program: int = 4,
    validate: bool = True,
) -> torch.Tensor:
    """Min-over-tokens Hamming distance per (sequence, KV head, logical block).

    q ``[B, Hq, D]`` (or ``[B, Hq, 1, D]``), hash_codes uint8 ``[num_blocks, Hkv, block_size, bits // 8]``,
    hash_weight float32 ``[D, bits]``. Returns float32 ``[B, Hkv, max_blocks]`` (``+inf`` past seq_len).
    """
    check_bool("validate", validate)
    check_positive_int("blocks_per_program", blocks_per_program)
    nblocks, hkv, bs, nbytes = check_hash_codes(hash_codes)
    q, group, d = check_decode_query(q, hkv)
    b = q.shape[0]
    check_tensor("hash_weight", hash_weight, dtypes=(torch.float32,), shape=(d, nbytes * 8))
    bits = nbytes * 8
    if not (is_pow2(bits) and 16 <= bits <= 1024):
        raise ValueError(f"hash_codes must hold a power-of-two number of bits in [16, 1024], got {bits}")
    _check_table(block_table, seq_lens, b, bs, nblocks, validate)
    check_same_device(q=q, hash_codes=hash_codes, hash_weight=hash_weight, block_table=block_table, seq_lens=seq_lens)
    hash_weight = hash_weight.contiguous()
    mb = block_table.shape[1]
    out = torch.empty((b, hkv, mb), device=q.device, dtype=torch.float32)
    qcode = torch.empty((b * hkv, nbytes), device=q.device, dtype=torch.int32)
    _hash_query_kernel[(b * hkv,)](
        q, hash_weight, qcode, q.stride(0), q.stride(1), hkv, G=group, D=d, DP=next_pow2(d), BITS=bits,
        num_warps=4,
    )
    cb = next_pow2(min(blocks_per_program, mb))
    grid = (b * hkv, -(-mb // cb))
    _hamming_scores_kernel[grid](
        qcode, hash_codes, block_table, seq_lens, out,
        hash_codes.stride(0), hash_codes.stride(1), hash_codes.stride(2),
        block_table.stride(0), out.stride(0), out.stride(1),
        hkv, mb,
        NB8=nbytes, BS=bs, CB=cb, num_warps=8 if cb * bs * nbytes >= 8192 else 4,
    )
    return out


def _rep_scores(q, r0, r1, block_table, seq_lens, block_size, quest, blocks_per_program, validate, names):
    check_bool("validate", validate)
    check_positive_int("blocks_per_program", blocks_per_program)
    check_block_size_arg(block_size)
    check_tensor(names[0], r0, ndim=3, dtypes=KERNEL_FLOAT_DTYPES)
    nblocks, hkv, d = r0.shape
    check_last_dim_contiguous(names[0], r0)
    if r1 is not None:
        check_tensor(names[1], r1, dtypes=KERNEL_FLOAT_DTYPES, shape=(nblocks, hkv, d))
        if r1.stride() != r0.stride():
            raise ValueError(
                f"{names[1]} must have the strides of {names[0]} {tuple(r0.stride())}, got {tuple(r1.stride())}"
            )
    q, group, _ = check_decode_query(q, hkv)
    check_q_head_dim(q, d, names[0])
    b = q.shape[0]
    _check_table(block_table, seq_lens, b, block_size, nblocks, validate)
    check_same_device(q=q, r0=r0, r1=r1, block_table=block_table, seq_lens=seq_lens)
    mb = block_table.shape[1]
    out = torch.empty((b, hkv, mb), device=q.device, dtype=torch.float32)
    cb = next_pow2(min(blocks_per_program, mb))
    grid = (b * hkv, -(-mb // cb))
    _rep_scores_kernel[grid](
        q, r0, r0 if r1 is None else r1, block_table, seq_lens, out,
        q.stride(0), q.stride(1), r0.stride(0), r0.stride(1),
        block_table.stride(0), out.stride(0), out.stride(1),
        hkv, mb,
        G=group, D=d, DP=next_pow2(d), BS=block_size, CB=cb, QUEST=quest, num_warps=4,
    )
    return out


def dot_block_scores(
    q: torch.Tensor,
    block_mean: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    *,
    block_size: int,
    blocks_per_program: int = 16,
    validate: bool = True,
) -> torch.Tensor:
    """``q_avg . block_mean`` per (sequence, KV head, logical block); float32 ``[B, Hkv, max_blocks]``,
    ``-inf`` past seq_len. ``block_mean`` ``[num_blocks, Hkv, D]`` is indexed by physical block."""
    return _rep_scores(q, block_mean, None, block_table, seq_lens, block_size, False, blocks_per_program,
                       validate, ("block_mean",))


def quest_block_scores(
    q: torch.Tensor,
    block_min: torch.Tensor,
    block_max: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    *,
    block_size: int,
    blocks_per_program: int = 16,
    validate: bool = True,
) -> torch.Tensor:
    """Quest upper bound ``sum_d max(q_avg_d min_d, q_avg_d max_d)``; float32 ``[B, Hkv, max_blocks]``,
    ``-inf`` past seq_len."""
    return _rep_scores(q, block_min, block_max, block_table, seq_lens, block_size, True, blocks_per_program,
                       validate, ("block_min", "block_max"))


def block_topk(
    scores: torch.Tensor,
    seq_lens: torch.Tensor,
    *,
    top_k: int,
    block_size: int,
    sink_blocks: int,
    local_blocks: int,
    largest: bool,
    shared: bool,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Select ``top_k`` logical blocks per (sequence, KV head) from ``scores`` ``[B, Hkv, max_blocks]``.

    Sink and local blocks are forced; the result int32 ``[B, Hkv, top_k]`` is sorted ascending
    and padded with -1. ``largest`` says whether larger scores are better; ``shared`` reduces
    over KV heads first and gives every head the same selection.
    """
    check_tensor("scores", scores, ndim=3, dtypes=(torch.float32,))
    check_last_dim_contiguous("scores", scores)
    b, hkv, mb = scores.shape
    check_tensor("seq_lens", seq_lens, dtypes=(torch.int32,), shape=(b,))
    check_block_size_arg(block_size)
    check_selection_args(top_k, sink_blocks, local_blocks, shared)
    check_bool("largest", largest)
    if mb > MAX_RETRIEVAL_BLOCKS:
        raise ValueError(f"scores may cover at most {MAX_RETRIEVAL_BLOCKS} blocks per sequence, got {mb}")
    out = selection_out(out, b, hkv, top_k, scores.device)
    check_same_device(scores=scores, seq_lens=seq_lens, out=out)
    nblk = max(16, next_pow2(max(mb, top_k)))
    grid = (b, 1 if shared else hkv)
    _block_topk_kernel[grid](
        scores, seq_lens, out,
        scores.stride(0), scores.stride(1), out.stride(0), out.stride(1),
        hkv, mb, top_k, sink_blocks, local_blocks,
        BS=block_size, NBLK=nblk, HP=next_pow2(hkv), LARGEST=largest, SHARED=shared,
        num_warps=8 if nblk >= 2048 else 4,
    )
    return out
