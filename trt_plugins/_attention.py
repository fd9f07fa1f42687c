"""The plugin of both paged attention ops (``UcmPagedSparseAttention``, ``UcmPagedReRoPEAttention``),
built from the op's schema by :func:`plugin`: the schema's attributes fill
:class:`~ucm_trt.kernels.aot.PagedAttentionGeometry` (ReRoPE = the schema has ``rerope_window``), so
the two ops differ only in their schemas.

JIT: ``ucm_trt.kernels.aot.paged_attention_chunk`` on TensorRT's stream (tactic 1 = decode tiles,
2 = prefill tiles), split-K merged in the kernel (its scratch in a torch workspace). AOT: the same
Triton kernel compiled to PTX, one launch per plugin. The v1 ops (7 inputs, 1 output) launch it
unsplit (:func:`aot_launch`): grid ``(B * Hkv, cdiv(T, BLOCK_T))``. Their split-K variants
(``...SplitK``: ``split_counters`` an eighth input, ``split_partials`` a second output, ``num_sms`` an
attribute; ``ucm_trt.graph.schemas.SPLIT_OPS``) launch it with split-K (:func:`aot_split_launch`):
still one launch, grid ``(B * Hkv, cdiv(T, BLOCK_T), splits)`` with the launch rule's split count for
``num_sms`` SMs, the merge inside the kernel."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace

import torch

from trt_plugins.aot import MAX_AOT_SHARED_MEM, AotLaunch, SharedMemoryLimitError, compile_within_shared_limit
from trt_plugins.ptx import PtxTarget
from trt_plugins.spec import PluginSpec
from ucm_trt.kernels import aot as kaot
from ucm_trt.kernels.attention import DEFAULT_LAUNCH

ATTENTION_TACTICS = (kaot.TACTIC_DECODE, kaot.TACTIC_PREFILL)


def plugin(spec: PluginSpec):
    """The :class:`~trt_plugins.ops.OpPlugin` of a paged attention op, from its schema."""
    from trt_plugins.ops import OpPlugin, check_attributes

    def check(values):
        check_attributes(spec, values)
        geometry(values, spec=spec)

    return OpPlugin(
        SPEC=spec, TACTICS=ATTENTION_TACTICS, check=check,
        jit_run=lambda tensors, values, out, tactic: jit_run(tensors, values, out, tactic, spec=spec),
        aot_launch=lambda values, dtype, tactic, target: aot_launch(values, dtype, tactic, target, spec=spec),
    )  # fmt: skip


SPLIT_ATTR = "num_sms"  # the split variants' extra attribute: not a geometry field


def is_split(spec: PluginSpec) -> bool:
    """Whether ``spec`` is a split-K variant (its scratch as I/O, ``ucm_trt.graph.schemas.SPLIT_OPS``)."""
    return "split_counters" in spec.inputs


def geometry(values: Mapping[str, object], *, spec: PluginSpec) -> kaot.PagedAttentionGeometry:
    """Kernel geometry from plugin field values (as the parser delivers them): one geometry field
    per schema attribute (but ``num_sms``), of the attribute's type."""
    fields = {a.name: a.py_type(values[a.name]) for a in spec.attrs if a.name != SPLIT_ATTR}
    return kaot.PagedAttentionGeometry(**fields)


def planned_sms(values: Mapping[str, object], *, spec: PluginSpec) -> int:
    """The split variant's ``num_sms`` field; a clear error while it is still 0 (not planned)."""
    sms = int(values[SPLIT_ATTR])
    if sms < 1:
        raise ValueError(
            f"{spec.name}.{SPLIT_ATTR} is {sms}: the split count is planned for the build target's SM count, "
            "which the engine builder stamps on every split attention node (ucm-trt build --sms N, "
            "EngineBuildConfig.sms; default: the CUDA device's count). Build with trt_plugins.build, or set "
            f"{SPLIT_ATTR} >= 1 on the node"
        )
    return sms


def _size_tiles(geom: kaot.PagedAttentionGeometry) -> list[kaot.TileConfig]:
    """One tile per distinct (BLOCK_T, BLOCK_M) that :func:`_fit_tile` may pick for any tactic: the
    scratch of the tile TensorRT ends up running is at most the largest of theirs."""
    seen, out = set(), []
    for tac in kaot.TACTICS:
        for tile in _tile_candidates(kaot.tile_config(tac, geom), geom.group):
            if (tile.block_t, tile.block_m) not in seen:
                seen.add((tile.block_t, tile.block_m))
                out.append(tile)
    return out


