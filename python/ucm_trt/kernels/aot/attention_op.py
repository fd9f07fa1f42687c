"""The UCM attention ops (``UcmPagedSparseAttention`` / ``UcmPagedReRoPEAttention``) on the one kernel
of :mod:`ucm_trt.kernels.attention`: the TensorRT JIT launcher and the AOT calling convention.

Op semantics (``ucm_trt.graph.schemas``): the pool holds the PAST tokens only (positions
< seq_len - T); the chunk's own K/V arrive as the ``k``/``v`` inputs. Key position ``p`` is visible
to the query at position ``i`` iff ``p <= i`` and (``p`` is in the chunk, or block ``p // block_size``
is in ``selection[b, kv_head]``). Selection slots with -1 are empty, an id repeated next to itself
counts once, ids >= max_blocks are skipped (and never dereferenced).

AOT (TensorRT's launcher: ``[input pointers] [int32 extras] [output pointers]``, one kernel, no
workspace, no float scalars): the kernel is compiled with ``CHUNK_KV`` on, every float and geometry
attribute and every stride fixed by the shapes' constant dims as a constexpr; the strides that
depend on dynamic dims (T, max_blocks, S) are int32 extras. Its parameters are then::

    q, k, v, kv_pool, block_table, seq_lens, selection        inputs (schema order)
    T, MAX_BLOCKS, NUM_SEL, NUM_BLOCKS, <dynamic strides>     int32 extras (:func:`paged_attention_extras`)
    out                                                       output

Split-K on the AOT path is the same single kernel with its merge inside (the last-arriving split
of a tile merges). TensorRT's ``aot_impl`` gives a kernel no workspace (``KernelLaunchParams`` has
only grid, block and shared memory; the arguments are only I/O pointers and int32 extras), so the
scratch comes from the plugin's I/O: ``split_counters`` (int32, zero before the launch, left zero
by it) as an eighth *input*, which the graph feeds (the rewriter's one ``attn_split_counters`` graph
input for every layer of the split-K ops, ``ucm_trt.graph.schemas.SPLIT_OPS``), and ``split_partials``
(fp32) as a second *output*, which TensorRT allocates from the context's activation memory (written
and read within the launch, so its contents at launch do not matter); both sized by
:func:`split_scratch_shapes` (:func:`split_scratch_exprs` as shape expressions).
``ITEMS_PER_SPLIT`` becomes an extra and the grid gets a third axis (:func:`split_count`, an
expression of the batch and chunk length that TensorRT evaluates per launch).
See :func:`paged_attention_kernel_args` with ``split=True`` and docs/performance.md.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ucm_trt import limits
from ucm_trt._validation import check_gqa, check_same_device, check_tensor
from ucm_trt.kernels._common import KERNEL_FLOAT_DTYPES, num_sms
from ucm_trt.kernels.attention import (
    DECODE_ROWS,
    ITEM_CHUNK,
    PREFILL_ROWS,
    AttentionLaunch,
    AttentionWorkspace,
    _paged_attn_fwd,
    blocks_per_tile,
    check_guard,
    default_block_n,
    geometry_constexprs,
    head_tiles,
    merge_tile,
    min_splits,
    plan_attention,
    query_tile,
    rope_constexprs,
    run_attention,
    split_scratch_sizes,
)
from ucm_trt.kernels.guard import IndexGuard

__all__ = [
    "TACTICS",
    "TACTIC_DECODE",
    "TACTIC_PREFILL",
    "PagedAttentionGeometry",
    "TileConfig",
    "tile_config",
    "paged_attention_kernel_args",
    "paged_attention_grid",
    "paged_attention_extras",
    "paged_attention_chunk",
    "split_count",
    "split_items",
    "split_scratch_shapes",
    "split_scratch_exprs",
    "divisible_by_16",
]

# Tactic ids (TensorRT tactics are positive ints; 0 means "default"). Results never depend on them.
TACTIC_DECODE = 1  # few query tokens: 16-row tiles
TACTIC_PREFILL = 2  # long chunks: 64-row tiles
TACTICS = {TACTIC_DECODE: "decode", TACTIC_PREFILL: "prefill"}
_ROWS = {TACTIC_DECODE: DECODE_ROWS, TACTIC_PREFILL: PREFILL_ROWS}

_TRITON_PTR = {torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float32: "*fp32"}
_NO_SPLIT_ITEMS = 1 << 30  # ITEMS_PER_SPLIT of a one-piece launch: the whole work list


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
        limits.check_head_dim("PagedAttentionGeometry", self.head_dim)
        limits.check_block_size("PagedAttentionGeometry", self.block_size)
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

    def constexprs(self) -> dict:
        """Geometry + ReRoPE constexprs of the kernel."""
        return dict(
            geometry_constexprs(num_kv_heads=self.num_kv_heads, group=self.group, head_dim=self.head_dim,
                                block_size=self.block_size, scale=self.scale),
            **rope_constexprs(self.rerope, self.rerope_window or 0, self.rope_theta,
                              self.logn_training_length or None),
        )  # fmt: skip


@dataclass(frozen=True, kw_only=True)
class TileConfig:
    block_t: int
    block_n: int
    block_m: int
    num_warps: int
    num_stages: int


def tile_config(tactic: int, geometry: PagedAttentionGeometry) -> TileConfig:
    """Tile shape of ``tactic`` (see ``TACTICS``): the query tile and key tile of the launch rule
    (:func:`ucm_trt.kernels.attention.plan_attention`) for a chunk length unknown at build time."""
    if tactic not in TACTICS:
        raise ValueError(f"tactic must be one of {sorted(TACTICS)} ({TACTICS}), got {tactic!r}")
    block_t, block_m = query_tile(_ROWS[tactic], geometry.group)
    _, dv = head_tiles(geometry.head_dim)
    num_warps = 8 if block_m > 16 and dv > 128 else 4
    return TileConfig(block_t=block_t, block_n=default_block_n(geometry.block_size, geometry.head_dim),
                      block_m=block_m, num_warps=num_warps, num_stages=2)  # fmt: skip


def paged_attention_kernel_args(
    geometry: PagedAttentionGeometry, tile: TileConfig, dtype: torch.dtype, *, split: bool = False
) -> tuple[object, dict[str, str], dict[str, object]]:
    """``(kernel, signature, constexprs)`` of the one attention kernel in TensorRT's AOT convention.

    ``signature`` maps the non-constexpr parameters, in order, to Triton types: 7 input pointers,
    the int32 extras of :func:`paged_attention_extras`, then the output pointer ``out``. With
    ``split=True`` (split-K merged in the kernel) ``cnt_ptr`` (int32 counters, zero before the
    launch and left zero) is an eighth input, ``ITEMS_PER_SPLIT`` an extra and ``part_ptr`` (fp32
    partials) a second output, both sized by :func:`split_scratch_shapes`.
    """
    if dtype not in _TRITON_PTR:
        raise TypeError(f"dtype must be one of float16, bfloat16, float32, got {dtype}")
    ty = _TRITON_PTR[dtype]
    g = geometry
    d, bs, hkv = g.head_dim, g.block_size, g.num_kv_heads
    signature = {
        "q_ptr": ty, "k_ptr": ty, "v_ptr": ty, "pool_ptr": ty, "bt_ptr": "*i32", "seqlen_ptr": "*i32",
        "sel_ptr": "*i32",
    }  # fmt: skip
    if split:
        signature["cnt_ptr"] = "*i32"
    signature.update({"T": "i32", "MAX_BLOCKS": "i32", "NUM_SEL": "i32", "NUM_BLOCKS": "i32"})
    if split:
        signature["ITEMS_PER_SPLIT"] = "i32"
    signature.update({
        "stride_qb": "i32", "stride_qh": "i32", "stride_kb": "i32", "stride_kh": "i32", "stride_btb": "i32",
        "stride_sb": "i32", "stride_sh": "i32", "stride_ob": "i32", "stride_oh": "i32", "out_ptr": ty,
    })  # fmt: skip
    if split:
        signature["part_ptr"] = "*fp32"
    constexprs = dict(
        g.constexprs(),
        # strides fixed by constant dims (contiguous tensors)
        stride_qt=d, stride_kt=d, stride_pn=2 * hkv * bs * d, stride_pkv=hkv * bs * d, stride_ph=bs * d,
        stride_pt=d, stride_ot=d,
        BLOCK_N=tile.block_n, BLOCK_T=tile.block_t, BLOCK_M=tile.block_m,
        HAS_SEL=True, CHUNK_KV=True, SPLIT=split, HAS_GUARD=False, guard_ptr=None,
        DOT_PREC="ieee" if dtype == torch.float32 else "tf32", DOT_F32=False, ITEMS=ITEM_CHUNK,
        BPT=blocks_per_tile(tile.block_n, bs),
        **merge_tile(g.group, head_tiles(d)[1]),
    )  # fmt: skip
    if not split:
        constexprs.update(ITEMS_PER_SPLIT=_NO_SPLIT_ITEMS, cnt_ptr=None, part_ptr=None)
    return _paged_attn_fwd, signature, constexprs


def divisible_by_16(signature: dict[str, str]) -> tuple[str, ...]:
    """Parameters the AOT kernel may assume 16-aligned: every pointer (TensorRT allocates them
    256-byte aligned) and the strides that are multiples of head_dim (a multiple of 16)."""
    return tuple(n for n in signature if signature[n].startswith("*") or n in (
        "stride_qb", "stride_qh", "stride_kb", "stride_kh", "stride_ob", "stride_oh"))


def paged_attention_grid(batch, chunk_len, geometry: PagedAttentionGeometry, tile: TileConfig, cdiv, splits=1):
    """Launch grid ``(x, y, z)``. ``batch``/``chunk_len`` may be ints or TensorRT shape expressions
    (kept on the left of every operator); ``cdiv`` is the matching ceil-division."""
    return batch * geometry.num_kv_heads, cdiv(chunk_len, tile.block_t), splits


def paged_attention_extras(shapes, geometry: PagedAttentionGeometry, items_per_split=None):
    """The int32 extras, in kernel order, from the op's input ``shapes`` (name -> dims; ints or
    TensorRT shape expressions, kept on the left of every operator). ``items_per_split`` (int or
    expression, :func:`split_items`) only for the split kernel."""
    q, pool, bt, sel = shapes["q"], shapes["kv_pool"], shapes["block_table"], shapes["selection"]
    d, hq, hkv = geometry.head_dim, geometry.num_q_heads, geometry.num_kv_heads
    t = q[2]
    head = () if items_per_split is None else (items_per_split,)
    return (t, bt[1], sel[2], pool[0], *head,
            t * (hq * d), t * d,  # q strides (b, h)
            t * (hkv * d), t * d,  # k/v strides (b, h)
            bt[1],  # block_table row stride
            sel[2] * hkv, sel[2],  # selection strides (b, h)
            t * (hq * d), t * d)  # out strides (b, h)  # fmt: skip


def split_count(batch, chunk_len, geometry: PagedAttentionGeometry, tile: TileConfig, *, sms: int,
                programs_per_sm: int):
    """Splits of the AOT split kernel: :func:`~ucm_trt.kernels.attention.min_splits` of the launch
    rule for ``batch x Hkv x query tiles`` programs. ``batch``/``chunk_len`` are ints or TensorRT
    shape expressions (kept on the left of every operator: ``(a + b - 1) // b`` is the ceil-division)."""
    qtiles = (chunk_len + (tile.block_t - 1)) // tile.block_t
    return min_splits(batch * geometry.num_kv_heads * qtiles, programs_per_sm, sms, lambda a, b: (a + b - 1) // b)


def split_items(num_sel, chunk_len, block_size: int, splits):
    """``ITEMS_PER_SPLIT`` of a split launch: the op's work list (``S`` selection slots, then the
    chunk's blocks) cut into ``splits`` pieces; ints or shape expressions."""
    work = num_sel + (chunk_len + (block_size - 1)) // block_size
    return (work + splits - 1) // splits


def split_scratch_shapes(batch: int, chunk_len: int, geometry: PagedAttentionGeometry, tile: TileConfig,
                         splits: int) -> tuple[tuple[int], tuple[int]]:
    """``(counters, partials)`` shapes of the split kernel's scratch: the int32 counter input (zeros)
    and the fp32 partials output."""
    n_cnt, n_part = split_scratch_sizes(batch=batch, num_kv_heads=geometry.num_kv_heads,
                                        n_qtiles=-(-chunk_len // tile.block_t), splits=splits,
                                        block_m=tile.block_m, dv=head_tiles(geometry.head_dim)[1])  # fmt: skip
    return (n_cnt,), (n_part,)


def split_scratch_exprs(batch, chunk_len, geometry: PagedAttentionGeometry, tile: TileConfig, splits):
    """:func:`split_scratch_shapes`' two lengths (counters, partials) for ints or TensorRT shape
    expressions (kept on the left of every operator), as TensorRT's shape inference evaluates them.
    Must agree with :func:`ucm_trt.kernels.attention.split_scratch_sizes` (a test checks)."""
    tiles = batch * geometry.num_kv_heads * ((chunk_len + (tile.block_t - 1)) // tile.block_t)
    return tiles, tiles * splits * (tile.block_m * (head_tiles(geometry.head_dim)[1] + 1))


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
    guard: IndexGuard | None = None,
    workspace: AttentionWorkspace | None = None,
) -> torch.Tensor:
    """Run the UCM paged attention op (sparse or ReRoPE per ``geometry``) through Triton: the
    TensorRT JIT plugin path, split-K included.

    q ``[B, Hq, T, D]``, k/v ``[B, Hkv, T, D]`` (the chunk), kv_pool ``[N, 2, Hkv, bs, D]`` (past
    tokens only), block_table int32 ``[B, M]``, seq_lens int32 ``[B]`` (including the chunk),
    selection int32 ``[B, Hkv, S]``. All contiguous, one float dtype. Returns ``[B, Hq, T, D]``.
    ``tactic=None`` takes the query tile of the launch rule; ``num_splits=None`` the split count of
    the rule (:func:`ucm_trt.kernels.attention.plan_attention`). ``validate=True`` also checks index
    contents (one device sync); ``guard`` flags out-of-range ids without one. ``workspace``: the
    split-K scratch (:class:`~ucm_trt.kernels.attention.AttentionWorkspace`; ``None``: one per call).
    """
    if not isinstance(geometry, PagedAttentionGeometry):
        raise TypeError(f"geometry must be a PagedAttentionGeometry, got {type(geometry).__name__}")
    check_guard(guard)
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
            raise ValueError(f"{name} must be contiguous (the AOT kernel derives strides from shapes)")
    check_same_device(q=q, k=k, v=v, kv_pool=kv_pool, block_table=block_table, seq_lens=seq_lens,
                      selection=selection, out=out)  # fmt: skip
    if out is None:
        out = torch.empty_like(q)
    else:
        check_tensor("out", out, dtypes=(q.dtype,), shape=tuple(q.shape))
        if not out.is_contiguous():
            raise ValueError("out must be contiguous")
    if num_splits is not None and (isinstance(num_splits, bool) or not isinstance(num_splits, int) or num_splits < 1):
        raise ValueError(f"num_splits must be an int >= 1 or None, got {num_splits!r}")
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
        launch = AttentionLaunch(num_splits=num_splits)
    else:
        tile = tile_config(tactic, geometry)
        launch = AttentionLaunch(num_splits=num_splits, block_t=tile.block_t, block_n=tile.block_n,
                                 num_warps=tile.num_warps, num_stages=tile.num_stages)  # fmt: skip
    plan = plan_attention(
        batch=b, num_kv_heads=hkv, group=geometry.group, tq=t, head_dim=d, block_size=bs,
        work_items=selection.shape[2] + _cdiv(t, bs), sms=num_sms(q.device), launch=launch,
    )
    return run_attention(q, k, v, kv_pool, block_table, seq_lens, selection, out, plan=plan,
                         consts=geometry.constexprs(), guard=guard, workspace=workspace)
