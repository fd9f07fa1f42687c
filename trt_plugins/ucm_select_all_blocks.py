"""Plugin ``ucm::UcmSelectAllBlocks`` (spec: ``ucm_trt.graph.schemas.SELECT_ALL_BLOCKS``).

``selection[b, h, j] = j``: one tiny kernel, AOT grid ``(B * Hkv, cdiv(max_blocks, 256))``,
extra ``(max_blocks,)``.
"""

from __future__ import annotations

from trt_plugins.aot import AotLaunch, compile_within_shared_limit
from trt_plugins.spec import PluginSpec
from ucm_trt.kernels.aot import (
    select_all_blocks,
    select_all_blocks_extras,
    select_all_blocks_grid,
    select_all_blocks_kernel_args,
)


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


def plugin(spec: PluginSpec):
    """The :class:`~trt_plugins.ops.OpPlugin` of ``UcmSelectAllBlocks`` (attribute checks from its schema)."""
    from trt_plugins.ops import OpPlugin, check_attributes

    return OpPlugin(SPEC=spec, TACTICS=None, check=lambda values: check_attributes(spec, values),
                    jit_run=jit_run, aot_launch=aot_launch)  # fmt: skip