def scratch_bounds(batch, chunk_len, geom: kaot.PagedAttentionGeometry, *, sms: int, maximum,
                   programs_per_sm: int = DEFAULT_LAUNCH.programs_per_sm):
    """``(counters, partials)`` lengths that hold the split kernel's scratch at ``batch`` x ``chunk_len``
    whichever tactic and tile the builder picks: the most over :func:`_size_tiles` of
    :func:`~ucm_trt.kernels.aot.split_scratch_exprs` with the launch rule's split count. Ints or
    TensorRT shape expressions (``maximum``: ``max`` for ints, ``tensorrt.plugin.max`` for expressions).
    The engine builder sizes the ``attn_split_counters`` graph input by the first; the plugin's
    ``split_partials`` output has the second as its length."""
    cnt = part = None
    for tile in _size_tiles(geom):
        splits = kaot.split_count(batch, chunk_len, geom, tile, sms=sms, programs_per_sm=programs_per_sm)
        c, p = kaot.split_scratch_exprs(batch, chunk_len, geom, tile, splits)
        cnt = c if cnt is None else maximum(cnt, c)
        part = p if part is None else maximum(part, p)
    return cnt, part


def partials_len(symbols: Mapping[str, object], values: Mapping[str, object], *, spec: PluginSpec, maximum):
    """The ``split_partials`` output's length from the op's shape symbols (``B``, ``T``: ints or shape
    expressions) and its plugin field values."""
    geom = geometry(values, spec=spec)
    return scratch_bounds(symbols["B"], symbols["T"], geom, sms=planned_sms(values, spec=spec), maximum=maximum)[1]


def counters_needed(batch: int, chunk_len: int, values: Mapping[str, object], *, spec: PluginSpec) -> int:
    """The ``split_counters`` length a launch at ``batch`` x ``chunk_len`` may touch (concrete ints;
    independent of ``num_sms``)."""
    geom = geometry(values, spec=spec)
    return scratch_bounds(batch, chunk_len, geom, sms=1, maximum=max)[0]


def _tactic(tactic: int, t: int | None = None) -> int:
    if tactic in kaot.TACTICS:
        return tactic
    # 0 = TensorRT's default tactic (none advertised / chosen): decode tiles for short chunks.
    return kaot.TACTIC_DECODE if t is not None and t <= 8 else kaot.TACTIC_PREFILL


def jit_run(tensors: Mapping[str, torch.Tensor], values: Mapping[str, object], out: torch.Tensor, tactic: int,
            *, spec: PluginSpec) -> None:
    """The JIT impl on torch views of the plugin's I/O (already on TensorRT's stream): the same
    kernel as the AOT impl, with split-K (its partials in a torch buffer) by the launch rule."""
    geom = geometry(values, spec=spec)
    q = tensors["q"]
    kaot.paged_attention_chunk(
        q, tensors["k"], tensors["v"], tensors["kv_pool"], tensors["block_table"], tensors["seq_lens"],
        tensors["selection"], geometry=geom, tactic=_tactic(tactic, q.shape[2]), out=out, validate=False,
    )  # fmt: skip


