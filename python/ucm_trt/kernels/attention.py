"""Paged block-sparse attention (decode and chunked prefill) and paged ReRoPE attention.

One Triton kernel serves all four uses (decode / prefill x RoPE-in-cache / ReRoPE):

* grid ``(batch * num_kv_heads, query tiles, splits)``. A program owns one KV head of one
  sequence and *all* query heads of its GQA group (rows = query token x group head), so
  every K/V tile is read from HBM once per query tile.
* The KV blocks a query tile may see form a work list: first the selected logical blocks
  that lie before the current chunk (``selection[b, h]``; all blocks when ``selection`` is
  ``None``), then the blocks of the chunk itself (the last ``Tq`` tokens, dense + causal).
  A block in both lists is read once. The list is cut into ``splits`` contiguous pieces
  (flash-decoding); each piece writes a normalised partial output and its log-sum-exp, and a
  second kernel merges them. With one split the first kernel writes the output directly.
* fp16/bf16 operands on the tensor cores, fp32 accumulation and softmax (exp2 domain).
* ReRoPE: K is stored un-rotated. Each tile computes ``s2 = rope(q, window) . k`` and, only
  for tiles that reach inside the window, ``s1 = rope(q, i) . rope(k, j)`` with K rotated in
  registers; ``s = where(i - j < window, s1, s2)``. Rotation angles are taken relative to the
  program's first query position (RoPE depends on ``i - j`` only), which keeps fp32 angle
  error proportional to the window, not to the absolute position.

Visibility (same as :func:`ucm_trt.reference.paged_sparse_attention`): key position ``p`` is
visible to query position ``i`` iff ``p <= i`` and (``p >= seq_len - Tq`` or block
``p // block_size`` is selected for the query's KV head).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ucm_trt._validation import check_gqa, check_positive_int, check_same_device, check_tensor
from ucm_trt.kernels._common import (
    KERNEL_FLOAT_DTYPES,
    check_block_size,
    check_block_table_contents,
    check_bool,
    check_float,
    check_head_dim,
    check_last_dim_contiguous,
    check_selection_contents,
    next_pow2,
    num_sms,
)

LOG2E = 1.4426950408889634
MAX_ITEMS_PER_SPLIT = 256


@triton.jit
def _paged_attn_fwd(
    q_ptr, pool_ptr, bt_ptr, seqlen_ptr, sel_ptr, out_ptr, po_ptr, plse_ptr,
    stride_qb, stride_qh, stride_qt,
    stride_pn, stride_pkv, stride_ph, stride_pt,
    stride_btb,
    stride_sb, stride_sh,
    stride_ob, stride_oh, stride_ot,
    H_KV, TQ, NUM_SEL, ITEMS_PER_SPLIT, NUM_SPLITS, NUM_QTILES,
    qk_scale, window, log2_theta, inv_log_train,
    G: tl.constexpr, HALF: tl.constexpr, BS: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_M: tl.constexpr, SEL_POW2: tl.constexpr,
    MAX_ITEMS: tl.constexpr, HAS_SEL: tl.constexpr, SPLIT: tl.constexpr, REROPE: tl.constexpr, LOGN: tl.constexpr,
    DOT_PREC: tl.constexpr, DOT_F32: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    pid_t = tl.program_id(1)
    pid_s = tl.program_id(2)
    b = pid_bh // H_KV
    h = pid_bh % H_KV
    seq_len = tl.load(seqlen_ptr + b)
    chunk_start = seq_len - TQ

    rows = tl.arange(0, BLOCK_M)
    t_loc = rows // G
    g = rows % G
    t = pid_t * BLOCK_T + t_loc
    row_ok = (t_loc < BLOCK_T) & (t < TQ)
    qpos = chunk_start + t
    dh = tl.arange(0, HALF)
    nn = tl.arange(0, BLOCK_N)

    q_rows = q_ptr + b.to(tl.int64) * stride_qb + (h * G + g) * stride_qh + t * stride_qt
    q1 = tl.load(q_rows[:, None] + dh[None, :], mask=row_ok[:, None], other=0.0).to(tl.float32)
    q2 = tl.load(q_rows[:, None] + HALF + dh[None, :], mask=row_ok[:, None], other=0.0).to(tl.float32)

    # dot operand dtype: the pool's (tensor cores), or fp32 when run by the interpreter (DOT_F32)
    if DOT_F32:
        kv_dtype = tl.float32
    else:
        kv_dtype = pool_ptr.dtype.element_ty
    t_first = pid_t * BLOCK_T
    t_last = tl.minimum(t_first + BLOCK_T, TQ) - 1
    q_first_pos = chunk_start + t_first
    if REROPE:
        if LOGN:
            ln = tl.maximum(tl.log(qpos.to(tl.float32) + 1.0) * inv_log_train, 1.0)
            q1 = q1 * ln[:, None]
            q2 = q2 * ln[:, None]
        # inv_freq[i] = theta ** (-2 i / D) = exp2(-(i / HALF) * log2(theta))
        inv_freq = tl.exp2(-(dh.to(tl.float32) / HALF) * log2_theta)
        # q rotated by its position relative to the program's first query (see module doc)
        ang_q = (qpos - q_first_pos).to(tl.float32)[:, None] * inv_freq[None, :]
        cq = tl.cos(ang_q)
        sq = tl.sin(ang_q)
        qr1 = (q1 * cq - q2 * sq).to(kv_dtype)
        qr2 = (q2 * cq + q1 * sq).to(kv_dtype)
        ang_w = inv_freq * window
        # rotation of the keys of a tile = rotation of the tile start (HALF sin/cos per tile)
        # composed with the within-tile offsets (this table, computed once)
        ang_n = nn.to(tl.float32)[:, None] * inv_freq[None, :]
        cn = tl.cos(ang_n)
        sn = tl.sin(ang_n)
        cw = tl.cos(ang_w)[None, :]
        sw = tl.sin(ang_w)[None, :]
        qw1 = (q1 * cw - q2 * sw).to(kv_dtype)
        qw2 = (q2 * cw + q1 * sw).to(kv_dtype)
    else:
        qa = q1.to(kv_dtype)
        qb = q2.to(kv_dtype)

    # ---- work list: selected blocks before the chunk, then the chunk's own blocks ----
    cb0 = chunk_start // BS
    sel_row = sel_ptr + b.to(tl.int64) * stride_sb + h * stride_sh
    if HAS_SEL:
        sar = tl.arange(0, SEL_POW2)
        sv = tl.load(sel_row + sar, mask=sar < NUM_SEL, other=-1)
        n_before = tl.sum(((sv >= 0) & (sv < cb0)).to(tl.int32), 0)
        cb0_sel = tl.sum((sv == cb0).to(tl.int32), 0) > 0
    else:
        n_before = cb0
        cb0_sel = cb0 >= 0
    last_blk = (chunk_start + t_last) // BS
    n_items = n_before + last_blk - cb0 + 1
    item_lo = pid_s * ITEMS_PER_SPLIT
    item_hi = tl.minimum(item_lo + ITEMS_PER_SPLIT, n_items)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, 2 * HALF], tl.float32)
    dfull = tl.arange(0, 2 * HALF)
    kv_head = pool_ptr + h * stride_ph
    # Resolve this split's logical and physical block ids up front (one vector load each), so
    # the loop's K/V addresses do not wait on a chain of scalar index loads.
    ii = tl.arange(0, MAX_ITEMS)
    jv = item_lo + ii
    in_rng = jv < item_hi
    sel_v = jv < n_before
    if HAS_SEL:
        blk_sv = tl.load(sel_row + jv, mask=in_rng & sel_v, other=0)
    else:
        blk_sv = jv
    blk_v = tl.where(sel_v, blk_sv, cb0 + (jv - n_before))
    phys_v = tl.load(bt_ptr + b.to(tl.int64) * stride_btb + blk_v, mask=in_rng, other=0)
    for jj in range(0, item_hi - item_lo):
        pick = ii == jj
        blk = tl.sum(tl.where(pick, blk_v, 0), 0)
        phys = tl.sum(tl.where(pick, phys_v, 0), 0).to(tl.int64)
        is_sel = item_lo + jj < n_before
        lo = tl.where(is_sel, 0, tl.where(cb0_sel & (blk == cb0), cb0 * BS, chunk_start))
        hi = tl.where(is_sel, chunk_start, seq_len)
        blk_base = kv_head + phys * stride_pn
        for sub in tl.static_range(BS // BLOCK_N):
            tok = sub * BLOCK_N + nn
            pos = blk * BS + tok
            kmask = (pos >= lo) & (pos < hi)
            k_ptrs = blk_base + tok[:, None] * stride_pt + dh[None, :]
            k1 = tl.load(k_ptrs, mask=kmask[:, None], other=0.0).to(kv_dtype)
            k2 = tl.load(k_ptrs + HALF, mask=kmask[:, None], other=0.0).to(kv_dtype)
            if REROPE:
                s = tl.dot(qw1, tl.trans(k1), input_precision=DOT_PREC)
                s = tl.dot(qw2, tl.trans(k2), s, input_precision=DOT_PREC)
                tile_lo = blk * BS + sub * BLOCK_N
                if q_first_pos - (tile_lo + BLOCK_N - 1) < window:
                    ang_b = (tile_lo - q_first_pos).to(tl.float32) * inv_freq
                    cb = tl.cos(ang_b)[None, :]
                    sb = tl.sin(ang_b)[None, :]
                    ck = cb * cn - sb * sn
                    sk = sb * cn + cb * sn
                    k1f = k1.to(tl.float32)
                    k2f = k2.to(tl.float32)
                    kr1 = (k1f * ck - k2f * sk).to(kv_dtype)
                    kr2 = (k2f * ck + k1f * sk).to(kv_dtype)
                    s1 = tl.dot(qr1, tl.trans(kr1), input_precision=DOT_PREC)
                    s1 = tl.dot(qr2, tl.trans(kr2), s1, input_precision=DOT_PREC)
                    inside = (qpos[:, None] - pos[None, :]) < window
                    s = tl.where(inside, s1, s)
            else:
                s = tl.dot(qa, tl.trans(k1), input_precision=DOT_PREC)
                s = tl.dot(qb, tl.trans(k2), s, input_precision=DOT_PREC)
            s = s * qk_scale
            vis = kmask[None, :] & (pos[None, :] <= qpos[:, None]) & row_ok[:, None]
            s = tl.where(vis, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp2(m_i - m_safe)
            p = tl.exp2(s - m_safe[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            v_ptrs = blk_base + stride_pkv + tok[:, None] * stride_pt + dfull[None, :]
            v = tl.load(v_ptrs, mask=kmask[:, None], other=0.0).to(kv_dtype)
            acc = acc * alpha[:, None]
            acc = tl.dot(p.to(kv_dtype), v, acc, input_precision=DOT_PREC)
            m_i = m_new

    l_safe = tl.where(l_i > 0.0, l_i, 1.0)
    o = acc / l_safe[:, None]
    if SPLIT:
        lse = tl.where(l_i > 0.0, m_i + tl.log2(l_safe), float("-inf"))
        part = (pid_bh * NUM_QTILES + pid_t) * NUM_SPLITS + pid_s
        tl.store(plse_ptr + part * BLOCK_M + rows, lse, mask=row_ok)
        tl.store(po_ptr + (part * BLOCK_M + rows)[:, None] * (2 * HALF) + dfull[None, :], o, mask=row_ok[:, None])
    else:
        o_rows = out_ptr + b.to(tl.int64) * stride_ob + (h * G + g) * stride_oh + t * stride_ot
        tl.store(o_rows[:, None] + dfull[None, :], o.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])


@triton.jit
def _merge_splits(
    po_ptr, plse_ptr, out_ptr,
    stride_ob, stride_oh, stride_ot,
    H_KV, TQ, NUM_SPLITS, NUM_QTILES,
    G: tl.constexpr, D: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_M: tl.constexpr,
    SCHUNK: tl.constexpr,
):
    """One program per output row: the row's partials of SCHUNK splits are loaded at once."""
    pid = tl.program_id(0)
    row = tl.program_id(1)
    pid_bh = pid // NUM_QTILES
    pid_t = pid % NUM_QTILES
    b = pid_bh // H_KV
    h = pid_bh % H_KV
    t_loc = row // G
    g = row % G
    t = pid_t * BLOCK_T + t_loc
    if (t_loc < BLOCK_T) & (t < TQ):
        dd = tl.arange(0, D)
        sc = tl.arange(0, SCHUNK)
        base = pid * NUM_SPLITS
        m = tl.full([], float("-inf"), tl.float32)
        l_sum = tl.zeros([], tl.float32)
        acc = tl.zeros([D], tl.float32)
        for s0 in range(0, NUM_SPLITS, SCHUNK):
            s_ok = s0 + sc < NUM_SPLITS
            part = (base + s0 + sc) * BLOCK_M + row
            lse = tl.load(plse_ptr + part, mask=s_ok, other=float("-inf"))
            o = tl.load(po_ptr + part[:, None] * D + dd[None, :], mask=s_ok[:, None], other=0.0)
            m_new = tl.maximum(m, tl.max(lse, 0))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp2(m - m_safe)
            w = tl.exp2(lse - m_safe)
            l_sum = l_sum * alpha + tl.sum(w, 0)
            acc = acc * alpha + tl.sum(o * w[:, None], 0)
            m = m_new
        out = acc / tl.where(l_sum > 0.0, l_sum, 1.0)
        o_row = out_ptr + b.to(tl.int64) * stride_ob + (h * G + g) * stride_oh + t * stride_ot
        tl.store(o_row + dd, out.to(out_ptr.dtype.element_ty))


