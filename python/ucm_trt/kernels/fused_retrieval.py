"""GPU block retrieval in one launch: block scores and the block top-k fused (issue 14).

:func:`hash_retrieve` (GSA On-Device: Hamming distance of hash codes), :func:`quest_retrieve`
(Quest bound from per-block K min/max) and :func:`dot_retrieve` (query . block mean) each run
**one** Triton kernel, capturable in a CUDA graph, that returns the selection int32
``[B, Hkv, top_k]``: logical block ids sorted ascending, padded with -1 (DESIGN §3), with the sink
blocks (the first ``sink_blocks``) and the local window (the last ``local_blocks``) always selected,
and the best other blocks filling ``top_k`` (ties go to the lower block id).

Kernel, grid ``(B, head groups, chunks)``:

1. **Scores.** A program scores a chunk of logical blocks for its heads (all KV heads of the
   sequence for a shared selection, one KV head otherwise) and writes one int32 *key* per block to
   a scratch row, smaller = better: the Hamming distance itself (a small integer), or an
   order-preserving integer image of ``-score`` for dot/Quest (NaN ranks last). A shared selection
   reduces over KV heads the way :func:`ucm_trt.sparse.score.reduce_scores` does: the minimum
   distance (Hamming), the sum of scores (dot, Quest).
2. **Hand-off.** Each program then increments its row's arrival counter (an atomic with
   acquire-release order after a CTA barrier). The program that arrives last owns the row's
   top-k; it also re-zeroes the counter, so the next launch (or graph replay) starts clean.
3. **Top-k** (one program per row). The k-th best candidate key is found by a radix select
   over the key bits, ``radix_bits`` bits per pass (one ``tl.histogram`` of the live digits per
   pass: 2 passes for 128-bit Hamming distances, 8 for float keys), then one prefix sum places the
   chosen ids in ascending order: forced blocks, candidates below the threshold key, and the
   first candidates *at* the threshold by block id.

All scorings use the GQA group of each KV head: Hamming and dot the group-averaged query (as
upstream GSA On-Device), Quest either the sum of the group's per-head bounds (``quest_group="sum"``,
the :func:`ucm_trt.sparse.score.quest_scores` default) or the bound of the averaged query
(``"mean_query"``).

Index safety (issue 17): a block-table entry outside ``[0, num_blocks)`` is never dereferenced
(the block is not read and scores worst); ``seq_lens`` beyond the table's capacity are clamped to
it. With an :class:`~ucm_trt.kernels.guard.IndexGuard` the kernel also sets the guard's flag
(:data:`GUARD_CODES`), read by the host at its next natural sync.

Scratch: a :class:`RetrievalWorkspace` holds the counters (zeroed once) and the key rows; pass one
per stream to keep a call at one launch (without it each call allocates zeroed counters: a memset
plus the kernel). Two launches in flight at once must not share a workspace.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ucm_trt._validation import check_non_negative_int, check_positive_int, check_same_device, check_tensor
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
from ucm_trt.limits import block_size_problem, check_block_size, check_head_dim

__all__ = [
    "GUARD_CODES",
    "MAX_RETRIEVAL_BLOCKS",
    "RetrievalLaunch",
    "RetrievalWorkspace",
    "dot_retrieve",
    "hash_retrieve",
    "quest_retrieve",
]

#: Most logical blocks per sequence (block-table width) the top-k holds in registers.
MAX_RETRIEVAL_BLOCKS = 8192

GUARD_BAD_BLOCK_ID = 48
GUARD_BAD_SEQ_LEN = 49
#: IndexGuard flag values this module's kernel sets, and what they mean.
GUARD_CODES = {
    GUARD_BAD_BLOCK_ID: "retrieval: a block_table entry in use is outside [0, num_blocks); that block was not read",
    GUARD_BAD_SEQ_LEN: "retrieval: a seq_lens entry is negative or beyond the block table's capacity; it was clamped",
}

_MODE_HAMMING, _MODE_DOT, _MODE_QUEST_SUM, _MODE_QUEST_MEAN = 0, 1, 2, 3
_BAD_BLOCK_ID = tl.constexpr(GUARD_BAD_BLOCK_ID)
_BAD_SEQ_LEN = tl.constexpr(GUARD_BAD_SEQ_LEN)


@dataclass(frozen=True)
class RetrievalLaunch:
    """Tuning knobs of the fused retrieval kernel; the selection never depends on them.

    ``None`` picks the default rule. ``tokens_per_tile``: Hamming tokens (blocks x block_size) a
    program scores per head and step (default 1024); ``blocks_per_tile``: dot/Quest blocks per
    program (default ``max(8, min(32, blocks // 128))``); ``radix_bits``: key bits per radix pass (1-8,
    default 4); ``topk_chunk``: keys the top-k holds in registers at once (default 2048; longer rows
    are re-read from L2 per pass); ``num_warps`` (default 8); ``hash_precision``: ``tl.dot``
    precision of the query hash, ``"ieee"`` (default) or ``"tf32x3"``.
    """

    tokens_per_tile: int | None = None
    blocks_per_tile: int | None = None
    radix_bits: int | None = None
    topk_chunk: int | None = None
    num_warps: int | None = None
    hash_precision: str = "ieee"

    def __post_init__(self) -> None:
        for name in ("tokens_per_tile", "blocks_per_tile", "topk_chunk", "num_warps"):
            v = getattr(self, name)
            if v is not None:
                check_positive_int(f"RetrievalLaunch.{name}", v)
                if not is_pow2(v):
                    raise ValueError(f"RetrievalLaunch.{name} must be a power of two, got {v}")
        if self.radix_bits is not None:
            check_positive_int("RetrievalLaunch.radix_bits", self.radix_bits)
            if self.radix_bits > 8:
                raise ValueError(f"RetrievalLaunch.radix_bits must be in [1, 8], got {self.radix_bits}")
        if self.num_warps is not None and self.num_warps > 32:
            raise ValueError(f"RetrievalLaunch.num_warps must be <= 32, got {self.num_warps}")
        if self.hash_precision not in ("ieee", "tf32x3"):
            raise ValueError(f"RetrievalLaunch.hash_precision must be 'ieee' or 'tf32x3', got {self.hash_precision!r}")


class RetrievalWorkspace:
    """Scratch of the fused retrieval kernel, reused across calls and CUDA-graph replays.

    ``counters`` int32: one arrival counter per (sequence, head group), zero between launches
    (the kernel re-zeroes what it used). ``keys`` int32: one key per (row, logical block). Both grow
    on demand; a grown buffer is allocated (and the counters zeroed) on the current stream, so
    size the workspace with one eager call before capturing a graph.
    """

    def __init__(self, device: torch.device | str) -> None:
        self.device = torch.device(device)
        self.counters = torch.zeros(0, dtype=torch.int32, device=self.device)
        self.keys = torch.empty(0, dtype=torch.int32, device=self.device)

    def buffers(self, rows: int, keys: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.counters.numel() < rows:
            self.counters = torch.zeros(max(rows, 2 * self.counters.numel()), dtype=torch.int32, device=self.device)
        if self.keys.numel() < keys:
            self.keys = torch.empty(max(keys, 2 * self.keys.numel()), dtype=torch.int32, device=self.device)
        return self.counters, self.keys


# --------------------------------------------------------------------------------------------- kernel


@triton.jit
def _popcount32(x):
    x = x - ((x >> 1) & 0x55555555)
    x = (x & 0x33333333) + ((x >> 2) & 0x33333333)
    x = (x + (x >> 4)) & 0x0F0F0F0F
    return ((x * 0x01010101) >> 24) & 0x3F


@triton.jit
def _float_key(s):
    """Order-preserving uint32 image of a float32 (NaN -> largest)."""
    bits = s.to(tl.uint32, bitcast=True)
    flip = tl.where((bits >> 31) == 1, 0xFFFFFFFF, 0x80000000).to(tl.uint32)
    return tl.where(s != s, 0xFFFFFFFF, bits ^ flip).to(tl.uint32)


@triton.jit
def _load_keys(keys_row, idx, nb):
    # .cg: read at L2, where the other programs' stores are (past this SM's L1)
    return tl.load(keys_row + idx, mask=idx < nb, other=0, cache_modifier=".cg").to(tl.uint32, bitcast=True)


@triton.jit
def _chunk_keys(keys_row, keys1, idx, nb, NCH: tl.constexpr):
    """Keys of one chunk: the registers' copy for a one-chunk row, else re-read."""
    if NCH == 1:
        return keys1
    else:
        return _load_keys(keys_row, idx, nb)


@triton.jit
def _select_row(keys_row, out_row, stride_oh, nb, TOP_K, SINK, LOCAL, HPP: tl.constexpr, NBLK: tl.constexpr,
                CH: tl.constexpr, RB: tl.constexpr, KEY_BITS: tl.constexpr):
    """Top-k of one row of keys (smaller is better) into ``HPP`` output rows from ``out_row``."""
    n_forced = tl.minimum(nb, SINK + LOCAL)
    need0 = tl.minimum(tl.maximum(TOP_K - n_forced, 0), nb - n_forced)
    # radix select of the threshold key T (the need0-th smallest candidate key), RB bits per
    # pass over the row in NCH chunks of CH keys (one chunk: the keys stay in registers)
    R: tl.constexpr = 1 << RB
    PASSES: tl.constexpr = (KEY_BITS + RB - 1) // RB
    NCH: tl.constexpr = NBLK // CH
    bins = tl.arange(0, 2 * R)
    ii = tl.arange(0, CH)
    keys1 = _load_keys(keys_row, ii, nb)  # used when the row is one chunk (NCH == 1)
    need = need0
    thr = tl.full((), 0, tl.uint32)  # T's digits found so far
    p = tl.full((), 0, tl.int32)
    shift = tl.full((), (PASSES - 1) * RB, tl.int32)
    done = tl.full((), 0, tl.int1)
    while (p < PASSES) & (done == 0):
        shift = (PASSES - 1 - p) * RB
        above = tl.minimum(shift + RB, 31).to(tl.uint32)  # p == 0 compares nothing (see `first`)
        first = p == 0
        hist = tl.zeros([2 * R], tl.int32)
        for ci in tl.static_range(NCH):
            idx = ci * CH + ii
            skey = _chunk_keys(keys_row, keys1, idx, nb, NCH)
            live = (idx < nb) & (idx >= SINK) & (idx < nb - LOCAL)  # candidates
            live = live & (first | ((skey >> above) == thr))  # digits above this pass equal T's
            digit = ((skey >> shift.to(tl.uint32)) & (R - 1)).to(tl.int32)
            hist += tl.histogram(tl.where(live, digit, R), 2 * R)  # bins >= R: not live
        cum = tl.cumsum(hist, 0)
        under = (bins < R) & (cum < need)
        d = tl.sum(under.to(tl.int32), 0)
        need = need - tl.max(tl.where(under, cum, 0), 0)
        thr = (thr << RB) | d.to(tl.uint32)
        # early exit: every candidate in T's bucket is chosen, so T's lower digits do not matter
        in_bucket = tl.sum(tl.where(bins == d, hist, 0), 0)
        done = need == in_bucket
        p += 1
    if (shift > 0) & (need > 0):
        # stopped early: T = the largest candidate key in the bucket, all its ties chosen
        top = tl.full((), 0, tl.uint32)
        for ci in tl.static_range(NCH):
            idx = ci * CH + ii
            skey = _chunk_keys(keys_row, keys1, idx, nb, NCH)
            live = (idx < nb) & (idx >= SINK) & (idx < nb - LOCAL) & ((skey >> shift.to(tl.uint32)) == thr)
            top = tl.maximum(top, tl.max(tl.where(live, skey, 0), 0))
        ties = tl.full((), 0, tl.int32)
        for ci in tl.static_range(NCH):
            idx = ci * CH + ii
            skey = _chunk_keys(keys_row, keys1, idx, nb, NCH)
            live = (idx < nb) & (idx >= SINK) & (idx < nb - LOCAL) & (skey == top)
            ties += tl.sum(live.to(tl.int32), 0)
        thr = top
        need = ties
    elif shift > 0:
        thr = tl.full((), 0, tl.uint32)  # nothing to choose: no candidate is below T = 0 or taken at it
    # chosen: forced, candidates below T, and the first `need` candidates at T by block id; one
    # prefix sum (forced/below count in the low 16 bits, ties in the high bits) gives the slots
    total = n_forced + need0
    n_base = tl.full((), 0, tl.int32)
    n_at = tl.full((), 0, tl.int32)
    for ci in tl.static_range(NCH):
        idx = ci * CH + ii
        skey = _chunk_keys(keys_row, keys1, idx, nb, NCH)
        in_seq = idx < nb
        forced = in_seq & ((idx < SINK) | (idx >= nb - LOCAL))
        cand = in_seq & (forced == 0)
        base = forced | (cand & (skey < thr))
        at = cand & (skey == thr)
        cs = tl.cumsum(base.to(tl.int32) + (at.to(tl.int32) << 16), 0)
        n_tie = (cs >> 16) + n_at
        chosen = base | (at & (n_tie <= need))
        slot = (cs & 0xFFFF) + n_base + tl.minimum(n_tie, need) - 1
        for hh in tl.static_range(HPP):
            tl.store(out_row + hh * stride_oh + slot, idx, mask=chosen)
        n_base += tl.sum(base.to(tl.int32), 0)
        n_at += tl.sum(at.to(tl.int32), 0)
    jj = tl.arange(0, CH)
    for hh in tl.static_range(HPP):
        o_row = out_row + hh * stride_oh
        for start in range(0, TOP_K, CH):
            j = start + jj
            tl.store(o_row + j, -1, mask=(j >= total) & (j < TOP_K))


@triton.jit
def _fused_retrieve_kernel(
    q_ptr, r0_ptr, r1_ptr, w_ptr, bt_ptr, seqlen_ptr, keys_ptr, count_ptr, out_ptr, flag_ptr,
    stride_qb, stride_qh,
    stride_rn, stride_rh, stride_rt,
    stride_btb, stride_ob, stride_oh,
    NUM_PHYS, MAX_BLOCKS, TOP_K, SINK, LOCAL,
    MODE: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, DP: tl.constexpr,
    BITS: tl.constexpr, BITSP: tl.constexpr, WBITS: tl.constexpr, DK: tl.constexpr, BS: tl.constexpr,
    CB: tl.constexpr,
    HPP: tl.constexpr, HP16: tl.constexpr, TILES: tl.constexpr, NBLK: tl.constexpr,
    CH: tl.constexpr, RB: tl.constexpr, KEY_BITS: tl.constexpr, KEY_MAX: tl.constexpr, GUARD: tl.constexpr, HASH_PREC: tl.constexpr,
):
    b = tl.program_id(0)
    hg = tl.program_id(1)
    chunk = tl.program_id(2)
    n_groups = tl.num_programs(1)
    n_chunks = tl.num_programs(2)
    row = b * n_groups + hg
    b64 = b.to(tl.int64)

    seq_len = tl.load(seqlen_ptr + b)
    cap = MAX_BLOCKS * BS
    bad_len = (seq_len < 0) | (seq_len > cap)
    seq_len = tl.minimum(tl.maximum(seq_len, 0), cap)
    nb = (seq_len + BS - 1) // BS

    dd = tl.arange(0, DP)
    d_ok = dd < D
    gg = tl.arange(0, GP)
    cc = tl.arange(0, CB)
    keys_row = keys_ptr + row.to(tl.int64) * MAX_BLOCKS

    if MODE == 0:
        # query codes of this program's heads: sign(q_avg . W) > 0, packed into WBITS-bit words; the
        # projection is accumulated over DK-wide slices of the head dim (W slices of <= 16K floats)
        NWP: tl.constexpr = BITSP // WBITS
        hr = tl.arange(0, HP16)
        bb = tl.arange(0, BITSP)
        proj = tl.zeros([HP16, BITSP], tl.float32)
        for kc in tl.static_range(DP // DK):
            dk = kc * DK + tl.arange(0, DK)
            dk_ok = dk < D
            qa = tl.zeros([HP16, DK], tl.float32)
            for hh in tl.static_range(HPP):
                q_offs = b64 * stride_qb + ((hg * HPP + hh) * G + gg)[:, None] * stride_qh + dk[None, :]
                qg = tl.load(q_ptr + q_offs, mask=(gg < G)[:, None] & dk_ok[None, :], other=0.0).to(tl.float32)
                qa += tl.where((hr == hh)[:, None], (tl.sum(qg, 0) / G)[None, :], 0.0)
            w = tl.load(w_ptr + dk[:, None] * BITS + bb[None, :], mask=dk_ok[:, None] & (bb < BITS)[None, :],
                        other=0.0)
            proj = tl.dot(qa, w, acc=proj, input_precision=HASH_PREC)  # [HP16, BITSP]
        qbits = tl.reshape((proj > 0.0).to(tl.int64), (HP16, NWP, WBITS))  # padded bits: proj 0 -> bit 0
        qwords = tl.sum(qbits << tl.arange(0, WBITS)[None, None, :].to(tl.int64), 2).to(tl.int32)  # [HP16, NWP]
        nw = tl.arange(0, NWP)
        nw_ok = nw < BITS // WBITS
        tt = tl.arange(0, BS)

    for t in tl.static_range(TILES):
        blk = (chunk * TILES + t) * CB + cc
        live = blk < nb
        phys = tl.load(bt_ptr + b64 * stride_btb + blk, mask=live, other=0)
        bad = live & ((phys < 0) | (phys >= NUM_PHYS))
        if GUARD:
            raise_flag(flag_ptr + cc * 0, tl.full([CB], _BAD_BLOCK_ID, tl.int32), mask=bad)
        ok = live & ~bad
        phys = tl.where(ok, phys, 0).to(tl.int64)
        if MODE == 0:
            acc = tl.full([CB], 2147483647, tl.int32)
        else:
            acc = tl.zeros([CB], tl.float32)
        for hh in tl.static_range(HPP):
            h = hg * HPP + hh
            if MODE == 0:
                qw = tl.sum(tl.where((hr == hh)[:, None], qwords, 0), 0)  # [NWP]
                pos = blk[:, None] * BS + tt[None, :]
                tok_ok = ok[:, None] & (pos < seq_len)  # [CB, BS]
                c_offs = (phys[:, None, None] * stride_rn + h * stride_rh + tt[None, :, None] * stride_rt
                          + nw[None, None, :])
                words = tl.load(r0_ptr + c_offs, mask=tok_ok[:, :, None] & nw_ok[None, None, :], other=0)
                words = words.to(tl.int32)
                if WBITS < 32:
                    words = words & ((1 << WBITS) - 1)
                dist = tl.sum(_popcount32(words ^ qw[None, None, :]), 2)  # [CB, BS]
                dist = tl.min(tl.where(tok_ok, dist, 2147483647), 1)  # [CB]
                acc = tl.minimum(acc, dist)
            else:
                q_offs = b64 * stride_qb + (h * G + gg)[:, None] * stride_qh + dd[None, :]
                qg = tl.load(q_ptr + q_offs, mask=(gg < G)[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
                r_offs = phys[:, None] * stride_rn + h * stride_rh + dd[None, :]
                r_m = ok[:, None] & d_ok[None, :]
                r0 = tl.load(r0_ptr + r_offs, mask=r_m, other=0.0).to(tl.float32)
                if MODE == 1:
                    s = tl.sum((tl.sum(qg, 0) / G)[None, :] * r0, 1)
                elif MODE == 2:
                    r1 = tl.load(r1_ptr + r_offs, mask=r_m, other=0.0).to(tl.float32)
                    qpos = tl.sum(tl.maximum(qg, 0.0), 0)
                    qneg = tl.sum(tl.minimum(qg, 0.0), 0)
                    s = tl.sum(qpos[None, :] * r1 + qneg[None, :] * r0, 1)
                else:
                    r1 = tl.load(r1_ptr + r_offs, mask=r_m, other=0.0).to(tl.float32)
                    qa1 = tl.sum(qg, 0) / G
                    s = tl.sum(tl.maximum(qa1[None, :] * r0, qa1[None, :] * r1), 1)
                acc += s
        if MODE == 0:
            key = acc.to(tl.uint32, bitcast=True)
        else:
            key = _float_key(-acc)
        key = tl.where(ok, key, tl.full([CB], KEY_MAX, tl.uint32))
        tl.store(keys_row + blk, key.to(tl.int32, bitcast=True), mask=blk < MAX_BLOCKS)

    # ---- hand-off: the last program of this row selects
    tl.debug_barrier()
    ticket = tl.atomic_add(count_ptr + row, 1, sem="acq_rel", scope="gpu")
    if ticket == n_chunks - 1:
        tl.store(count_ptr + row, 0)
        if GUARD:
            raise_flag(flag_ptr, _BAD_SEQ_LEN, mask=bad_len)
        _select_row(keys_row, out_ptr + b64 * stride_ob + hg * HPP * stride_oh, stride_oh, nb, TOP_K, SINK, LOCAL,
                    HPP, NBLK, CH, RB, KEY_BITS)


# ------------------------------------------------------------------------------------------- launchers


def check_block_size_arg(block_size: object) -> int:
    """``block_size`` (an argument of that name) against :mod:`ucm_trt.limits`."""
    problem = block_size_problem(block_size)
    if problem is not None:
        raise ValueError(f"block_size {problem}, got {block_size!r}")
    return block_size  # type: ignore[return-value]


def check_decode_query(q: torch.Tensor, hkv: int) -> tuple[torch.Tensor, int, int]:
    """One decode query per sequence, ``[B, Hq, D]`` or ``[B, Hq, 1, D]`` -> ``(q [B, Hq, D], group, D)``."""
    check_tensor("q", q, dtypes=KERNEL_FLOAT_DTYPES)
    if q.dim() == 4:
        if q.shape[2] != 1:
            raise ValueError(f"q must be [B, Hq, D] or [B, Hq, 1, D] (one query token), got shape {tuple(q.shape)}")
        q = q[:, :, 0]
    if q.dim() != 3:
        raise ValueError(f"q must be [B, Hq, D] or [B, Hq, 1, D], got shape {tuple(q.shape)}")
    hq = q.shape[1]
    if hq == 0 or hq % hkv:
        raise ValueError(f"q heads ({hq}) must be a positive multiple of the KV heads ({hkv})")
    check_head_dim("q", q.shape[2])
    check_last_dim_contiguous("q", q)
    return q, hq // hkv, q.shape[2]


def check_selection_args(top_k, sink_blocks, local_blocks, shared) -> None:
    """The selection's size and forced blocks: sink + local blocks must fit in ``top_k``."""
    check_positive_int("top_k", top_k)
    check_non_negative_int("sink_blocks", sink_blocks)
    check_non_negative_int("local_blocks", local_blocks)
    check_bool("shared", shared)
    if sink_blocks + local_blocks > top_k:
        raise ValueError(
            f"top_k ({top_k}) must be >= sink_blocks + local_blocks ({sink_blocks} + {local_blocks}), "
            "the forced blocks must fit in the selection"
        )


def check_table_args(block_table, seq_lens, b: int) -> int:
    """block_table int32 ``[B, max_blocks]`` (rows contiguous) and seq_lens int32 ``[B]``; returns max_blocks."""
    check_tensor("block_table", block_table, ndim=2, dtypes=(torch.int32,), shape=(b, None))
    check_last_dim_contiguous("block_table", block_table)
    check_tensor("seq_lens", seq_lens, dtypes=(torch.int32,), shape=(b,))
    return block_table.shape[1]


def selection_out(out, b: int, hkv: int, top_k: int, device: torch.device) -> torch.Tensor:
    """``out`` checked as the int32 ``[B, Hkv, top_k]`` selection, or a new one."""
    if out is None:
        return torch.empty((b, hkv, top_k), device=device, dtype=torch.int32)
    check_tensor("out", out, dtypes=(torch.int32,), shape=(b, hkv, top_k))
    check_last_dim_contiguous("out", out)
    return out


def check_hash_codes(hash_codes) -> tuple[int, int, int, int]:
    """uint8 ``[num_blocks, Hkv, block_size, bytes]`` with contiguous code bytes; returns its shape."""
    check_tensor("hash_codes", hash_codes, ndim=4, dtypes=(torch.uint8,))
    nblocks, hkv, bs, nbytes = hash_codes.shape
    check_block_size("hash_codes", bs)
    check_last_dim_contiguous("hash_codes", hash_codes)
    return nblocks, hkv, bs, nbytes


def check_q_head_dim(q, d: int, name: str) -> None:
    if isinstance(q, torch.Tensor) and q.dim() and q.shape[-1] != d:
        raise ValueError(f"q head_dim ({q.shape[-1]}) must equal {name} head_dim ({d})")


def _retrieve(mode, q, r0, r1, w, block_table, seq_lens, *, num_blocks, hkv, block_size, bits, top_k,
              sink_blocks, local_blocks, shared, validate, workspace, guard, launch, out):
    q, group, d = check_decode_query(q, hkv)
    b = q.shape[0]
    mb = check_table_args(block_table, seq_lens, b)
    if not 1 <= mb <= MAX_RETRIEVAL_BLOCKS:
        raise ValueError(f"block_table must have 1 to {MAX_RETRIEVAL_BLOCKS} columns (logical blocks), got {mb}")
    if launch is None:
        launch = RetrievalLaunch()
    elif not isinstance(launch, RetrievalLaunch):
        raise TypeError(f"launch must be a RetrievalLaunch or None, got {type(launch).__name__}")
    if workspace is not None and not isinstance(workspace, RetrievalWorkspace):
        raise TypeError(f"workspace must be a RetrievalWorkspace or None, got {type(workspace).__name__}")
    if guard is not None and not isinstance(guard, IndexGuard):
        raise TypeError(f"guard must be an IndexGuard or None, got {type(guard).__name__}")
    out = selection_out(out, b, hkv, top_k, q.device)
    check_same_device(q=q, block_table=block_table, seq_lens=seq_lens, out=out, hash_weight=w,
                      **{("hash_codes" if mode == _MODE_HAMMING else "reps"): r0},
                      workspace=None if workspace is None else workspace.counters,
                      guard=None if guard is None else guard.flag)
    if validate:
        check_block_table_contents(block_table, seq_lens, block_size, num_blocks)
    if b == 0:
        return out
    if guard is not None:
        for code, words in GUARD_CODES.items():
            guard.codes.setdefault(code, words)

    groups, hpp = (1, hkv) if shared else (hkv, 1)
    nblk = max(16, next_pow2(mb))
    nbytes = bits // 8
    wbits = 32 if nbytes % 4 == 0 else 16 if nbytes % 2 == 0 else 8
    bitsp = next_pow2(bits // wbits) * wbits  # code words padded to a power of two
    if mode == _MODE_HAMMING:
        cb = max(1, (launch.tokens_per_tile or 4096 * wbits // bitsp) // block_size)
        tiles = 1 if shared else hkv
        key_bits = bits.bit_length()
    else:
        cb = launch.blocks_per_tile or max(8, min(32, nblk // 128))
        tiles = 1
        key_bits = 32
    cb = min(cb, nblk)
    tiles = max(1, min(tiles, -(-mb // cb)))
    chunks = -(-mb // (cb * tiles))
    rows = b * groups
    if workspace is None:
        counters = torch.zeros(rows, dtype=torch.int32, device=q.device)
        keys = torch.empty(rows * mb, dtype=torch.int32, device=q.device)
    else:
        counters, keys = workspace.buffers(rows, rows * mb)
    rb = launch.radix_bits or 4
    if mode == _MODE_HAMMING:
        words = r0.view({32: torch.int32, 16: torch.int16, 8: torch.uint8}[wbits])
        strides = words.stride()[:3]
    else:
        words = r0
        strides = (r0.stride(0), r0.stride(1), 0)
    _fused_retrieve_kernel[(b, groups, chunks)](
        q, words, r0 if r1 is None else r1, q if w is None else w, block_table, seq_lens, keys, counters, out,
        seq_lens if guard is None else guard.flag,
        q.stride(0), q.stride(1),
        *strides,
        block_table.stride(0), out.stride(0), out.stride(1),
        num_blocks, mb, top_k, sink_blocks, local_blocks,
        MODE=mode, G=group, GP=next_pow2(group), D=d, DP=next_pow2(d),
        BITS=max(bits, 1), BITSP=max(bitsp, 16), WBITS=wbits,
        DK=max(16, min(next_pow2(d), 16384 // max(bitsp, 16))), BS=block_size, CB=cb,
        HPP=hpp, HP16=max(16, next_pow2(hpp)), TILES=tiles, NBLK=nblk, CH=min(nblk, launch.topk_chunk or 2048),
        RB=rb, KEY_BITS=key_bits, KEY_MAX=(1 << key_bits) - 1, GUARD=guard is not None,
        HASH_PREC=launch.hash_precision,
        num_warps=launch.num_warps or 8,
    )
    return out


def hash_retrieve(
    q: torch.Tensor,
    hash_codes: torch.Tensor,
    hash_weight: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    *,
    top_k: int,
    sink_blocks: int,
    local_blocks: int,
    shared: bool = True,
    validate: bool = True,
    workspace: RetrievalWorkspace | None = None,
    guard: IndexGuard | None = None,
    launch: RetrievalLaunch | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """GSA On-Device retrieval in one launch: query hash, min-over-tokens Hamming distance per block,
    block top-k (smallest distances; shared: the minimum distance over KV heads).

    q ``[B, Hq, D]`` (or ``[B, Hq, 1, D]``); hash_codes uint8 ``[num_blocks, Hkv, block_size, bits // 8]``
    indexed by physical block; hash_weight float32 ``[D, bits]``; block_table int32 ``[B, max_blocks]``;
    seq_lens int32 ``[B]``. Returns int32 ``[B, Hkv, top_k]`` sorted logical block ids, -1 padded.
    """
    check_selection_args(top_k, sink_blocks, local_blocks, shared)
    check_bool("validate", validate)
    nblocks, hkv, bs, nbytes = check_hash_codes(hash_codes)
    bits = nbytes * 8
    if not 8 <= bits <= 1024:
        raise ValueError(f"hash_codes must hold 1 to 128 bytes (8 to 1024 bits) per token, got {nbytes} bytes")
    word = 4 if nbytes % 4 == 0 else 2 if nbytes % 2 == 0 else 1
    if any(s % word for s in hash_codes.stride()[:3]):
        raise ValueError(f"hash_codes strides must be whole {word}-byte code words, got {tuple(hash_codes.stride())}")
    if hkv == 0:
        raise ValueError(f"hash_codes must have at least one KV head, got shape {tuple(hash_codes.shape)}")
    d = q.shape[-1] if isinstance(q, torch.Tensor) and q.dim() else None
    check_tensor("hash_weight", hash_weight, dtypes=(torch.float32,), shape=(d, bits))
    return _retrieve(_MODE_HAMMING, q, hash_codes, None, hash_weight.contiguous(), block_table, seq_lens,
                     num_blocks=nblocks, hkv=hkv, block_size=bs, bits=bits, top_k=top_k, sink_blocks=sink_blocks,
                     local_blocks=local_blocks, shared=shared, validate=validate, workspace=workspace, guard=guard,
                     launch=launch, out=out)


def _check_reps(names, r0, r1):
    check_tensor(names[0], r0, ndim=3, dtypes=KERNEL_FLOAT_DTYPES)
    check_last_dim_contiguous(names[0], r0)
    if r1 is not None:
        check_tensor(names[1], r1, dtypes=KERNEL_FLOAT_DTYPES, shape=tuple(r0.shape))
        if r1.stride() != r0.stride() or r1.dtype != r0.dtype:
            raise ValueError(
                f"{names[1]} must have the dtype and strides of {names[0]} ({r0.dtype}, {tuple(r0.stride())}), "
                f"got {r1.dtype}, {tuple(r1.stride())}"
            )
    nblocks, hkv, d = r0.shape
    if hkv == 0:
        raise ValueError(f"{names[0]} must have at least one KV head, got shape {tuple(r0.shape)}")
    if isinstance(r1, torch.Tensor) and r1.device != r0.device:
        raise ValueError(f"{names[1]} must be on {r0.device}, got {r1.device}")
    return nblocks, hkv, d


def _retrieve_reps(mode, q, names, r0, r1, block_table, seq_lens, block_size, top_k, sink_blocks, local_blocks,
                   shared, validate, workspace, guard, launch, out):
    """Dot / Quest retrieval from per-block representations ``r0`` (and ``r1``), named ``names``."""
    check_selection_args(top_k, sink_blocks, local_blocks, shared)
    check_bool("validate", validate)
    check_block_size_arg(block_size)
    nblocks, hkv, d = _check_reps(names, r0, r1)
    check_q_head_dim(q, d, names[0])
    return _retrieve(mode, q, r0, r1, None, block_table, seq_lens, num_blocks=nblocks, hkv=hkv,
                     block_size=block_size, bits=0, top_k=top_k, sink_blocks=sink_blocks,
                     local_blocks=local_blocks, shared=shared, validate=validate, workspace=workspace,
                     guard=guard, launch=launch, out=out)


def quest_retrieve(
    q: torch.Tensor,
    block_min: torch.Tensor,
    block_max: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    *,
    block_size: int,
    top_k: int,
    sink_blocks: int,
    local_blocks: int,
    shared: bool = True,
    quest_group: str = "sum",
    validate: bool = True,
    workspace: RetrievalWorkspace | None = None,
    guard: IndexGuard | None = None,
    launch: RetrievalLaunch | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Quest retrieval in one launch: the upper bound of q . k over each block from its K min/max
    ``[num_blocks, Hkv, D]`` (physical ids), block top-k (largest bounds; shared: summed over KV heads).

    ``quest_group`` as :func:`ucm_trt.sparse.score.quest_scores`' ``group``: ``"sum"`` (bound of each
    query head, summed over the GQA group) or ``"mean_query"`` (bound of the group-averaged query).
    """
    if quest_group not in ("sum", "mean_query"):
        raise ValueError(f"quest_group must be 'sum' or 'mean_query', got {quest_group!r}")
    mode = _MODE_QUEST_SUM if quest_group == "sum" else _MODE_QUEST_MEAN
    return _retrieve_reps(mode, q, ("block_min", "block_max"), block_min, block_max, block_table, seq_lens,
                          block_size, top_k, sink_blocks, local_blocks, shared, validate, workspace, guard, launch,
                          out)


def dot_retrieve(
    q: torch.Tensor,
    block_mean: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    *,
    block_size: int,
    top_k: int,
    sink_blocks: int,
    local_blocks: int,
    shared: bool = True,
    validate: bool = True,
    workspace: RetrievalWorkspace | None = None,
    guard: IndexGuard | None = None,
    launch: RetrievalLaunch | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Dot-product retrieval in one launch: ``q_avg . block_mean`` per block (``[num_blocks, Hkv, D]``,
    physical ids), block top-k (largest scores; shared: summed over KV heads)."""
    return _retrieve_reps(_MODE_DOT, q, ("block_mean",), block_mean, None, block_table, seq_lens, block_size,
                          top_k, sink_blocks, local_blocks, shared, validate, workspace, guard, launch, out)
