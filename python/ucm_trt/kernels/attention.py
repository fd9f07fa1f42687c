"""Paged block-sparse / ReRoPE attention: ONE Triton kernel for every path, and its launch rule.

The same ``@triton.jit`` function serves
* the runtime (:func:`paged_sparse_attention`, :func:`paged_rerope_attention`): the chunk's own
  K/V are already in the pool;
* the UCM ONNX ops' TensorRT JIT plugin (:func:`ucm_trt.kernels.aot.paged_attention_chunk`): the
  pool holds the past only, the chunk's K/V arrive as separate ``k``/``v`` inputs (``CHUNK_KV``);
* the TensorRT AOT plugin: the same kernel compiled to PTX with TensorRT's calling convention
  ``[inputs][int32 extras][outputs]`` (:mod:`ucm_trt.kernels.aot.attention_op`).

Its parameters are therefore ordered ``q, k, v, kv_pool, block_table, seq_lens, selection``
(the op's inputs) and the split counters (an input of the split AOT kernel), then int32 sizes and
strides (TensorRT's extras, computed from the shapes), then the output and the split partials (an
output of the split AOT kernel), then JIT-only pointers. Every float and geometry attribute is a
``tl.constexpr``.

* **Grid** ``(B * Hkv, query tiles, splits)``. A program owns one KV head of one sequence and all
  ``G = Hq / Hkv`` query heads of its group (rows = query token x group head, padded to >= 16 for
  ``tl.dot``), so every K/V tile is read once per query tile.
* **Work list** per (sequence, KV head, query tile): the selection's slots (the part of each
  selected block that lies before the chunk; all pre-chunk blocks when there is no selection),
  then the chunk's own blocks (causal). Unselected keys are never loaded.
* **Split-K (flash-decoding), merged in the kernel.** The work list is cut into ``splits``
  contiguous pieces; each writes a normalised partial output and its log2-sum-exp to a caller-owned
  scratch buffer and takes a ticket from an int32 arrival counter of its (sequence, KV head, query
  tile) with acquire-release order; the program that arrives last merges the tile's splits by
  log-sum-exp, writes the output and re-zeroes the counter (so the counters stay zero between
  launches: CUDA-graph replayable, no memset). One launch on every path, TensorRT's AOT launcher
  included (it takes one kernel per plugin). With one split the output is written directly.
* **head_dim** (:mod:`ucm_trt.limits`: a multiple of 16 in [16, 256]) runs in the next
  power-of-two tile: each RoPE half in ``HALF_P`` lanes, V in ``DV`` lanes, the extra lanes
  masked on load and store. The cache is never copied or padded.
* **Index safety.** A block id that would address memory outside the block table or the pool
  (selection id < -1 or >= max_blocks, a block-table entry outside ``[0, num_blocks)``, a
  ``seq_len`` the table cannot hold) is never dereferenced: the block is skipped (``seq_len``
  clamped) and, when the launcher got an :class:`~ucm_trt.kernels.guard.IndexGuard`, an error
  code is set with an atomic max (no host sync).
* fp16/bf16 operands on the tensor cores; softmax and accumulation fp32 in the exp2 domain.
* **ReRoPE.** K stored un-rotated. ``s2 = rope(q, window) . k`` per tile and, only for tiles that
  reach inside the window, ``s1 = rope(q, i) . rope(k, j)`` with each key rotated in registers;
  ``s = where(i - j < window, s1, s2)``. Angles relative to the program's first query position
  (RoPE depends on ``i - j`` only), so fp32 angle error grows with the window, not the position.

Visibility (same as :func:`ucm_trt.reference.paged_sparse_attention`): key position ``p`` is
visible to query position ``i`` iff ``p <= i`` and (``p >= seq_len - Tq`` or block
``p // block_size`` is selected for the query's KV head). Selection slots holding -1 are empty;
a repeated id (next to itself) counts once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ucm_trt import limits
from ucm_trt._validation import check_gqa, check_positive_int, check_same_device, check_tensor
from ucm_trt.kernels._common import (
    KERNEL_FLOAT_DTYPES,
    check_block_table_contents,
    check_bool,
    check_float,
    check_last_dim_contiguous,
    check_selection_contents,
    next_pow2,
    num_sms,
)
from ucm_trt.kernels.guard import IndexGuard
from ucm_trt.kernels.guard_flag import raise_flag

__all__ = [
    "ATTENTION_GUARD_CODES",
    "AttentionLaunch",
    "AttentionPlan",
    "AttentionWorkspace",
    "GUARD_BAD_BLOCK_TABLE",
    "GUARD_BAD_SELECTION",
    "GUARD_BAD_SEQ_LEN",
    "paged_rerope_attention",
    "paged_sparse_attention",
    "plan_attention",
    "split_scratch_sizes",
]

LOG2E = 1.4426950408889634
# block ids a program resolves per vector load (its work list is walked in chunks of this many)
ITEM_CHUNK = 32

# IndexGuard codes the attention kernel sets (IndexGuard.check reports the largest)
GUARD_BAD_SELECTION = 21
GUARD_BAD_BLOCK_TABLE = 22
GUARD_BAD_SEQ_LEN = 23
ATTENTION_GUARD_CODES = {
    GUARD_BAD_SELECTION: "paged attention: a selection id is < -1 or >= the block table's width "
    "(the block was skipped)",
    GUARD_BAD_BLOCK_TABLE: "paged attention: a block_table entry in use lies outside [0, num_blocks) of the "
    "pool (the block was skipped)",
    GUARD_BAD_SEQ_LEN: "paged attention: a seq_len is below the chunk length or beyond the block table's "
    "capacity (it was clamped)",
}
_BAD_SELECTION = tl.constexpr(GUARD_BAD_SELECTION)
_BAD_BLOCK_TABLE = tl.constexpr(GUARD_BAD_BLOCK_TABLE)
_BAD_SEQ_LEN = tl.constexpr(GUARD_BAD_SEQ_LEN)


@triton.jit
def _softmax_update(s, v, kmask, pos, qpos, row_ok, m_i, l_i, acc, QK_SCALE: tl.constexpr, DOT_PREC: tl.constexpr):
    """One online-softmax step (exp2 domain) over a key tile: scores ``s`` [rows, keys], values ``v``."""
    s = s * QK_SCALE
    vis = kmask[None, :] & (pos[None, :] <= qpos[:, None]) & row_ok[:, None]
    s = tl.where(vis, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(s - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PREC)
    return m_new, l_i, acc


@triton.jit
def _resolve_items(jv, item_hi, n_sel_items, sel_row, bt_row, cb0, chunk_start,
                   MAX_BLOCKS, NUM_BLOCKS, BS: tl.constexpr, HAS_SEL: tl.constexpr, CHUNK_KV: tl.constexpr):
    """Items ``jv`` of a program's work list (selection slots, then the chunk's blocks): in range, is a
    selection slot, logical block, whether its block-table entry is read (``use``), whether it is a
    pool item, the raw physical id, and which ids are out of range (a selection id, a table entry)."""
    in_rng = jv < item_hi
    is_sel = jv < n_sel_items
    if HAS_SEL:
        sid = tl.load(sel_row + jv, mask=in_rng & is_sel, other=-1)
        prev = tl.load(sel_row + jv - 1, mask=in_rng & is_sel & (jv > 0), other=-1)
        bad_sel = in_rng & is_sel & ((sid < -1) | (sid >= MAX_BLOCKS))
        sel_ok = (sid >= 0) & (sid < MAX_BLOCKS) & (sid != prev) & (sid * BS < chunk_start)
    else:
        sid = jv
        bad_sel = jv < 0
        sel_ok = jv >= 0
    chunk_blk = cb0 + (jv - n_sel_items)
    blk_v = tl.where(is_sel, sid, chunk_blk)
    if CHUNK_KV:
        use = in_rng & is_sel & sel_ok  # chunk items read k/v, not the pool
        pool_item = is_sel
    else:
        use = in_rng & (sel_ok | ~is_sel)
        pool_item = in_rng
    phys_raw = tl.load(bt_row + blk_v, mask=use, other=0)
    bad_phys = use & ((phys_raw < 0) | (phys_raw >= NUM_BLOCKS))
    return in_rng, is_sel, blk_v, use, pool_item, phys_raw, bad_sel, bad_phys


@triton.jit
def _paged_attn_fwd(
    q_ptr, k_ptr, v_ptr, pool_ptr, bt_ptr, seqlen_ptr, sel_ptr, cnt_ptr,
    T, MAX_BLOCKS, NUM_SEL, NUM_BLOCKS, ITEMS_PER_SPLIT,
    stride_qb, stride_qh, stride_qt,
    stride_kb, stride_kh, stride_kt,
    stride_pn, stride_pkv, stride_ph, stride_pt,
    stride_btb, stride_sb, stride_sh,
    stride_ob, stride_oh, stride_ot,
    out_ptr, part_ptr, guard_ptr,
    H_KV: tl.constexpr, G: tl.constexpr, HALF: tl.constexpr, HALF_P: tl.constexpr, D: tl.constexpr,
    DV: tl.constexpr, BS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_M: tl.constexpr,
    HAS_SEL: tl.constexpr, CHUNK_KV: tl.constexpr, SPLIT: tl.constexpr, HAS_GUARD: tl.constexpr,
    QK_SCALE: tl.constexpr, REROPE: tl.constexpr, WINDOW: tl.constexpr, LOG2_THETA: tl.constexpr,
    LOGN: tl.constexpr, INV_LOG_TRAIN: tl.constexpr, DOT_PREC: tl.constexpr, DOT_F32: tl.constexpr,
    ITEMS: tl.constexpr, BPT: tl.constexpr, MERGE_ROWS: tl.constexpr, MERGE_SPLITS: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    pid_t = tl.program_id(1)
    pid_s = tl.program_id(2)
    b = pid_bh // H_KV
    h = pid_bh % H_KV
    b64 = b.to(tl.int64)

    # ---- seq_len, clamped to what the block table can hold (flagged) ----
    seq_raw = tl.load(seqlen_ptr + b)
    if CHUNK_KV:
        cap = MAX_BLOCKS * BS + T  # the pool holds the past only
    else:
        cap = MAX_BLOCKS * BS
    seq_len = tl.minimum(tl.maximum(seq_raw, T), cap)
    if HAS_GUARD:
        raise_flag(guard_ptr, _BAD_SEQ_LEN, mask=(seq_raw < T) | (seq_raw > cap))
    chunk_start = seq_len - T

    rows = tl.arange(0, BLOCK_M)
    t_loc = rows // G
    g = rows % G
    t = pid_t * BLOCK_T + t_loc
    row_ok = (t_loc < BLOCK_T) & (t < T)
    qpos = chunk_start + t
    dh = tl.arange(0, HALF_P)
    dv = tl.arange(0, DV)
    # lane masks of a padded head_dim; constant true (folded away) when it is a power of two
    if HALF_P == HALF:
        dh_ok = tl.full([HALF_P], 1, tl.int1)
    else:
        dh_ok = dh < HALF
    if DV == D:
        dv_ok = tl.full([DV], 1, tl.int1)
    else:
        dv_ok = dv < D
    nn = tl.arange(0, BLOCK_N)

    q_rows = q_ptr + b64 * stride_qb + (h * G + g) * stride_qh + t * stride_qt
    q_mask = row_ok[:, None] & dh_ok[None, :]
    q1 = tl.load(q_rows[:, None] + dh[None, :], mask=q_mask, other=0.0).to(tl.float32)
    q2 = tl.load(q_rows[:, None] + HALF + dh[None, :], mask=q_mask, other=0.0).to(tl.float32)

    # dot operand dtype: the pool's (tensor cores), or fp32 when run by the interpreter (DOT_F32)
    if DOT_F32:
        kv_dtype = tl.float32
    else:
        kv_dtype = pool_ptr.dtype.element_ty
    t_first = pid_t * BLOCK_T
    t_hi = tl.minimum(t_first + BLOCK_T, T)  # chunk tokens [0, t_hi) are visible to this tile
    q_first_pos = chunk_start + t_first
    if REROPE:
        if LOGN:
            ln = tl.maximum(tl.log(qpos.to(tl.float32) + 1.0) * INV_LOG_TRAIN, 1.0)
            q1 = q1 * ln[:, None]
            q2 = q2 * ln[:, None]
        # inv_freq[i] = theta ** (-2 i / D) = exp2(-(i / HALF) * log2(theta))
        inv_freq = tl.exp2(-(dh.to(tl.float32) / HALF) * LOG2_THETA)
        # q rotated by its position relative to the program's first query (see module doc)
        ang_q = (qpos - q_first_pos).to(tl.float32)[:, None] * inv_freq[None, :]
        cq = tl.cos(ang_q)
        sq = tl.sin(ang_q)
        qr1 = (q1 * cq - q2 * sq).to(kv_dtype)
        qr2 = (q2 * cq + q1 * sq).to(kv_dtype)
        ang_w = inv_freq * WINDOW
        cw = tl.cos(ang_w)[None, :]
        sw = tl.sin(ang_w)[None, :]
        qa = (q1 * cw - q2 * sw).to(kv_dtype)
        qb = (q2 * cw + q1 * sw).to(kv_dtype)
    else:
        qa = q1.to(kv_dtype)
        qb = q2.to(kv_dtype)

    # ---- work list: selection slots (past part of each selected block), then the chunk's blocks ----
    cb0 = chunk_start // BS
    if HAS_SEL:
        n_sel_items = NUM_SEL
    else:
        n_sel_items = (chunk_start + BS - 1) // BS
    if CHUNK_KV:
        n_chunk_items = (t_hi + BS - 1) // BS
    else:
        n_chunk_items = (chunk_start + t_hi - 1) // BS - cb0 + 1
    n_items = n_sel_items + n_chunk_items
    item_lo = pid_s * ITEMS_PER_SPLIT
    item_hi = tl.minimum(item_lo + ITEMS_PER_SPLIT, n_items)

    sel_row = sel_ptr + b64 * stride_sb + h * stride_sh
    bt_row = bt_ptr + b64 * stride_btb
    kv_head = pool_ptr + h * stride_ph
    ii = tl.arange(0, ITEMS)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, DV], tl.float32)
    # With the chunk's K/V as separate inputs (CHUNK_KV) the work list is walked in two passes, the
    # selection slots (the pool) and then the chunk's blocks (k/v), so every tile issues ONE load per
    # operand from one base pointer: a tile that could hold either needed two masked loads each, and
    # the pipeliner buffered both (2x the shared memory per stage; sm_90, d128, 16-key tiles: 45 KiB
    # at 3 stages instead of 29 KiB, which kept the AOT path, held to 48 KiB, at 16-key tiles).
    for src in tl.static_range(1 + CHUNK_KV):  # src 1: the chunk's blocks from k/v
        if CHUNK_KV:
            if src == 1:
                lo_p = tl.maximum(item_lo, n_sel_items)
                hi_p = item_hi
            else:
                lo_p = item_lo
                hi_p = tl.minimum(item_hi, n_sel_items)
        else:
            lo_p = item_lo
            hi_p = item_hi
        for c0 in range(lo_p, hi_p, ITEMS):
            # Resolve a chunk of items up front (one vector load each), so the K/V addresses of the
            # loop below do not wait on a chain of scalar index loads.
            in_rng, is_sel, blk_v, use, pool_item, phys_raw, bad_sel, bad_phys = _resolve_items(
                c0 + ii, hi_p, n_sel_items, sel_row, bt_row, cb0, chunk_start,
                MAX_BLOCKS, NUM_BLOCKS, BS, HAS_SEL, CHUNK_KV)  # fmt: skip
            # an item is read iff it is in range and every id on its way is valid
            live_v = tl.where(pool_item, use & ~bad_phys, in_rng)
            # Key tiles over these items: key g is token g % BS of item g // BS. A tile spans BPT whole
            # blocks (blocks smaller than BLOCK_N) or a BLOCK_N-token slice of one block. No branch on
            # the item: dead items are masked, so Triton can pipeline the loads (cp.async).
            for tt in range(0, tl.minimum(ITEMS, hi_p - c0) * BS, BLOCK_N):
                j0 = tt // BS
                g_key = tt + nn
                rb = g_key // BS - j0
                tok = g_key % BS
                blk_r = tl.zeros([BLOCK_N], tl.int32)
                phys_r = tl.zeros([BLOCK_N], tl.int32)
                live_r = tl.zeros([BLOCK_N], tl.int32)
                for kk in tl.static_range(BPT):
                    pick = ii == j0 + kk
                    blk_r = tl.where(rb == kk, tl.sum(tl.where(pick, blk_v, 0), 0), blk_r)
                    phys_r = tl.where(rb == kk, tl.sum(tl.where(pick, phys_raw, 0), 0), phys_r)
                    live_r = tl.where(rb == kk, tl.sum(tl.where(pick, live_v.to(tl.int32), 0), 0), live_r)
                j_r = c0 + j0 + rb
                sel_r = j_r < n_sel_items
                if CHUNK_KV:
                    c_r = j_r - n_sel_items
                    pos = tl.where(sel_r, blk_r * BS, chunk_start + c_r * BS) + tok
                    lo = tl.where(sel_r, blk_r * BS, chunk_start)
                    hi = tl.where(sel_r, chunk_start, chunk_start + t_hi)
                else:
                    pos = blk_r * BS + tok
                    lo = tl.where(sel_r, blk_r * BS, tl.maximum(chunk_start, blk_r * BS))
                    hi = tl.where(sel_r, chunk_start, seq_len)
                kmask = (live_r > 0) & (pos >= lo) & (pos < hi)
                km = kmask[:, None] & dh_ok[None, :]
                kvm = kmask[:, None] & dv_ok[None, :]
                if src == 1:
                    # the chunk's rows, from the k/v inputs
                    c_rows = b64 * stride_kb + h * stride_kh + (pos - chunk_start).to(tl.int64) * stride_kt
                    k1 = tl.load(k_ptr + c_rows[:, None] + dh[None, :], mask=km, other=0.0).to(kv_dtype)
                    k2 = tl.load(k_ptr + c_rows[:, None] + HALF + dh[None, :], mask=km, other=0.0).to(kv_dtype)
                    v = tl.load(v_ptr + c_rows[:, None] + dv[None, :], mask=kvm, other=0.0).to(kv_dtype)
                else:
                    p_rows = kv_head + phys_r.to(tl.int64) * stride_pn + tok * stride_pt
                    k1 = tl.load(p_rows[:, None] + dh[None, :], mask=km, other=0.0).to(kv_dtype)
                    k2 = tl.load(p_rows[:, None] + HALF + dh[None, :], mask=km, other=0.0).to(kv_dtype)
                    v = tl.load(p_rows[:, None] + stride_pkv + dv[None, :], mask=kvm, other=0.0).to(kv_dtype)
                s = tl.dot(qa, tl.trans(k1), input_precision=DOT_PREC)
                s = tl.dot(qb, tl.trans(k2), s, input_precision=DOT_PREC)
                if REROPE:
                    # rows need not be contiguous positions: rotate each key by its own angle
                    if q_first_pos - tl.max(tl.where(kmask, pos, -(1 << 30)), 0) < WINDOW:
                        ang_k = (pos - q_first_pos).to(tl.float32)[:, None] * inv_freq[None, :]
                        ck = tl.cos(ang_k)
                        sk = tl.sin(ang_k)
                        k1f = k1.to(tl.float32)
                        k2f = k2.to(tl.float32)
                        kr1 = (k1f * ck - k2f * sk).to(kv_dtype)
                        kr2 = (k2f * ck + k1f * sk).to(kv_dtype)
                        s1 = tl.dot(qr1, tl.trans(kr1), input_precision=DOT_PREC)
                        s1 = tl.dot(qr2, tl.trans(kr2), s1, input_precision=DOT_PREC)
                        s = tl.where((qpos[:, None] - pos[None, :]) < WINDOW, s1, s)
                m_i, l_i, acc = _softmax_update(s, v, kmask, pos, qpos, row_ok, m_i, l_i, acc, QK_SCALE, DOT_PREC)

    if HAS_GUARD:
        # The ids this program met, checked again after the key loop: nothing of the guard is live in
        # that loop (per-lane flags carried across it took 7 more registers with Triton 3.9; atomics
        # inside it cost ~30 % on an H200). The guarded kernel still runs 12-14 % slower at 128K batch 8
        # on an H100 (Triton 3.6, session 13: not registers, 158 vs 162 there); cause not yet found.
        # The table and selection rows are in L1/L2 by now.
        for c0 in range(item_lo, item_hi, ITEMS):
            _, _, _, _, _, _, bad_sel, bad_phys = _resolve_items(
                c0 + ii, item_hi, n_sel_items, sel_row, bt_row, cb0, chunk_start,
                MAX_BLOCKS, NUM_BLOCKS, BS, HAS_SEL, CHUNK_KV)  # fmt: skip
            # one reduction per lane: the larger code where both hold (what two atomic maxes would leave)
            code = tl.where(bad_phys, _BAD_BLOCK_TABLE, tl.where(bad_sel, _BAD_SELECTION, 0)).to(tl.int32)
            raise_flag(guard_ptr + ii * 0, code, mask=bad_sel | bad_phys)
    l_safe = tl.where(l_i > 0.0, l_i, 1.0)
    o = acc / l_safe[:, None]
    o_rows = out_ptr + b64 * stride_ob + (h * G + g) * stride_oh + t * stride_ot
    o_mask = row_ok[:, None] & dv_ok[None, :]
    if SPLIT:
        # Split-K merged in the kernel: every split writes its normalised partial output and its
        # log2-sum-exp, then takes a ticket from the tile's arrival counter (acquire-release, after a
        # CTA barrier so the whole program's stores are ordered before it). The program that arrives
        # last merges all splits of the tile and re-zeroes the counter for the next launch.
        n_split = tl.num_programs(2)
        tile = pid_bh * tl.num_programs(1) + pid_t  # (sequence, KV head, query tile)
        lse_base = (tl.num_programs(0) * tl.num_programs(1) * n_split).to(tl.int64) * (BLOCK_M * DV)
        tile_row0 = tile.to(tl.int64) * n_split * BLOCK_M  # this tile's first partial row (split 0)
        prow = tile_row0 + pid_s * BLOCK_M + rows
        tl.store(part_ptr + lse_base + prow, tl.where(l_i > 0.0, m_i + tl.log2(l_safe), float("-inf")), mask=row_ok)
        tl.store(part_ptr + prow[:, None] * DV + dv[None, :], o, mask=o_mask)
        tl.debug_barrier()
        ticket = tl.atomic_add(cnt_ptr + tile, 1, sem="acq_rel", scope="gpu")
        if ticket == n_split - 1:
            tl.store(cnt_ptr + tile, 0)
            # merge token by token (only the tile's tokens < T: one at decode), MERGE_SPLITS splits of
            # the token's G rows per load, so the tail costs a few L2 round trips, not one per split
            gm = tl.arange(0, MERGE_ROWS)
            g_ok = gm < G
            sc = tl.arange(0, MERGE_SPLITS)
            for tt in range(0, tl.minimum(BLOCK_T, T - pid_t * BLOCK_T)):
                m = tl.full([MERGE_ROWS], float("-inf"), tl.float32)
                l_sum = tl.zeros([MERGE_ROWS], tl.float32)
                res = tl.zeros([MERGE_ROWS, DV], tl.float32)
                for s0 in range(0, n_split, MERGE_SPLITS):
                    sp = s0 + sc
                    r2 = tile_row0 + sp.to(tl.int64)[:, None] * BLOCK_M + (tt * G + gm)[None, :]  # [splits, G]
                    ok2 = (sp < n_split)[:, None] & g_ok[None, :]
                    # .cg: read at L2, where the other programs' stores are (past this SM's L1)
                    lse = tl.load(part_ptr + lse_base + r2, mask=ok2, other=float("-inf"), cache_modifier=".cg")
                    o3 = tl.load(part_ptr + r2[:, :, None] * DV + dv[None, None, :],
                                 mask=ok2[:, :, None] & dv_ok[None, None, :], other=0.0, cache_modifier=".cg")
                    m_new = tl.maximum(m, tl.max(lse, 0))
                    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
                    alpha = tl.exp2(m - m_safe)
                    w = tl.exp2(lse - m_safe[None, :])
                    l_sum = l_sum * alpha + tl.sum(w, 0)
                    res = res * alpha[:, None] + tl.sum(o3 * w[:, :, None], 0)
                    m = m_new
                res = res / tl.where(l_sum > 0.0, l_sum, 1.0)[:, None]
                m_rows = out_ptr + b64 * stride_ob + (h * G + gm) * stride_oh + (pid_t * BLOCK_T + tt) * stride_ot
                tl.store(m_rows[:, None] + dv[None, :], res.to(out_ptr.dtype.element_ty),
                         mask=g_ok[:, None] & dv_ok[None, :])
    else:
        tl.store(o_rows[:, None] + dv[None, :], o.to(out_ptr.dtype.element_ty), mask=o_mask)


# ---------------------------------------------------------------------------------- launch rule


@dataclass(frozen=True, kw_only=True)
class AttentionLaunch:
    """Tuning knobs of the paged attention kernel (results never depend on them).

    ``num_splits=None`` picks enough splits of the work list to give every SM at least
    ``programs_per_sm`` programs (:func:`plan_attention`). ``block_n=None`` uses
    :func:`default_block_n` keys per inner tile. ``block_t=None`` uses the query tile of
    :func:`plan_attention`. ``num_warps``/``num_stages=None``: :func:`default_warps_stages`.
    ``max_registers``: a cap on registers per thread (Triton's ``maxnreg``; ``None``: the compiler's
    choice). Triton 3.6, the lent H100's, gives the runtime's decode tile 162 registers (3 CTAs per SM)
    where Triton 3.9 gives 96; a cap of 128 fits 4 CTAs per SM at 16 bytes of spills (sm_90, d128,
    session 13). Untimed: the benchmark's ``ours_sparse_maxnreg`` rows measure it.
    """

    num_splits: int | None = None
    programs_per_sm: int = 2
    block_n: int | None = None
    block_t: int | None = None
    num_warps: int | None = None
    num_stages: int | None = None
    max_registers: int | None = None

    def __post_init__(self) -> None:
        for name in ("num_splits", "block_n", "block_t", "num_warps", "num_stages", "max_registers"):
            val = getattr(self, name)
            if val is not None:
                check_positive_int(name, val)
        check_positive_int("programs_per_sm", self.programs_per_sm)
        if self.block_n is not None and (self.block_n & (self.block_n - 1) or self.block_n < 16):
            raise ValueError(f"block_n must be a power of two >= 16, got {self.block_n}")
        if self.num_warps is not None and self.num_warps & (self.num_warps - 1):
            raise ValueError(f"num_warps must be a power of two, got {self.num_warps}")
        if self.max_registers is not None and not 24 <= self.max_registers <= 255:
            raise ValueError(f"max_registers must be in [24, 255] (registers per thread), got {self.max_registers}")


DEFAULT_LAUNCH = AttentionLaunch()

# query rows (token x group head) per program: decode tiles and prefill tiles
DECODE_ROWS = 16
PREFILL_ROWS = 64


def head_tiles(head_dim: int) -> tuple[int, int]:
    """``(HALF_P, DV)``: lanes of each RoPE half and of V; head_dim is padded to a power of two."""
    return max(16, next_pow2(head_dim // 2)), max(16, next_pow2(head_dim))


def query_tile(rows: int, group: int, tq: int | None = None) -> tuple[int, int]:
    """``(BLOCK_T, BLOCK_M)`` for a tile of about ``rows`` query rows: ``BLOCK_T`` tokens of all
    ``group`` heads, at most ``tq`` tokens when the chunk length is known."""
    block_t = max(1, rows // group)
    if tq is not None:
        block_t = min(block_t, tq)
    return block_t, max(16, next_pow2(block_t * group))


def default_block_n(block_size: int, head_dim: int) -> int:
    """Keys per inner tile: 64 to 128 (64 above head_dim 128). Blocks smaller than the tile are
    gathered several per tile (``BPT`` blocks), larger ones walked in sub-tiles."""
    return min(max(block_size, 64), 128 if head_dim <= 128 else 64)


#: (num_warps, num_stages) of every launch but the one below: the best of a sweep on an H200 (128K
#: context, 1/8 budget, batch 8) of the former kernel, and again of this one on an H100 (2026-12-07:
#: 64 keys x 2 stages x 4 warps was the fastest of 12 tiles at batch 1 and batch 8)
DEFAULT_WARPS_STAGES = (4, 2)
#: (block_n, num_warps, num_stages) of a dense decode over a padded head_dim (80, 96: lanes padded to
#: 128) with blocks of 64 or more: the H100 sweep at 128K, batch 8 (2026-12-07,
#: benchmarks/results/kernels_NVIDIA-H100-80GB-HBM3_2026-12-07_s6.json) took head_dim 80 from 1384
#: to 1147 us and head_dim 96 from 1444 to 1156 us (SDPA: 907 / 1090 us). Sparse decode kept the
#: default (at head_dim 128 this tile is 1.3x slower at batch 1); other shapes were not swept.
PADDED_DENSE_DECODE_TILE = (128, 8, 3)


def default_warps_stages(*, dense: bool, decode: bool, head_dim: int, block_size: int) -> tuple[int | None, int, int]:
    """``(block_n or None, num_warps, num_stages)`` when the launch leaves them to the rule: the padded
    dense decode tile (:data:`PADDED_DENSE_DECODE_TILE`) for a decode over every block with a head_dim
    that is not a power of two and blocks of >= 64 tokens, else :data:`DEFAULT_WARPS_STAGES` (block_n
    None: :func:`default_block_n`)."""
    if dense and decode and head_dim != next_pow2(head_dim) and block_size >= 64:
        return PADDED_DENSE_DECODE_TILE
    return (None, *DEFAULT_WARPS_STAGES)


def blocks_per_tile(block_n: int, block_size: int) -> int:
    return max(1, block_n // block_size)


def _even_split(work_items: int, splits: int) -> tuple[int, int]:
    """``(items per split, splits)`` with no empty split."""
    splits = max(1, min(splits, work_items))
    per_split = -(-work_items // splits)
    return per_split, -(-work_items // per_split)


def min_splits(base, programs_per_sm: int, sms: int, cdiv):
    """The fewest splits that give ``base >= 1`` programs (``batch x Hkv x query tiles``) at least
    ``programs_per_sm x sms`` programs in all: ``ceil(P / base)`` (>= 1). ``base`` is an int or a
    TensorRT shape expression (kept on the left of every operator; ``cdiv`` matches it), so the
    AOT plugin's grid evaluates the same rule at run time."""
    return cdiv(base * 0 + programs_per_sm * sms, base)