def _tile_candidates(tile: kaot.TileConfig, group: int):
    """The tactic's tile, then smaller ones: halve BLOCK_N (to 16), then the query rows (to 16)."""
    rows = tile.block_m
    while rows >= 16:
        block_t = max(1, rows // group)
        block_m = max(16, 1 << (block_t * group - 1).bit_length())  # the next power of two
        bn = tile.block_n
        while bn >= 16:
            yield replace(tile, block_t=block_t, block_m=block_m, block_n=bn)
            bn //= 2
        if block_t == 1:
            break
        rows //= 2


def _compile_tile(geom: kaot.PagedAttentionGeometry, tile: kaot.TileConfig, dtype: torch.dtype, target: PtxTarget,
                  *, split: bool):
    """PTX of exactly ``tile`` (its ``num_stages``); :class:`SharedMemoryLimitError` over the AOT limit."""
    kernel, signature, constexprs = kaot.paged_attention_kernel_args(geom, tile, dtype, split=split)
    return compile_within_shared_limit(kernel, signature, constexprs, target, tile.num_warps,
                                       stages=(tile.num_stages,), divisible_by_16=kaot.divisible_by_16(signature))


def _fit_tile(geom: kaot.PagedAttentionGeometry, tac: int, dtype: torch.dtype, target: PtxTarget, *, split: bool,
              name: str):
    """The tactic's tile compiled for the AOT launcher's shared-memory limit (``MAX_AOT_SHARED_MEM``).

    First the tactic's own tile, exactly as the runtime's launch rule runs it (keys per tile, warps
    and stages of :func:`ucm_trt.kernels.attention.plan_attention`): since the kernel walks the pool
    and the chunk's K/V in separate passes (one load per operand and tile), the decode tile fits
    (sm_90, GQA 32/8, d128, block 64, bf16: 64 keys x 2 stages in 38 KiB, was 100 KiB). Where it does
    not fit, pipelining matters more than tile width for a memory-bound decode: every smaller
    candidate tile is tried with three stages, then two, then one (H100, 2026-12-07, 128K, 1/8, the
    split kernel with the two-load tiles: BLOCK_N 16 with 3 / 2 / 1 stages ran 55.5 / 70.8 / 97.4 us
    at batch 1; ``benchmarks/results/kernels_NVIDIA-H100-80GB-HBM3_2026-12-07.json``,
    ``ours_sparse_aot_tile``). Returns ``(tile, ptx)``; results never depend on the tile."""
    own = kaot.tile_config(tac, geom)
    tried = []
    # own first; dict.fromkeys drops the candidate equal to it (the same tile would be compiled twice)
    candidates = (replace(t, num_stages=st) for st in (3, 2, 1) for t in _tile_candidates(own, geom.group))
    for tile in dict.fromkeys((own, *candidates)):
        try:
            ptx = _compile_tile(geom, tile, dtype, target, split=split)
        except SharedMemoryLimitError as exc:
            tried.append(f"BLOCK_M={tile.block_m} BLOCK_N={tile.block_n}: {exc.needed}")
            continue
        return tile, ptx
    raise SharedMemoryLimitError(
        f"no tile of {name} (head_dim {geom.head_dim}) fits "
        f"{MAX_AOT_SHARED_MEM} B of shared memory for the AOT path ({'; '.join(tried)}); use the JIT plugins",
        needed="; ".join(tried),
    )


def aot_launch(values: Mapping[str, object], dtype: torch.dtype, tactic: int, target: PtxTarget,
               *, spec: PluginSpec) -> AotLaunch:
    """PTX of the tactic's tile, or of the largest smaller tile whose shared memory fits the AOT
    launcher's limit (:func:`_fit_tile`); results never depend on the tile. A split variant's spec
    gets :func:`aot_split_launch` for its ``num_sms`` (what its engines run); a v1 op's the unsplit
    kernel (what engines of graphs rewritten before the split variants run)."""
    if is_split(spec):
        return aot_split_launch(values, dtype, tactic, target, spec=spec, sms=planned_sms(values, spec=spec))
    geom = geometry(values, spec=spec)
    tac = _tactic(tactic)
    tile, ptx = _fit_tile(geom, tac, dtype, target, split=False, name=spec.name)

    def grid(shapes, cdiv):
        q = shapes["q"]
        return kaot.paged_attention_grid(q[0], q[2], geom, tile, cdiv)

    def extras(shapes):
        return kaot.paged_attention_extras(shapes, geom)

    return AotLaunch(kernel=ptx, grid=grid, extras=extras, tactic=tac, config=tile)


def aot_split_launch(values: Mapping[str, object], dtype: torch.dtype, tactic: int, target: PtxTarget,
                     *, spec: PluginSpec, sms: int, programs_per_sm: int = DEFAULT_LAUNCH.programs_per_sm,
                     splits: int | None = None, tile: kaot.TileConfig | None = None) -> AotLaunch:
    """Split-K on the AOT path: ONE kernel (the merge inside it), in TensorRT's calling convention
    with its scratch as plugin I/O: ``split_counters`` (int32, zero before the launch and left zero
    by it) an eighth input, ``split_partials`` (fp32) a second output; ``AotLaunch.scratch(shapes)``
    gives their shapes. ``aot_impl`` has no workspace, so the counters are an input the graph feeds
    (the split variants' ``split_counters``, from the rewriter's ``attn_split_counters`` graph input);
    :func:`aot_launch` of a split variant returns this launch with ``sms`` = the node's ``num_sms``.

    The split count is the launch rule's :func:`~ucm_trt.kernels.attention.min_splits` for the card's
    ``sms`` (an expression of the batch and the chunk length, which TensorRT would evaluate at run
    time), or ``splits`` when given. ``tile``: compile exactly this tile (benchmarks compare tiles;
    :class:`SharedMemoryLimitError` if it does not fit) instead of :func:`_fit_tile`'s choice."""
    for name, v in (("sms", sms), ("programs_per_sm", programs_per_sm)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be an int >= 1, got {v!r}")
    if splits is not None and (isinstance(splits, bool) or not isinstance(splits, int) or splits < 1):
        raise ValueError(f"splits must be an int >= 1 or None, got {splits!r}")
    geom = geometry(values, spec=spec)
    tac = _tactic(tactic)
    if tile is None:
        tile, ptx = _fit_tile(geom, tac, dtype, target, split=True, name=spec.name)
    else:
        ptx = _compile_tile(geom, tile, dtype, target, split=True)

    def n_splits(shapes):
        q = shapes["q"]
        if splits is not None:
            return splits
        return kaot.split_count(q[0], q[2], geom, tile, sms=sms, programs_per_sm=programs_per_sm)

    def grid(shapes, cdiv):
        q = shapes["q"]
        return kaot.paged_attention_grid(q[0], q[2], geom, tile, cdiv, n_splits(shapes))

    def extras(shapes):
        per = kaot.split_items(shapes["selection"][2], shapes["q"][2], geom.block_size, n_splits(shapes))
        return kaot.paged_attention_extras(shapes, geom, items_per_split=per)

    def scratch(shapes):
        q = shapes["q"]
        return kaot.split_scratch_shapes(int(q[0]), int(q[2]), geom, tile, int(n_splits(shapes)))

    return AotLaunch(kernel=ptx, grid=grid, extras=extras, tactic=tac, config=tile, scratch=scratch)