@dataclass(frozen=True, kw_only=True)
class AttentionLaunch:
    """Tuning knobs of the paged attention kernels (results never depend on them).

    ``num_splits=None`` picks enough KV splits to give every SM ``programs_per_sm`` programs.
    ``block_n=None`` uses min(block_size, 128) keys per inner tile. Defaults: the best of a
    sweep on an H200 (benchmarks/results, 128K context, 1/8 budget, batch 8). ``block_t=None`` uses
    ``max(1, 64 // group)`` query tokens per program for prefill and all of them for decode.
    """

    num_splits: int | None = None
    programs_per_sm: int = 2
    block_n: int | None = None
    block_t: int | None = None
    num_warps: int = 4
    num_stages: int = 2

    def __post_init__(self) -> None:
        for name in ("num_splits", "block_n", "block_t"):
            val = getattr(self, name)
            if val is not None:
                check_positive_int(name, val)
        for name in ("programs_per_sm", "num_warps", "num_stages"):
            check_positive_int(name, getattr(self, name))
        if self.block_n is not None and (self.block_n & (self.block_n - 1) or self.block_n < 16):
            raise ValueError(f"block_n must be a power of two >= 16, got {self.block_n}")
        if self.num_warps & (self.num_warps - 1):
            raise ValueError(f"num_warps must be a power of two, got {self.num_warps}")


