"""The UCM ops in TensorRT's AOT calling convention (and the JIT plugin launchers).

TensorRT's ``aot_impl`` launches exactly one kernel per plugin with the arguments
``[input pointers] [int32 extras] [output pointers]``: no workspace, no float scalars, no
host logic (so split-K merges inside the attention kernel). The attention op runs the one kernel of :mod:`ucm_trt.kernels.attention` (compiled
with the op's attributes and constant strides as constexprs, see :mod:`.attention_op`);
``UcmSelectAllBlocks`` has its own tiny kernel (:mod:`.select_all`).
"""

from ucm_trt.kernels.aot.attention_op import (
    TACTIC_DECODE,
    TACTIC_PREFILL,
    TACTICS,
    PagedAttentionGeometry,
    TileConfig,
    divisible_by_16,
    paged_attention_chunk,
    paged_attention_extras,
    paged_attention_grid,
    paged_attention_kernel_args,
    split_count,
    split_items,
    split_scratch_exprs,
    split_scratch_shapes,
    tile_config,
)
from ucm_trt.kernels.aot.select_all import (
    select_all_blocks,
    select_all_blocks_extras,
    select_all_blocks_grid,
    select_all_blocks_kernel_args,
)

__all__ = [
    "TACTICS",
    "TACTIC_DECODE",
    "TACTIC_PREFILL",
    "PagedAttentionGeometry",
    "TileConfig",
    "divisible_by_16",
    "paged_attention_chunk",
    "paged_attention_extras",
    "paged_attention_grid",
    "paged_attention_kernel_args",
    "split_count",
    "split_items",
    "split_scratch_shapes",
    "split_scratch_exprs",
    "tile_config",
    "select_all_blocks",
    "select_all_blocks_extras",
    "select_all_blocks_grid",
    "select_all_blocks_kernel_args",
]
