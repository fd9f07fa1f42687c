"""Shared plugin logic of the two paged attention ops (sparse and ReRoPE): they differ only in the
attributes that fill :class:`PagedAttentionGeometry`."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from trt_plugins.aot import AotLaunch, compile_within_shared_limit
from trt_plugins.ptx import PtxTarget
from ucm_trt.kernels.aot import (
    TACTICS,
    PagedAttentionGeometry,
    paged_attention_chunk,
    paged_attention_extras,
    paged_attention_grid,
    paged_attention_kernel_args,
    tile_config,
)
from ucm_trt.kernels.aot.paged_attention import TACTIC_DECODE, TACTIC_PREFILL

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
    """The JIT impl on torch views of the plugin's I/O (already on TensorRT's stream)."""
    geom = geometry(values, rerope=rerope)
    q = tensors["q"]
    paged_attention_chunk(
        q, tensors["k"], tensors["v"], tensors["kv_pool"], tensors["block_table"], tensors["seq_lens"],
        tensors["selection"], geometry=geom, tactic=_tactic(tactic, q.shape[2]), out=out, validate=False,
    )  # fmt: skip


def aot_launch(values: Mapping[str, object], dtype: torch.dtype, tactic: int, target: PtxTarget,
               *, rerope: bool) -> AotLaunch:
    geom = geometry(values, rerope=rerope)
    tac = _tactic(tactic)
    tile = tile_config(tac, geom)
    kernel, signature, constexprs = paged_attention_kernel_args(geom, tile, dtype)
    ptx = compile_within_shared_limit(kernel, signature, constexprs, target, tile.num_warps)

    def grid(shapes, cdiv):
        q = shapes["q"]
        return paged_attention_grid(q[0], q[2], geom, tile, cdiv)

    def extras(shapes):
        return paged_attention_extras(shapes["q"][2], shapes["block_table"][1], shapes["selection"][2])

    return AotLaunch(kernel=ptx, grid=grid, extras=extras, tactic=tac)
