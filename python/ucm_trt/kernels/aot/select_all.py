"""``UcmSelectAllBlocks`` as one AOT-friendly kernel: ``selection[b, h, j] = j`` for ``j < max_blocks``.

Parameters in TensorRT AOT order: ``block_table`` (input, only its shape matters),
``MAX_BLOCKS`` (int32 extra), ``selection`` (output ``[B, Hkv, max_blocks]`` int32).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ucm_trt._validation import check_positive_int, check_tensor

__all__ = [
    "select_all_blocks",
    "select_all_blocks_kernel_args",
    "select_all_blocks_grid",
    "select_all_blocks_extras",
    "SELECT_ALL_BLOCK",
]

SELECT_ALL_BLOCK = 256


@triton.jit
def _ucm_select_all_kernel(bt_ptr, MAX_BLOCKS, sel_ptr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    j = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    tl.store(sel_ptr + row * MAX_BLOCKS + j, j, mask=j < MAX_BLOCKS)


def select_all_blocks_kernel_args() -> tuple[object, dict[str, str], dict[str, object]]:
    return (
        _ucm_select_all_kernel,
        {"bt_ptr": "*i32", "MAX_BLOCKS": "i32", "sel_ptr": "*i32"},
        {"BLOCK": SELECT_ALL_BLOCK},
    )


def select_all_blocks_grid(batch, max_blocks, num_kv_heads: int, cdiv):
    """Grid ``(B * Hkv, cdiv(max_blocks, BLOCK), 1)``; ints or TensorRT shape expressions."""
    return batch * num_kv_heads, cdiv(max_blocks, SELECT_ALL_BLOCK), 1


def select_all_blocks_extras(max_blocks):
    return (max_blocks,)


def select_all_blocks(block_table: torch.Tensor, *, num_kv_heads: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """``[B, num_kv_heads, max_blocks]`` int32 with every logical block id, via the kernel."""
    check_tensor("block_table", block_table, ndim=2, dtypes=(torch.int32,))
    check_positive_int("num_kv_heads", num_kv_heads)
    b, m = block_table.shape
    if out is None:
        out = torch.empty((b, num_kv_heads, m), dtype=torch.int32, device=block_table.device)
    else:
        check_tensor("out", out, dtypes=(torch.int32,), shape=(b, num_kv_heads, m))
    if b == 0 or m == 0:
        return out
    kernel, _, constexprs = select_all_blocks_kernel_args()
    grid = select_all_blocks_grid(b, m, num_kv_heads, lambda x, y: -(-x // y))
    kernel[grid](block_table, *select_all_blocks_extras(m), out, **constexprs)
    return out