def _balanced_split(work_items: int, base: int, programs_per_sm: int, sms: int) -> tuple[int, int]:
    """The split count for ``base`` programs without splitting: at least ``programs_per_sm x sms``
    programs in all (:func:`min_splits`), and among 1x to 2x that count the one whose programs
    spread most evenly over the SMs (``P / (ceil(P / sms) x sms)``, fewest splits on ties). Equal
    programs that do not fill a last round leave SMs idle while the rest finish: 320 programs on 132
    SMs run as 3 rounds of which the last is 42% full (81% efficiency), 384 as 3 rounds at 97%.
    (The AOT path, whose batch and chunk length are only known as expressions at build time, takes
    :func:`min_splits` itself.)"""
    s0 = min_splits(base, programs_per_sm, sms, lambda a, b: -(-a // b))
    if s0 <= 1:
        return _even_split(work_items, 1)
    best = None
    for cand in range(s0, 2 * s0 + 1):
        per_split, splits = _even_split(work_items, cand)
        programs = base * splits
        eff = programs / (-(-programs // sms) * sms)
        if best is None or eff > best[0] + 1e-9:
            best = (eff, per_split, splits)
    return best[1], best[2]


@dataclass(frozen=True, kw_only=True)
class AttentionPlan:
    """One launch of :func:`_paged_attn_fwd` (split-K merged in the kernel when ``splits > 1``)."""

    block_t: int
    block_m: int
    block_n: int
    n_qtiles: int
    splits: int
    items_per_split: int
    items: int
    num_warps: int
    num_stages: int
    max_registers: int | None = None


def plan_attention(
    *, batch: int, num_kv_heads: int, group: int, tq: int, head_dim: int, block_size: int,
    work_items: int, sms: int, launch: AttentionLaunch = DEFAULT_LAUNCH, dense: bool = False,
) -> AttentionPlan:
    """The launch rule shared by every path.

    * query tile: decode tiles (16 rows) when all ``tq x group`` rows fit, else prefill tiles
      (64 rows); key tile :func:`default_block_n`;
    * splits: at least ``ceil(programs_per_sm x SMs / (batch x Hkv x query tiles))`` pieces of the
      ``work_items`` (blocks one program may visit), so a batch-1 decode still fills the GPU, the
      count chosen so the programs spread evenly over the SMs (:func:`_balanced_split`); none when
      the grid already fills the GPU;
    * ``items``: block ids resolved per vector load (a power of two <= ``ITEM_CHUNK``);
    * warps and stages (and the key tile) the launch leaves open: :func:`default_warps_stages`
      (``dense``: the launch visits every block, no selection).
    """
    decode = tq * group <= DECODE_ROWS
    rows = DECODE_ROWS if decode else PREFILL_ROWS
    block_t, _ = query_tile(rows, group, tq)
    if launch.block_t is not None:
        block_t = min(launch.block_t, tq)
    block_m = max(16, next_pow2(block_t * group))
    rule_n, rule_warps, rule_stages = default_warps_stages(dense=dense, decode=decode, head_dim=head_dim,
                                                           block_size=block_size)
    block_n = launch.block_n or rule_n or default_block_n(block_size, head_dim)
    n_qtiles = -(-tq // block_t)
    base = batch * num_kv_heads * n_qtiles
    if launch.num_splits is not None:
        per_split, splits = _even_split(work_items, launch.num_splits)
    else:
        per_split, splits = _balanced_split(work_items, base, launch.programs_per_sm, sms)
    return AttentionPlan(
        block_t=block_t, block_m=block_m, block_n=block_n, n_qtiles=n_qtiles, splits=splits,
        items_per_split=per_split,
        items=max(2, blocks_per_tile(block_n, block_size), min(ITEM_CHUNK, next_pow2(per_split))),
        num_warps=launch.num_warps or rule_warps, num_stages=launch.num_stages or rule_stages,
        max_registers=launch.max_registers,
    )


def rope_constexprs(rerope: bool, window: int, theta: float, logn_training_length: int | None) -> dict:
    """The ReRoPE constexprs of the kernel (all zero / off for plain sparse attention)."""
    if not rerope:
        return dict(REROPE=False, WINDOW=0, LOG2_THETA=0.0, LOGN=False, INV_LOG_TRAIN=0.0)
    return dict(
        REROPE=True, WINDOW=int(window), LOG2_THETA=math.log2(theta), LOGN=logn_training_length is not None,
        INV_LOG_TRAIN=0.0 if logn_training_length is None else 1.0 / math.log(logn_training_length),
    )


def geometry_constexprs(*, num_kv_heads: int, group: int, head_dim: int, block_size: int, scale: float) -> dict:
    half_p, dv = head_tiles(head_dim)
    return dict(H_KV=num_kv_heads, G=group, HALF=head_dim // 2, HALF_P=half_p, D=head_dim, DV=dv, BS=block_size,
                QK_SCALE=float(scale) * LOG2E)


# fp32 partial elements the merging program loads per step (64 registers a thread at 4 warps)
MERGE_ELEMS = 8192


def merge_tile(group: int, dv: int) -> dict:
    """The in-kernel merge's constexprs: ``MERGE_ROWS``, one query token's rows (its ``group`` heads)
    rounded up to a power of two, and ``MERGE_SPLITS``, the splits merged per load (a power of two
    in [1, 64] within :data:`MERGE_ELEMS` loaded elements)."""
    rows = next_pow2(group)
    return dict(MERGE_ROWS=rows, MERGE_SPLITS=max(1, min(64, MERGE_ELEMS // (rows * dv))))


def split_scratch_sizes(*, batch: int, num_kv_heads: int, n_qtiles: int, splits: int, block_m: int,
                        dv: int) -> tuple[int, int]:
    """``(counters, partials)``: int32 arrival counters (one per sequence x KV head x query tile)
    and fp32 partial elements (``[tiles x splits x BLOCK_M, DV]`` outputs, then as many
    log2-sum-exps) of one launch of the split-K kernel (``SPLIT`` on, also with one split)."""
    tiles = batch * num_kv_heads * n_qtiles
    return tiles, tiles * splits * block_m * (dv + 1)


class AttentionWorkspace:
    """Scratch of the split-K attention kernel, owned by the caller and reused across calls and
    CUDA-graph replays (one per stream: two launches in flight must not share one).

    ``counters`` int32: one arrival counter per (sequence, KV head, query tile), all zero between
    launches (the program that merges a tile re-zeroes its counter, so no memset is needed).
    ``partials`` fp32: every split's partial output and log2-sum-exp. Both grow on demand; a grown
    buffer is allocated (the counters zeroed) on the current stream, so run a shape eagerly once
    before capturing it in a graph. Outgrown buffers are kept, not freed: a graph captured earlier
    still launches on them.
    """

    def __init__(self, device: torch.device | str) -> None:
        self.device = torch.device(device)
        self.counters = torch.zeros(0, dtype=torch.int32, device=self.device)
        self.partials = torch.empty(0, dtype=torch.float32, device=self.device)
        self._outgrown: list[torch.Tensor] = []

    def buffers(self, counters: int, partials: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The counter and partial buffers, grown to hold at least ``counters`` / ``partials`` elements."""
        if self.counters.numel() < counters:
            self._outgrown.append(self.counters)
            self.counters = torch.zeros(max(counters, 2 * self.counters.numel()), dtype=torch.int32,
                                        device=self.device)
        if self.partials.numel() < partials:
            self._outgrown.append(self.partials)
            self.partials = torch.empty(max(partials, 2 * self.partials.numel()), dtype=torch.float32,
                                        device=self.device)
        return self.counters, self.partials


def check_workspace(workspace: object, device: torch.device) -> AttentionWorkspace | None:
    if workspace is None:
        return None
    if not isinstance(workspace, AttentionWorkspace):
        raise TypeError(f"workspace must be an AttentionWorkspace or None, got {type(workspace).__name__}")
    if workspace.counters.device != device:
        raise ValueError(f"workspace must live on q's device {device}, got one on {workspace.counters.device}")
    return workspace


def run_attention(
    q, k, v, kv_pool, block_table, seq_lens, selection, out, *, plan: AttentionPlan, consts: dict,
    guard: IndexGuard | None, workspace: AttentionWorkspace | None = None,
) -> torch.Tensor:
    """Launch the kernel (one launch, split-K merged in it) on checked tensors. ``k``/``v`` ``None``:
    the chunk is in the pool. ``consts``: :func:`geometry_constexprs` + :func:`rope_constexprs`.
    ``workspace``: the split scratch (``None``: a fresh one for this call, i.e. a memset more)."""
    b, _, tq, _ = q.shape
    hkv = kv_pool.shape[2]
    dv = consts["DV"]
    chunk_kv = k is not None
    has_sel = selection is not None
    cuda = q.device.type == "cuda"
    if guard is not None and guard.flag.device != q.device:
        raise ValueError(f"guard must live on q's device {q.device}, got its flag on {guard.flag.device}")
    check_workspace(workspace, q.device)
    dummy = seq_lens  # stands for pointers a constexpr switch leaves unused
    if plan.splits > 1:
        ws = AttentionWorkspace(q.device) if workspace is None else workspace
        counters, partials = ws.buffers(*split_scratch_sizes(
            batch=b, num_kv_heads=hkv, n_qtiles=plan.n_qtiles, splits=plan.splits, block_m=plan.block_m, dv=dv))
    else:
        counters, partials = dummy, q
    grid = (b * hkv, plan.n_qtiles, plan.splits)
    _paged_attn_fwd[grid](
        q, k if chunk_kv else q, v if chunk_kv else q, kv_pool, block_table, seq_lens,
        selection if has_sel else dummy, counters,
        tq, block_table.shape[1], selection.shape[2] if has_sel else 0, kv_pool.shape[0], plan.items_per_split,
        q.stride(0), q.stride(1), q.stride(2),
        *((k.stride(0), k.stride(1), k.stride(2)) if chunk_kv else (0, 0, 0)),
        kv_pool.stride(0), kv_pool.stride(1), kv_pool.stride(2), kv_pool.stride(3),
        block_table.stride(0),
        *((selection.stride(0), selection.stride(1)) if has_sel else (0, 0)),
        out.stride(0), out.stride(1), out.stride(2),
        out, partials, guard.flag if guard is not None else dummy,
        **consts, BLOCK_N=plan.block_n, BLOCK_T=plan.block_t, BLOCK_M=plan.block_m,
        HAS_SEL=has_sel, CHUNK_KV=chunk_kv, SPLIT=plan.splits > 1, HAS_GUARD=guard is not None,
        DOT_PREC="ieee" if q.dtype == torch.float32 or not cuda else "tf32",
        # Triton's interpreter (CPU tensors) mis-computes bf16 tl.dot (seen with triton 3.9): upcast there
        DOT_F32=not cuda, ITEMS=plan.items, BPT=blocks_per_tile(plan.block_n, consts["BS"]),
        **merge_tile(consts["G"], dv),
        num_warps=plan.num_warps, num_stages=plan.num_stages,
        **({} if plan.max_registers is None else {"maxnreg": plan.max_registers}),
    )
    return out


# ---------------------------------------------------------------------------------- runtime launchers


def check_guard(guard: object) -> IndexGuard | None:
    if guard is not None and not isinstance(guard, IndexGuard):
        raise TypeError(f"guard must be an IndexGuard or None, got {type(guard).__name__}")
    return guard


def _check_inputs(q, kv_pool, block_table, seq_lens, selection, out):
    check_tensor("q", q, ndim=4, dtypes=KERNEL_FLOAT_DTYPES)
    b, hq, tq, d = q.shape
    check_tensor("kv_pool", kv_pool, ndim=5, dtypes=(q.dtype,))
    nblocks, two, hkv, bs, dk = kv_pool.shape
    if two != 2 or dk != d:
        raise ValueError(
            f"kv_pool must have shape [num_blocks, 2, num_kv_heads, block_size, {d}] "
            f"(head_dim of q), got {tuple(kv_pool.shape)}"
        )
    limits.check_head_dim("q", d)
    limits.check_block_size("kv_pool", bs)
    group = check_gqa(hq, hkv, kv_name="kv_pool")
    check_tensor("block_table", block_table, ndim=2, dtypes=(torch.int32,))
    if block_table.shape[0] != b:
        raise ValueError(
            f"block_table must have {b} rows (batch of q), got shape {tuple(block_table.shape)}"
        )
    check_tensor("seq_lens", seq_lens, dtypes=(torch.int32,), shape=(b,))
    if selection is not None:
        check_tensor("selection", selection, ndim=3, dtypes=(torch.int32,), shape=(b, hkv, None))
        check_last_dim_contiguous("selection", selection)
        if selection.shape[2] == 0:
            raise ValueError("selection must have at least one column (use None to select all blocks)")
    if out is not None:
        check_tensor("out", out, dtypes=KERNEL_FLOAT_DTYPES, shape=tuple(q.shape))
        check_last_dim_contiguous("out", out)
    check_last_dim_contiguous("kv_pool", kv_pool)
    check_last_dim_contiguous("block_table", block_table)
    check_same_device(q=q, kv_pool=kv_pool, block_table=block_table, seq_lens=seq_lens,
                      selection=selection, out=out)
    return b, hq, tq, d, hkv, bs, group, nblocks


def _launch(q, kv_pool, block_table, seq_lens, selection, scale, out, validate, launch, guard, workspace,
            rerope, window, theta, logn_training_length):
    if not isinstance(launch, AttentionLaunch):
        raise TypeError(f"launch must be an AttentionLaunch, got {type(launch).__name__}")
    check_bool("validate", validate)
    check_guard(guard)
    b, hq, tq, d, hkv, bs, group, nblocks = _check_inputs(q, kv_pool, block_table, seq_lens, selection, out)
    scale = 1.0 / math.sqrt(d) if scale is None else check_float("scale", scale)
    if validate:
        lens = check_block_table_contents(block_table, seq_lens, bs, nblocks)
        for i, n in enumerate(lens):
            if n < tq:
                raise ValueError(f"seq_lens[{i}] = {n} must be >= {tq} (the query tokens are in the pool)")
        if selection is not None:
            check_selection_contents(selection, lens, bs)
    q = q if q.stride(-1) == 1 else q.contiguous()
    if out is None:
        out = torch.empty_like(q, memory_format=torch.contiguous_format)
    max_blocks = block_table.shape[1]
    past_items = max_blocks if selection is None else selection.shape[2]
    plan = plan_attention(
        batch=b, num_kv_heads=hkv, group=group, tq=tq, head_dim=d, block_size=bs,
        work_items=past_items + -(-min(tq, max_blocks * bs) // bs) + 1, sms=num_sms(q.device), launch=launch,
        dense=selection is None,
    )
    consts = dict(geometry_constexprs(num_kv_heads=hkv, group=group, head_dim=d, block_size=bs, scale=scale),
                  **rope_constexprs(rerope, window, theta, logn_training_length))
    return run_attention(q, None, None, kv_pool, block_table, seq_lens, selection, out, plan=plan, consts=consts,
                         guard=guard, workspace=check_workspace(workspace, q.device))


def paged_sparse_attention(
    q: torch.Tensor,
    kv_pool: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    selection: torch.Tensor | None = None,
    *,
    scale: float | None = None,
    out: torch.Tensor | None = None,
    validate: bool = True,
    launch: AttentionLaunch = DEFAULT_LAUNCH,
    guard: IndexGuard | None = None,
    workspace: AttentionWorkspace | None = None,
) -> torch.Tensor:
    """Paged block-sparse attention for decode (``Tq`` of 1-8) and chunked prefill (any ``Tq``).

    q ``[B, Hq, Tq, D]`` (fp16/bf16/fp32) are the last ``Tq`` tokens of each sequence, whose
    K/V are already in ``kv_pool`` ``[num_blocks, 2, Hkv, block_size, D]`` (same dtype, K
    post-RoPE; ``D`` per :mod:`ucm_trt.limits`). ``block_table`` int32 ``[B, max_blocks]``,
    ``seq_lens`` int32 ``[B]``, ``selection`` int32 ``[B, Hkv, S]`` sorted logical block ids
    padded with -1, or ``None`` for all blocks. Returns ``[B, Hq, Tq, D]`` in q's dtype (or
    writes ``out``). ``validate=True`` also checks index contents (one device sync). With
    ``validate=False`` an out-of-range id is still never dereferenced; pass ``guard`` to have it
    flagged (:class:`~ucm_trt.kernels.guard.IndexGuard`, codes :data:`ATTENTION_GUARD_CODES`).
    ``workspace``: an :class:`AttentionWorkspace` for the split-K scratch, kept by the caller so a
    call is exactly one launch (``None``: each split call allocates zeroed counters, a memset more).
    """
    return _launch(q, kv_pool, block_table, seq_lens, selection, scale, out, validate, launch, guard, workspace,
                   False, 0, 0.0, None)


def paged_rerope_attention(
    q: torch.Tensor,
    kv_pool: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    selection: torch.Tensor | None = None,
    *,
    window: int,
    theta: float,
    logn_training_length: int | None = None,
    scale: float | None = None,
    out: torch.Tensor | None = None,
    validate: bool = True,
    launch: AttentionLaunch = DEFAULT_LAUNCH,
    guard: IndexGuard | None = None,
    workspace: AttentionWorkspace | None = None,
) -> torch.Tensor:
    """Paged ReRoPE attention, one fused pass; the pool holds UN-rotated K, q is un-rotated.

    Same arguments and visibility as :func:`paged_sparse_attention`, plus ``window`` (int >= 1),
    ``theta`` (RoPE base) and ``logn_training_length`` (int >= 2 or ``None`` to disable log-n
    query scaling). Semantics: :func:`ucm_trt.reference.paged_rerope_attention`.
    """
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"window must be an int >= 1, got {window!r}")
    theta = check_float("theta", theta)
    if logn_training_length is not None and (
        isinstance(logn_training_length, bool) or not isinstance(logn_training_length, int)
        or logn_training_length < 2
    ):
        raise ValueError(f"logn_training_length must be an int >= 2 or None, got {logn_training_length!r}")
    return _launch(q, kv_pool, block_table, seq_lens, selection, scale, out, validate, launch, guard, workspace,
                   True, window, theta, logn_training_length)
