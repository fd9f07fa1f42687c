"""Paged sparse / ReRoPE attention of a chunk, as ONE kernel with the TensorRT AOT calling convention.

Semantics are those of the UCM ops ``UcmPagedSparseAttention`` / ``UcmPagedReRoPEAttention``
(``ucm_trt.graph.schemas``): the pool holds the PAST tokens only (positions < seq_len - T);
the chunk's own K/V arrive as the ``k``/``v`` inputs. Key position ``p`` is visible to the query
at position ``i`` iff ``p <= i`` and (``p`` is in the chunk, or block ``p // block_size`` is in
``selection[b, kv_head]``). Selection ids < 0 or >= max_blocks are ignored; blocks that lie
entirely inside the chunk contribute nothing from the pool.

Kernel parameters, in the order TensorRT's AOT launcher passes them::

    q, k, v, kv_pool, block_table, seq_lens, selection     inputs (schema order)
    T, MAX_BLOCKS, NUM_SEL                                 int32 extras (dynamic sizes)
    out                                                    output

Everything else (heads, head_dim, block_size, scale, ReRoPE window/theta/log-n) is a constexpr
taken from the op's attributes. Strides follow from contiguous shapes.

Program ``(b * Hkv + h, query tile)`` owns one KV head and all ``G`` query heads of its group
for ``BLOCK_T`` chunk tokens (rows = token x group head), so each K/V tile is read once per
query tile. Its work list is one ``BLOCK_N``-key tile per item: first the sub-tiles of the
selected past blocks, then the chunk's tiles up to the tile's last query. fp32 online softmax
in the exp2 domain; fp16/bf16 operands on the tensor cores (fp32 inputs use IEEE dots).

ReRoPE: K is un-rotated everywhere. ``s2 = rope(q, window) . k`` for every tile and, for tiles
that reach inside the window, ``s1 = rope(q, i - c) . rope(k, j - c)`` with ``c`` the tile's
first query position (RoPE depends on ``i - j`` only, and small angles keep fp32 exact);
``s = where(i - j < window, s1, s2)``. Log-n scaling multiplies q by
``max(1, log(i + 1) / log(L))`` first.

Flash-decoding split (JIT path only): with ``SPLIT`` each program takes one contiguous piece of the
work list and writes a normalised partial output plus its log2-sum-exp to a workspace, and
``_ucm_merge_splits`` combines them. The AOT path cannot (one launch, no workspace): there the
parallelism is batch x KV heads x query tiles, and the split parameters are compiled away.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ucm_trt._validation import check_gqa, check_same_device, check_tensor
from ucm_trt.kernels._common import KERNEL_FLOAT_DTYPES, check_block_size, check_head_dim, next_pow2, num_sms

__all__ = [
    "TACTICS",
    "PagedAttentionGeometry",
    "TileConfig",
    "tile_config",
    "paged_attention_kernel_args",
    "paged_attention_grid",
    "paged_attention_extras",
    "paged_attention_chunk",
]

LOG2E = 1.4426950408889634

# Tactic ids (TensorRT tactics are positive ints; 0 means "default"). Results never depend on them.
TACTIC_DECODE = 1  # few query tokens: 16-row tiles
TACTIC_PREFILL = 2  # long chunks: 64-row tiles
TACTICS = {TACTIC_DECODE: "decode", TACTIC_PREFILL: "prefill"}

_TRITON_PTR = {torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float32: "*fp32"}


@triton.jit
def _ucm_paged_attn_kernel(
    q_ptr, k_ptr, v_ptr, pool_ptr, bt_ptr, seqlen_ptr, sel_ptr,
    T, MAX_BLOCKS, NUM_SEL,
    out_ptr,
    po_ptr, plse_ptr, ITEMS_PER_SPLIT,
    HKV: tl.constexpr, G: tl.constexpr, D: tl.constexpr, BS: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_M: tl.constexpr,
    QK_SCALE: tl.constexpr, REROPE: tl.constexpr, WINDOW: tl.constexpr, LOG2_THETA: tl.constexpr,
    LOGN: tl.constexpr, INV_LOG_TRAIN: tl.constexpr, DOT_PREC: tl.constexpr, SPLIT: tl.constexpr,
):
    HALF: tl.constexpr = D // 2
    HQ: tl.constexpr = HKV * G
    NSUB: tl.constexpr = BS // BLOCK_N
    pid_bh = tl.program_id(0)
    pid_t = tl.program_id(1)
    b = pid_bh // HKV
    h = pid_bh % HKV
    b64 = b.to(tl.int64)
    seq_len = tl.load(seqlen_ptr + b)
    past = seq_len - T

    rows = tl.arange(0, BLOCK_M)
    t_loc = rows // G
    g = rows % G
    t = pid_t * BLOCK_T + t_loc
    row_ok = (t_loc < BLOCK_T) & (t < T)
    qpos = past + t
    dh = tl.arange(0, HALF)
    dfull = tl.arange(0, D)
    nn = tl.arange(0, BLOCK_N)

    q_rows = q_ptr + ((b64 * HQ + h * G + g) * T + t) * D
    q1 = tl.load(q_rows[:, None] + dh[None, :], mask=row_ok[:, None], other=0.0).to(tl.float32)
    q2 = tl.load(q_rows[:, None] + HALF + dh[None, :], mask=row_ok[:, None], other=0.0).to(tl.float32)
    kv_dtype = pool_ptr.dtype.element_ty
    q_first = past + pid_t * BLOCK_T
    if REROPE:
        if LOGN:
            ln = tl.maximum(tl.log(qpos.to(tl.float32) + 1.0) * INV_LOG_TRAIN, 1.0)
            q1 = q1 * ln[:, None]
            q2 = q2 * ln[:, None]
        inv_freq = tl.exp2(-(dh.to(tl.float32) / HALF) * LOG2_THETA)
        ang_q = (qpos - q_first).to(tl.float32)[:, None] * inv_freq[None, :]
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

    sel_row = sel_ptr + (b64 * HKV + h) * NUM_SEL
    bt_row = bt_ptr + b64 * MAX_BLOCKS
    chunk_kv = (b64 * HKV + h) * T
    t_hi = tl.minimum(pid_t * BLOCK_T + BLOCK_T, T)  # chunk keys this tile can see: [0, t_hi)
    n_past_items = NUM_SEL * NSUB
    n_items = n_past_items + (t_hi + BLOCK_N - 1) // BLOCK_N
    item_lo = 0
    if SPLIT:  # flash-decoding (JIT path only): this program takes one contiguous piece of the work list
        item_lo = tl.program_id(2) * ITEMS_PER_SPLIT
        n_items = tl.minimum(item_lo + ITEMS_PER_SPLIT, n_items)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    for j in range(item_lo, n_items):
        is_past = j < n_past_items
        js = j // NSUB
        sub = j % NSUB
        blk = tl.load(sel_row + js, mask=is_past, other=-1)
        prev = tl.load(sel_row + js - 1, mask=is_past & (js > 0), other=-1)
        use_past = is_past & (blk >= 0) & (blk < MAX_BLOCKS) & (blk * BS < past) & (blk != prev)
        use_chunk = j >= n_past_items
        if use_past | use_chunk:
            phys = tl.load(bt_row + blk, mask=use_past, other=0).to(tl.int64)
            tok = sub * BLOCK_N + nn
            tc = (j - n_past_items) * BLOCK_N + nn
            kpos = tl.where(use_past, blk * BS + tok, past + tc)
            # masks from tensor comparisons only (scalar & tensor yields int32 in the interpreter)
            pmask = tok < tl.where(use_past, past - blk * BS, 0)
            cmask = (tc >= 0) & (tc < T)
            p_rows = pool_ptr + phys * (2 * HKV * BS * D) + h * (BS * D) + tok * D
            c_rows = (chunk_kv + tc) * D
            k1 = tl.where(
                pmask[:, None],
                tl.load(p_rows[:, None] + dh[None, :], mask=pmask[:, None], other=0.0),
                tl.load(k_ptr + c_rows[:, None] + dh[None, :], mask=cmask[:, None], other=0.0),
            )
            k2 = tl.where(
                pmask[:, None],
                tl.load(p_rows[:, None] + HALF + dh[None, :], mask=pmask[:, None], other=0.0),
                tl.load(k_ptr + c_rows[:, None] + HALF + dh[None, :], mask=cmask[:, None], other=0.0),
            )
            v = tl.where(
                pmask[:, None],
                tl.load(p_rows[:, None] + HKV * BS * D + dfull[None, :], mask=pmask[:, None], other=0.0),
                tl.load(v_ptr + c_rows[:, None] + dfull[None, :], mask=cmask[:, None], other=0.0),
            )
            s = tl.dot(qa, tl.trans(k1), input_precision=DOT_PREC)
            s = tl.dot(qb, tl.trans(k2), s, input_precision=DOT_PREC)
            if REROPE:
                tile_lo = tl.min(tl.where(pmask | cmask, kpos, 2147483647), 0)
                if q_first - (tile_lo + BLOCK_N - 1) < WINDOW:
                    ang_k = (kpos - q_first).to(tl.float32)[:, None] * inv_freq[None, :]
                    ck = tl.cos(ang_k)
                    sk = tl.sin(ang_k)
                    k1f = k1.to(tl.float32)
                    k2f = k2.to(tl.float32)
                    kr1 = (k1f * ck - k2f * sk).to(kv_dtype)
                    kr2 = (k2f * ck + k1f * sk).to(kv_dtype)
                    s1 = tl.dot(qr1, tl.trans(kr1), input_precision=DOT_PREC)
                    s1 = tl.dot(qr2, tl.trans(kr2), s1, input_precision=DOT_PREC)
                    s = tl.where((qpos[:, None] - kpos[None, :]) < WINDOW, s1, s)
            s = s * QK_SCALE
            vis = (pmask | cmask)[None, :] & (kpos[None, :] <= qpos[:, None]) & row_ok[:, None]
            s = tl.where(vis, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp2(m_i - m_safe)
            p = tl.exp2(s - m_safe[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None]
            acc = tl.dot(p.to(kv_dtype), v, acc, input_precision=DOT_PREC)
            m_i = m_new

    l_safe = tl.where(l_i > 0.0, l_i, 1.0)
    o = acc / l_safe[:, None]
    if SPLIT:  # normalised partial output + log2-sum-exp; _ucm_merge_splits combines the pieces
        part = (pid_bh * tl.num_programs(1) + pid_t) * tl.num_programs(2) + tl.program_id(2)
        prow = part.to(tl.int64) * BLOCK_M + rows
        tl.store(plse_ptr + prow, tl.where(l_i > 0.0, m_i + tl.log2(l_safe), float("-inf")))
        tl.store(po_ptr + prow[:, None] * D + dfull[None, :], o)
    else:
        o_rows = out_ptr + ((b64 * HQ + h * G + g) * T + t) * D
        tl.store(o_rows[:, None] + dfull[None, :], o.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])


@triton.jit
def _ucm_merge_splits(po_ptr, plse_ptr, out_ptr, T, NUM_SPLITS,
                      HKV: tl.constexpr, G: tl.constexpr, D: tl.constexpr, BLOCK_T: tl.constexpr,
                      BLOCK_M: tl.constexpr):
    pid_bh = tl.program_id(0)
    pid_t = tl.program_id(1)
    b64 = (pid_bh // HKV).to(tl.int64)
    h = pid_bh % HKV
    rows = tl.arange(0, BLOCK_M)
    t_loc = rows // G
    g = rows % G
    t = pid_t * BLOCK_T + t_loc
    row_ok = (t_loc < BLOCK_T) & (t < T)
    dfull = tl.arange(0, D)
    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_M], tl.float32)  # noqa: E741
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    base = (pid_bh * tl.num_programs(1) + pid_t) * NUM_SPLITS
    for sp in range(0, NUM_SPLITS):
        prow = (base + sp).to(tl.int64) * BLOCK_M + rows
        lse = tl.load(plse_ptr + prow)
        o = tl.load(po_ptr + prow[:, None] * D + dfull[None, :])
        m_new = tl.maximum(m, lse)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m - m_safe)
        w = tl.exp2(lse - m_safe)
        l = l * alpha + w  # noqa: E741
        acc = acc * alpha[:, None] + o * w[:, None]
        m = m_new
    res = acc / tl.where(l > 0.0, l, 1.0)[:, None]
    o_rows = out_ptr + ((b64 * (HKV * G) + h * G + g) * T + t) * D
    tl.store(o_rows[:, None] + dfull[None, :], res.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])


@dataclass(frozen=True, kw_only=True)
class PagedAttentionGeometry:
    """The op attributes that shape the kernel (all become constexprs).

    ``rerope_window=None`` is plain sparse attention (K post-RoPE); an int switches to ReRoPE
    with ``rope_theta`` and ``logn_training_length`` (0 = no log-n scaling, else >= 2).
    """

    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    scale: float
    rerope_window: int | None = None
    rope_theta: float = 10000.0
    logn_training_length: int = 0

    def __post_init__(self) -> None:
        for name in ("num_q_heads", "num_kv_heads", "head_dim", "block_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"PagedAttentionGeometry.{name} must be an int >= 1, got {v!r}")
        check_gqa(self.num_q_heads, self.num_kv_heads, q_name="num_q_heads", kv_name="num_kv_heads")
        check_head_dim("PagedAttentionGeometry", self.head_dim)
        check_block_size("PagedAttentionGeometry", self.block_size)
        if isinstance(self.scale, bool) or not isinstance(self.scale, (int, float)) or not self.scale > 0:
            raise ValueError(f"PagedAttentionGeometry.scale must be a number > 0, got {self.scale!r}")
        if self.rerope_window is not None:
            w = self.rerope_window
            if isinstance(w, bool) or not isinstance(w, int) or w < 1:
                raise ValueError(f"PagedAttentionGeometry.rerope_window must be an int >= 1 or None, got {w!r}")
            th = self.rope_theta
            if isinstance(th, bool) or not isinstance(th, (int, float)) or not th > 1.0:
                raise ValueError(f"PagedAttentionGeometry.rope_theta must be a number > 1, got {th!r}")
        lt = self.logn_training_length
        if isinstance(lt, bool) or not isinstance(lt, int) or lt < 0 or lt == 1:
            raise ValueError(f"PagedAttentionGeometry.logn_training_length must be 0 (off) or an int >= 2, got {lt!r}")

    @property
    def group(self) -> int:
        return self.num_q_heads // self.num_kv_heads

    @property
    def rerope(self) -> bool:
        return self.rerope_window is not None


@dataclass(frozen=True, kw_only=True)
class TileConfig:
    block_t: int
    block_n: int
    block_m: int
    num_warps: int
    num_stages: int


def tile_config(tactic: int, geometry: PagedAttentionGeometry) -> TileConfig:
    """Tile shape of ``tactic`` (see ``TACTICS``) for ``geometry``."""
    if tactic not in TACTICS:
        raise ValueError(f"tactic must be one of {sorted(TACTICS)} ({TACTICS}), got {tactic!r}")
    g = geometry.group
    rows = 16 if tactic == TACTIC_DECODE else 64
    block_t = max(1, rows // g)
    block_m = max(16, next_pow2(block_t * g))
    block_n = min(geometry.block_size, 64 if geometry.head_dim <= 128 else 32)
    num_warps = 4 if block_m <= 16 else 8 if geometry.head_dim > 128 else 4
    return TileConfig(block_t=block_t, block_n=block_n, block_m=block_m, num_warps=num_warps, num_stages=2)


def paged_attention_kernel_args(
    geometry: PagedAttentionGeometry, tile: TileConfig, dtype: torch.dtype
) -> tuple[object, dict[str, str], dict[str, object]]:
    """``(kernel, signature, constexprs)`` for compiling (PTX) or launching (Triton) the kernel.

    ``signature`` maps the non-constexpr parameters, in order, to Triton types: 7 input pointers,
    3 int32 extras, 1 output pointer. The split-KV parameters (after the output) are constexprs
    here: ``SPLIT=False`` and no workspace, as TensorRT's AOT launcher requires.
    """
    if dtype not in _TRITON_PTR:
        raise TypeError(f"dtype must be one of float16, bfloat16, float32, got {dtype}")
    ty = _TRITON_PTR[dtype]
    signature = {
        "q_ptr": ty, "k_ptr": ty, "v_ptr": ty, "pool_ptr": ty,
        "bt_ptr": "*i32", "seqlen_ptr": "*i32", "sel_ptr": "*i32",
        "T": "i32", "MAX_BLOCKS": "i32", "NUM_SEL": "i32",
        "out_ptr": ty,
    }  # fmt: skip
    lt = geometry.logn_training_length
    constexprs = {
        "HKV": geometry.num_kv_heads,
        "G": geometry.group,
        "D": geometry.head_dim,
        "BS": geometry.block_size,
        "BLOCK_N": tile.block_n,
        "BLOCK_T": tile.block_t,
        "BLOCK_M": tile.block_m,
        "QK_SCALE": float(geometry.scale) * LOG2E,
        "REROPE": geometry.rerope,
        "WINDOW": int(geometry.rerope_window or 0),
        "LOG2_THETA": math.log2(geometry.rope_theta) if geometry.rerope else 0.0,
        "LOGN": geometry.rerope and lt > 0,
        "INV_LOG_TRAIN": 1.0 / math.log(lt) if lt > 0 else 0.0,
        "DOT_PREC": "ieee" if dtype == torch.float32 else "tf32",
        "SPLIT": False,
        # the split-KV workspace exists on the JIT path only; one AOT launch cannot merge splits
        "po_ptr": None,
        "plse_ptr": None,
        "ITEMS_PER_SPLIT": 0,
    }
    return _ucm_paged_attn_kernel, signature, constexprs


def paged_attention_grid(batch, chunk_len, geometry: PagedAttentionGeometry, tile: TileConfig, cdiv):
    """Launch grid ``(x, y, z)``. ``batch``/``chunk_len`` may be ints or TensorRT shape expressions
    (kept on the left of every operator); ``cdiv`` is the matching ceil-division."""
    return batch * geometry.num_kv_heads, cdiv(chunk_len, tile.block_t), 1


def paged_attention_extras(chunk_len, max_blocks, num_selected):
    """The int32 extras, in kernel order: ``(T, MAX_BLOCKS, NUM_SEL)``."""
    return chunk_len, max_blocks, num_selected


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def paged_attention_chunk(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_pool: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    selection: torch.Tensor,
    *,
    geometry: PagedAttentionGeometry,
    tactic: int | None = None,
    num_splits: int | None = None,
    out: torch.Tensor | None = None,
    validate: bool = True,
) -> torch.Tensor:
    """Run the UCM paged attention op (sparse or ReRoPE per ``geometry``) through Triton.

    q ``[B, Hq, T, D]``, k/v ``[B, Hkv, T, D]`` (the chunk), kv_pool ``[N, 2, Hkv, bs, D]`` (past
    tokens only), block_table int32 ``[B, M]``, seq_lens int32 ``[B]`` (including the chunk),
    selection int32 ``[B, Hkv, S]``. All contiguous, one float dtype. Returns ``[B, Hq, T, D]``.
    ``tactic=None`` picks decode tiles for T <= 8, prefill tiles otherwise. ``num_splits`` cuts each
    program's work list into that many pieces merged by a second kernel (flash-decoding);
    ``None`` = enough pieces for 4 programs per SM on a GPU, 1 elsewhere.
    ``validate=True`` also checks index contents (one device sync).
    """
    if not isinstance(geometry, PagedAttentionGeometry):
        raise TypeError(f"geometry must be a PagedAttentionGeometry, got {type(geometry).__name__}")
    hq, hkv, d, bs = geometry.num_q_heads, geometry.num_kv_heads, geometry.head_dim, geometry.block_size
    check_tensor("q", q, ndim=4, dtypes=KERNEL_FLOAT_DTYPES)
    b, _, t, _ = q.shape
    check_tensor("q", q, shape=(b, hq, t, d))
    check_tensor("k", k, dtypes=(q.dtype,), shape=(b, hkv, t, d))
    check_tensor("v", v, dtypes=(q.dtype,), shape=(b, hkv, t, d))
    check_tensor("kv_pool", kv_pool, ndim=5, dtypes=(q.dtype,), shape=(None, 2, hkv, bs, d))
    check_tensor("block_table", block_table, ndim=2, dtypes=(torch.int32,), shape=(b, None))
    check_tensor("seq_lens", seq_lens, dtypes=(torch.int32,), shape=(b,))
    check_tensor("selection", selection, ndim=3, dtypes=(torch.int32,), shape=(b, hkv, None))
    if t < 1:
        raise ValueError(f"q must hold at least one chunk token, got shape {tuple(q.shape)}")
    if selection.shape[2] < 1:
        raise ValueError(f"selection must have at least one column (pad with -1), got shape {tuple(selection.shape)}")
    for name, x in (("q", q), ("k", k), ("v", v), ("kv_pool", kv_pool), ("block_table", block_table),
                    ("seq_lens", seq_lens), ("selection", selection)):  # fmt: skip
        if not x.is_contiguous():
            raise ValueError(f"{name} must be contiguous (the kernel derives strides from shapes)")
    check_same_device(q=q, k=k, v=v, kv_pool=kv_pool, block_table=block_table, seq_lens=seq_lens,
                      selection=selection, out=out)  # fmt: skip
    if out is None:
        out = torch.empty_like(q)
    else:
        check_tensor("out", out, dtypes=(q.dtype,), shape=tuple(q.shape))
        if not out.is_contiguous():
            raise ValueError("out must be contiguous")
    max_blocks = block_table.shape[1]
    if validate:
        num_blocks = kv_pool.shape[0]
        for i, n in enumerate(seq_lens.tolist()):
            past = n - t
            if past < 0 or past > max_blocks * bs:
                raise ValueError(
                    f"seq_lens[{i}] = {n} must be in [{t}, {t + max_blocks * bs}] (the {t} chunk tokens "
                    f"plus at most block_table capacity {max_blocks} x {bs} past tokens)"
                )
            used = block_table[i, : _cdiv(past, bs)]
            if used.numel() and (int(used.min()) < 0 or int(used.max()) >= num_blocks):
                raise ValueError(
                    f"block_table[{i}] maps past blocks outside [0, {num_blocks}): {used.tolist()}"
                )
        if bool((selection < -1).any()):
            raise ValueError("selection holds ids < -1 (only -1 pads)")
    if tactic is None:
        tactic = TACTIC_DECODE if t <= 8 else TACTIC_PREFILL
    tile = tile_config(tactic, geometry)
    kernel, _, constexprs = paged_attention_kernel_args(geometry, tile, q.dtype)
    gx, gy, _ = paged_attention_grid(b, t, geometry, tile, _cdiv)
    max_items = selection.shape[2] * (bs // tile.block_n) + _cdiv(t, tile.block_n)
    if num_splits is None:
        num_splits = 1 if q.device.type != "cuda" else max(1, _cdiv(4 * num_sms(q.device), gx * gy))
    elif isinstance(num_splits, bool) or not isinstance(num_splits, int) or num_splits < 1:
        raise ValueError(f"num_splits must be an int >= 1 or None, got {num_splits!r}")
    per_split = _cdiv(max_items, min(num_splits, max_items))
    splits = _cdiv(max_items, per_split)
    extras = paged_attention_extras(t, max_blocks, selection.shape[2])
    if splits == 1:
        kernel[(gx, gy, 1)](q, k, v, kv_pool, block_table, seq_lens, selection, *extras, out,
                            **constexprs, num_warps=tile.num_warps, num_stages=tile.num_stages)  # fmt: skip
        return out
    rows = gx * gy * splits * tile.block_m
    po = torch.empty((rows, d), dtype=torch.float32, device=q.device)
    plse = torch.empty((rows,), dtype=torch.float32, device=q.device)
    constexprs = dict(constexprs, SPLIT=True)
    del constexprs["po_ptr"], constexprs["plse_ptr"], constexprs["ITEMS_PER_SPLIT"]
    kernel[(gx, gy, splits)](q, k, v, kv_pool, block_table, seq_lens, selection, *extras, out, po, plse, per_split,
                             **constexprs, num_warps=tile.num_warps, num_stages=tile.num_stages)  # fmt: skip
    _ucm_merge_splits[(gx, gy)](po, plse, out, t, splits, HKV=hkv, G=geometry.group, D=d,
                                BLOCK_T=tile.block_t, BLOCK_M=tile.block_m, num_warps=4)  # fmt: skip
    return out
