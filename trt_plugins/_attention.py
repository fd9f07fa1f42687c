"""Shared plugin logic of the two paged attention ops (sparse and ReRoPE): they differ only in the
attributes that fill :class:`PagedAttentionGeometry`."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace

import torch

from trt_plugins.aot import MAX_AOT_SHARED_MEM, AotLaunch, SharedMemoryLimitError, compile_within_shared_limit
from trt_plugins.ptx import PtxTarget
from ucm_trt.kernels._common import next_pow2
from ucm_trt.kernels.aot import (
    TACTIC_DECODE,
    TACTIC_PREFILL,
    TACTICS,
    PagedAttentionGeometry,
    TileConfig,
    aot_item_split,
    divisible_by_16,
    merge_extras,
    merge_grid,
    merge_kernel_args,
    paged_attention_chunk,
    paged_attention_extras,
    paged_attention_grid,
    paged_attention_kernel_args,
    tile_config,
)

ATTENTION_TACTICS = (TACTIC_DECODE, TACTIC_PREFILL)


def geometry(values: Mapping[str, object], *, rerope: bool) -> PagedAttentionGeometry:
    """Kernel geometry from plugin field values (as the parser delivers them)."""
    kw = dict(
        num_q_heads=int(values["num_q_heads"]),
        num_kv_heads=int(values["num_kv_heads"]),
        head_dim=int(values["head_dim"]),
        block_size=int(values["block_size"]),
        scale=float(values["scale"]),
    )
    if rerope:
        kw.update(
            rerope_window=int(values["rerope_window"]),
            rope_theta=float(values["rope_theta"]),
            logn_training_length=int(values["logn_training_length"]),
        )
    return PagedAttentionGeometry(**kw)


def _tactic(tactic: int, t: int | None = None) -> int:
    if tactic in TACTICS:
        return tactic
    # 0 = TensorRT's default tactic (none advertised / chosen): decode tiles for short chunks.
    return TACTIC_DECODE if t is not None and t <= 8 else TACTIC_PREFILL


def jit_run(tensors: Mapping[str, torch.Tensor], values: Mapping[str, object], out: torch.Tensor, tactic: int,
            *, rerope: bool) -> None:
    """The JIT impl on torch views of the plugin's I/O (already on TensorRT's stream): the same
    kernel as the AOT impl, with split-K (its partials in a torch buffer) by the launch rule."""
    geom = geometry(values, rerope=rerope)
    q = tensors["q"]
    paged_attention_chunk(
        q, tensors["k"], tensors["v"], tensors["kv_pool"], tensors["block_table"], tensors["seq_lens"],
        tensors["selection"], geometry=geom, tactic=_tactic(tactic, q.shape[2]), out=out, validate=False,
    )  # fmt: skip


def _tile_candidates(tile: TileConfig, group: int):
    """The tactic's tile, then smaller ones: halve BLOCK_N (to 16), then the query rows (to 16)."""
    rows = tile.block_m
    while rows >= 16:
        block_t = max(1, rows // group)
        block_m = max(16, next_pow2(block_t * group))
        bn = tile.block_n
        while bn >= 16:
            yield replace(tile, block_t=block_t, block_m=block_m, block_n=bn)
            bn //= 2
        if block_t == 1:
            break
        rows //= 2


def _fit_tile(geom: PagedAttentionGeometry, tac: int, dtype: torch.dtype, target: PtxTarget, *, split: bool,
              rerope: bool):
    """The tactic's tile compiled for the AOT launcher's shared-memory limit (``MAX_AOT_SHARED_MEM``).

    Pipelining matters more than tile width for a memory-bound decode: every candidate tile is tried
    with two stages before any is tried with one (the first H200 run measured the single-stage tile
    at 2x the JIT kernel's time). Returns ``(tile, ptx)``; results never depend on the tile."""
    tried = []
    for stages in (2, 1):
        for tile in _tile_candidates(tile_config(tac, geom), geom.group):
            tile = replace(tile, num_stages=stages)
            kernel, signature, constexprs = paged_attention_kernel_args(geom, tile, dtype, split=split)
            try:
                ptx = compile_within_shared_limit(kernel, signature, constexprs, target, tile.num_warps,
                                                  stages=(stages,), divisible_by_16=divisible_by_16(signature))
            except SharedMemoryLimitError as exc:
                tried.append(f"BLOCK_M={tile.block_m} BLOCK_N={tile.block_n}: {exc.needed}")
                continue
            return tile, ptx
    raise SharedMemoryLimitError(
        f"no tile of {'ReRoPE' if rerope else 'sparse'} attention (head_dim {geom.head_dim}) fits "
        f"{MAX_AOT_SHARED_MEM} B of shared memory for the AOT path ({'; '.join(tried)}); use the JIT plugins",
        needed="; ".join(tried),
    )


def aot_launch(values: Mapping[str, object], dtype: torch.dtype, tactic: int, target: PtxTarget,
               *, rerope: bool) -> AotLaunch:
    """PTX of the tactic's tile, or of the largest smaller tile whose shared memory fits the AOT
    launcher's limit (:func:`_fit_tile`); results never depend on the tile."""
    geom = geometry(values, rerope=rerope)
    tac = _tactic(tactic)
    tile, ptx = _fit_tile(geom, tac, dtype, target, split=False, rerope=rerope)

    def grid(shapes, cdiv):
        q = shapes["q"]
        return paged_attention_grid(q[0], q[2], geom, tile, cdiv)

    def extras(shapes):
        return paged_attention_extras(shapes, geom)

    return AotLaunch(kernel=ptx, grid=grid, extras=extras, tactic=tac, config=tile)


def aot_split_launch(values: Mapping[str, object], dtype: torch.dtype, tactic: int, target: PtxTarget,
                     splits: int, *, rerope: bool, tile: TileConfig | None = None) -> tuple[AotLaunch, AotLaunch]:
    """Split-K on the AOT path as two chained plugins would run it: the partials kernel (outputs
    ``po``, ``plse``, shapes :func:`~ucm_trt.kernels.aot.partials_shapes`) and the merge kernel
    (inputs ``po``, ``plse``; output ``out``). ``grid``/``extras`` take the attention op's input
    shapes for both (concrete ints: the benchmark and the GPU tests launch them through the driver;
    the graph does not chain them yet, see docs/kernels.md). ``tile``: compile exactly this tile
    (benchmarks compare tiles; :class:`SharedMemoryLimitError` if it does not fit) instead of
    :func:`_fit_tile`'s choice."""
    if isinstance(splits, bool) or not isinstance(splits, int) or splits < 1:
        raise ValueError(f"splits must be an int >= 1, got {splits!r}")
    geom = geometry(values, rerope=rerope)
    tac = _tactic(tactic)
    if tile is None:
        tile, part_ptx = _fit_tile(geom, tac, dtype, target, split=True, rerope=rerope)
    else:
        kernel, signature, constexprs = paged_attention_kernel_args(geom, tile, dtype, split=True)
        part_ptx = compile_within_shared_limit(kernel, signature, constexprs, target, tile.num_warps,
                                               stages=(tile.num_stages,), divisible_by_16=divisible_by_16(signature))
    mk, msig, mconst = merge_kernel_args(geom, tile, dtype)
    merge_ptx = compile_within_shared_limit(mk, msig, mconst, target, 4)

    def part_grid(shapes, cdiv):
        q = shapes["q"]
        return paged_attention_grid(q[0], q[2], geom, tile, cdiv, splits)

    def part_extras(shapes):
        per = aot_item_split(shapes["selection"][2], shapes["q"][2], geom.block_size, splits)
        return paged_attention_extras(shapes, geom, items_per_split=per)

    def m_grid(shapes, cdiv):
        q = shapes["q"]
        return merge_grid(q[0], q[2], geom, tile, cdiv)

    def m_extras(shapes):
        from trt_plugins.aot import int_cdiv

        return merge_extras(shapes["q"][2], splits, geom, tile, int_cdiv)

    return (AotLaunch(kernel=part_ptx, grid=part_grid, extras=part_extras, tactic=tac, config=tile),
            AotLaunch(kernel=merge_ptx, grid=m_grid, extras=m_extras, tactic=tac, config=tile))
