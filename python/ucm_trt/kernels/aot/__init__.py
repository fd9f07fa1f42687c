"""Single-kernel variants of the UCM ops for TensorRT's AOT plugin path (and the JIT plugin path).

TensorRT's ``aot_impl`` launches exactly one kernel per plugin with the arguments
``[input pointers] [int32 extras] [output pointers]``: no workspace, no float scalars, no
host logic. The kernels here follow that contract literally -- their parameters are the UCM
op's inputs in schema order, then int32 sizes, then the outputs; every float (softmax scale,
RoPE theta, log-n factor) and every geometry attribute is a ``tl.constexpr`` -- so the same
``@triton.jit`` function is compiled to PTX for engines and launched through Triton for the
JIT path and the CPU interpreter tests. Strides are implied by the (contiguous) shapes.
"""

from ucm_trt.kernels.aot.paged_attention import (
    TACTICS,
    PagedAttentionGeometry,
    TileConfig,
    paged_attention_chunk,
    paged_attention_extras,
    paged_attention_grid,
    paged_attention_kernel_args,
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
    "PagedAttentionGeometry",
    "TileConfig",
    "paged_attention_chunk",
    "paged_attention_extras",
    "paged_attention_grid",
    "paged_attention_kernel_args",
    "tile_config",
    "select_all_blocks",
    "select_all_blocks_extras",
    "select_all_blocks_grid",
    "select_all_blocks_kernel_args",
]
