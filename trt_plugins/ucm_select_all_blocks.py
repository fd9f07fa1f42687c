"""Plugin ``ucm::UcmSelectAllBlocks`` (spec: ``ucm_trt.graph.schemas.SELECT_ALL_BLOCKS``).

``selection[b, h, j] = j``: one tiny kernel, AOT grid ``(B * Hkv, cdiv(max_blocks, 256))``,
extra ``(max_blocks,)``.
"""

from __future__ import annotations

from trt_plugins.aot import AotLaunch, compile_within_shared_limit
from trt_plugins.spec import plugin_spec
from ucm_trt._validation import check_positive_int
from ucm_trt.kernels.aot import (
    select_all_blocks,
    select_all_blocks_extras,
    select_all_blocks_grid,
    select_all_blocks_kernel_args,
)

SPEC = plugin_spec("UcmSelectAllBlocks")
TACTICS = None


def check(values):
    check_positive_int("UcmSelectAllBlocks.num_kv_heads", values["num_kv_heads"])


def jit_run(tensors, values, out, tactic):
    select_all_blocks(tensors["block_table"], num_kv_heads=int(values["num_kv_heads"]), out=out)


def aot_launch(values, dtype, tactic, target) -> AotLaunch:
    hkv = int(values["num_kv_heads"])
    kernel, signature, constexprs = select_all_blocks_kernel_args()
    ptx = compile_within_shared_limit(kernel, signature, constexprs, target, num_warps=4)

    def grid(shapes, cdiv):
        bt = shapes["block_table"]
        return select_all_blocks_grid(bt[0], bt[1], hkv, cdiv)

    def extras(shapes):
        return select_all_blocks_extras(shapes["block_table"][1])

    return AotLaunch(kernel=ptx, grid=grid, extras=extras, tactic=0)