DEFAULT_LAUNCH = AttentionLaunch()


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
    check_head_dim("q", d)
    check_block_size("kv_pool", bs)
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


def _launch(q, kv_pool, block_table, seq_lens, selection, scale, out, validate, launch,
            rerope, window, theta, logn_training_length):
    if not isinstance(launch, AttentionLaunch):
        raise TypeError(f"launch must be an AttentionLaunch, got {type(launch).__name__}")
    check_bool("validate", validate)
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

    block_n = launch.block_n or min(bs, 128)
    block_n = min(block_n, bs)
    block_t = launch.block_t or (tq if tq * group <= 64 else max(1, 64 // group))
    block_t = min(block_t, tq)
    block_m = max(16, next_pow2(block_t * group))
    n_qtiles = -(-tq // block_t)
    max_blocks = block_table.shape[1]
    if selection is None:
        max_items = max_blocks
        num_sel, sel_arg, sel_pow2 = 0, block_table, 1
        s_sb, s_sh = 0, 0
    else:
        num_sel = selection.shape[2]
        max_items = min(num_sel + -(-tq // bs) + 1, max_blocks)
        sel_arg, sel_pow2 = selection, next_pow2(num_sel)
        s_sb, s_sh = selection.stride(0), selection.stride(1)
    if launch.num_splits is not None:
        splits = launch.num_splits
    else:
        want = launch.programs_per_sm * num_sms(q.device)
        splits = max(1, -(-want // (b * hkv * n_qtiles)))
    # at most MAX_ITEMS_PER_SPLIT blocks per program: their ids are held in registers
    splits = max(1, min(splits, max_items), -(-max_items // MAX_ITEMS_PER_SPLIT))
    per_split = -(-max_items // splits)
    splits = -(-max_items // per_split)

    if splits > 1:
        po = torch.empty((b * hkv * n_qtiles * splits * block_m, d), device=q.device, dtype=torch.float32)
        plse = torch.empty((b * hkv * n_qtiles * splits * block_m,), device=q.device, dtype=torch.float32)
    else:
        po = plse = out
    dot_prec = "ieee" if q.dtype == torch.float32 or q.device.type != "cuda" else "tf32"
    # Triton's interpreter (CPU tensors) mis-computes bf16 tl.dot (seen with triton 3.9): upcast there
    dot_f32 = q.device.type != "cuda"
    if rerope:
        log2_theta = math.log2(theta)
        inv_log_train = 0.0 if logn_training_length is None else 1.0 / math.log(logn_training_length)
    else:
        log2_theta, inv_log_train, window = 0.0, 0.0, 0
    grid = (b * hkv, n_qtiles, splits)
    _paged_attn_fwd[grid](
        q, kv_pool, block_table, seq_lens, sel_arg, out, po, plse,
        q.stride(0), q.stride(1), q.stride(2),
        kv_pool.stride(0), kv_pool.stride(1), kv_pool.stride(2), kv_pool.stride(3),
        block_table.stride(0),
        s_sb, s_sh,
        out.stride(0), out.stride(1), out.stride(2),
        hkv, tq, num_sel, per_split, splits, n_qtiles,
        scale * LOG2E, window, log2_theta, inv_log_train,
        G=group, HALF=d // 2, BS=bs, BLOCK_N=block_n, BLOCK_T=block_t, BLOCK_M=block_m,
        SEL_POW2=sel_pow2, MAX_ITEMS=max(2, next_pow2(per_split)), HAS_SEL=selection is not None, SPLIT=splits > 1, REROPE=rerope,
        LOGN=logn_training_length is not None, DOT_PREC=dot_prec, DOT_F32=dot_f32,
        num_warps=launch.num_warps, num_stages=launch.num_stages,
    )
    if splits > 1:
        _merge_splits[(b * hkv * n_qtiles, block_m)](
            po, plse, out, out.stride(0), out.stride(1), out.stride(2),
            hkv, tq, splits, n_qtiles,
            G=group, D=d, BLOCK_T=block_t, BLOCK_M=block_m, SCHUNK=min(64, max(2, next_pow2(splits))),
            num_warps=4,
        )
    return out


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
) -> torch.Tensor:
    """Paged block-sparse attention for decode (``Tq`` of 1-8) and chunked prefill (any ``Tq``).

    q ``[B, Hq, Tq, D]`` (fp16/bf16/fp32) are the last ``Tq`` tokens of each sequence, whose
    K/V are already in ``kv_pool`` ``[num_blocks, 2, Hkv, block_size, D]`` (same dtype, K
    post-RoPE). ``block_table`` int32 ``[B, max_blocks]``, ``seq_lens`` int32 ``[B]``,
    ``selection`` int32 ``[B, Hkv, S]`` sorted logical block ids padded with -1, or ``None``
    for all blocks. Returns ``[B, Hq, Tq, D]`` in q's dtype (or writes ``out``).
    ``validate=True`` also checks index contents (one device sync).
    """
    return _launch(q, kv_pool, block_table, seq_lens, selection, scale, out, validate, launch,
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
    return _launch(q, kv_pool, block_table, seq_lens, selection, scale, out, validate, launch,
                   True, window, theta, logn_training_length)
