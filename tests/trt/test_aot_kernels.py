"""CPU tier: the AOT kernels launched with TensorRT's AOT calling convention, against the references.

The launch is built exactly as ``aot_impl`` describes it to TensorRT -- arguments
``[inputs in schema order] [int32 extras] [outputs]``, grid from the launch rule evaluated at the
concrete input shapes -- and runs through Triton (the interpreter on the CPU). The same kernel is the
JIT plugin path, so this also checks the JIT impl's numerics.
"""

from __future__ import annotations

import pytest
import torch

from tests.trt._cases import CASES, make_inputs, reference
from trt_plugins import ops
from trt_plugins.aot import int_cdiv
from ucm_trt.kernels.aot import (
    TACTIC_DECODE,
    TACTIC_PREFILL,
    aot_item_split,
    merge_extras,
    merge_grid,
    merge_kernel_args,
    paged_attention_chunk,
    paged_attention_extras,
    paged_attention_grid,
    paged_attention_kernel_args,
    partials_shapes,
    select_all_blocks,
    select_all_blocks_extras,
    select_all_blocks_grid,
    select_all_blocks_kernel_args,
    tile_config,
)
from ucm_trt.testing.tolerances import tolerances_for


def _interpreted(constexprs):
    """The AOT constexprs as the interpreter runs them: fp32 dots (its bf16/fp16 tl.dot is wrong)."""
    return dict(constexprs, DOT_F32=True, DOT_PREC="ieee")


def _launch_like_tensorrt(case, inputs, tactic):
    """One launch with the argument order and grid TensorRT's AOT launcher uses."""
    geom = case.geometry()
    tile = tile_config(tactic, geom)
    kernel, signature, constexprs = paged_attention_kernel_args(geom, tile, inputs["q"].dtype)
    names = ops.module(case.op_name).SPEC.inputs
    shapes = {n: tuple(inputs[n].shape) for n in names}
    grid = paged_attention_grid(shapes["q"][0], shapes["q"][2], geom, tile, int_cdiv)
    extras = paged_attention_extras(shapes, geom)
    out = torch.full_like(inputs["q"], float("nan"))  # poisoned: unwritten elements fail
    args = [inputs[n] for n in names] + [int(e) for e in extras] + [out]
    assert len(args) == len(signature)
    # by name: the constant strides are constexprs between the extras, so the call cannot be positional
    kernel[grid](**dict(zip(signature, args, strict=True)), **_interpreted(constexprs), num_warps=tile.num_warps,
                 num_stages=tile.num_stages)  # fmt: skip
    return out


def _split_launch_like_tensorrt(case, inputs, tactic, splits):
    """Split-K as two chained AOT plugins would run it: the partials kernel (outputs po, plse),
    then the merge kernel (inputs po, plse; output out), each in TensorRT's argument order."""
    geom = case.geometry()
    tile = tile_config(tactic, geom)
    dtype = inputs["q"].dtype
    names = ops.module(case.op_name).SPEC.inputs
    shapes = {n: tuple(inputs[n].shape) for n in names}
    b, _, t, _ = shapes["q"]
    kernel, signature, constexprs = paged_attention_kernel_args(geom, tile, dtype, split=True)
    po_shape, lse_shape = partials_shapes(b, t, geom, tile, splits)
    po = torch.full(po_shape, float("nan"))
    plse = torch.full(lse_shape, float("nan"))
    per = aot_item_split(shapes["selection"][2], t, geom.block_size, splits)
    extras = paged_attention_extras(shapes, geom, items_per_split=per)
    args = [inputs[n] for n in names] + [int(e) for e in extras] + [po, plse]
    assert len(args) == len(signature)
    grid = paged_attention_grid(b, t, geom, tile, int_cdiv, splits)
    # by name: the constant strides are constexprs between the extras, so the call cannot be positional
    kernel[grid](**dict(zip(signature, args, strict=True)), **_interpreted(constexprs), num_warps=tile.num_warps,
                 num_stages=tile.num_stages)  # fmt: skip
    mk, msig, mconst = merge_kernel_args(geom, tile, dtype)
    out = torch.full_like(inputs["q"], float("nan"))
    margs = [po, plse, *merge_extras(t, splits, geom, tile, int_cdiv), out]
    assert len(margs) == len(msig)
    mk[merge_grid(b, t, geom, tile, int_cdiv)](**dict(zip(msig, margs, strict=True)), **mconst)
    return out


@pytest.mark.parametrize("tactic", [TACTIC_DECODE, TACTIC_PREFILL])
@pytest.mark.parametrize("name", sorted(CASES))
def test_attention_aot_convention_matches_reference(name, tactic):
    case = CASES[name]
    inputs, pool_full = make_inputs(case)
    out = _launch_like_tensorrt(case, inputs, tactic)
    torch.testing.assert_close(out, reference(case, inputs, pool_full), **tolerances_for(torch.float32))


@pytest.mark.parametrize("splits", [2, 7])
@pytest.mark.parametrize("name", ["decode", "prefill", "rerope_logn_prefill", "d80"])
def test_split_k_as_two_chained_aot_kernels_matches_reference(name, splits):
    """The AOT path's split-K: partials kernel + merge kernel, both in TensorRT's calling convention."""
    case = CASES[name]
    inputs, pool_full = make_inputs(case)
    tactic = TACTIC_DECODE if case.t <= 8 else TACTIC_PREFILL
    out = _split_launch_like_tensorrt(case, inputs, tactic, splits)
    torch.testing.assert_close(out, reference(case, inputs, pool_full), **tolerances_for(torch.float32))


@pytest.mark.parametrize("splits", [2, 3, 50])
@pytest.mark.parametrize("name", ["decode", "prefill", "select_all", "gqa8_d64", "rerope_logn_prefill"])
def test_split_kv_jit_path_matches_reference(name, splits):
    """The JIT path's flash-decoding split (work list cut into pieces, merged by log-sum-exp); 50
    splits leave most pieces empty."""
    case = CASES[name]
    inputs, pool_full = make_inputs(case)
    out = paged_attention_chunk(*inputs.values(), geometry=case.geometry(), num_splits=splits)
    torch.testing.assert_close(out, reference(case, inputs, pool_full), **tolerances_for(torch.float32))


@pytest.mark.parametrize("name", ["chunk3", "rerope", "d96_gqa4"])
def test_attention_fp16_matches_reference(name):
    case = CASES[name]
    inputs, pool_full = make_inputs(case, torch.float16)
    out = paged_attention_chunk(*inputs.values(), geometry=case.geometry())
    torch.testing.assert_close(out.float(), reference(case, inputs, pool_full), **tolerances_for(torch.float16))


def test_chunk_is_read_from_k_v_not_from_pool():
    """The pool's chunk slots hold POISON; reading them instead of k/v changes the output."""
    case = CASES["chunk3"]
    inputs, pool_full = make_inputs(case)
    wrong = dict(inputs, k=torch.zeros_like(inputs["k"]))
    out = paged_attention_chunk(*wrong.values(), geometry=case.geometry())
    assert not torch.allclose(out, reference(case, inputs, pool_full), atol=1e-3)


def test_duplicate_and_out_of_range_selection_ids_are_ignored():
    case = CASES["chunk3"]
    inputs, pool_full = make_inputs(case)
    sel = inputs["selection"]
    dup = torch.cat([sel[:, :, :1], sel, torch.full_like(sel[:, :, :1], case.max_blocks + 3)], dim=2)
    dup, _ = torch.sort(dup, dim=2)  # -1 first now: the kernel takes ids in any position
    out = paged_attention_chunk(*dict(inputs, selection=dup.contiguous()).values(), geometry=case.geometry())
    torch.testing.assert_close(out, reference(case, inputs, pool_full), **tolerances_for(torch.float32))


def test_select_all_blocks_aot_convention():
    bt = torch.randint(0, 50, (3, 7), dtype=torch.int32)
    kernel, signature, constexprs = select_all_blocks_kernel_args()
    out = torch.full((3, 2, 7), -5, dtype=torch.int32)
    grid = select_all_blocks_grid(3, 7, 2, int_cdiv)
    args = [bt, *select_all_blocks_extras(7), out]
    assert len(args) == len(signature)
    kernel[grid](*args, **constexprs)
    assert torch.equal(out, torch.arange(7, dtype=torch.int32).expand(3, 2, 7))
    assert torch.equal(select_all_blocks(bt, num_kv_heads=2), out)


def test_launcher_rejects_bad_inputs_with_named_arguments():
    case = CASES["chunk3"]
    inputs, _ = make_inputs(case)
    geom = case.geometry()
    with pytest.raises(ValueError, match="k must have size"):
        paged_attention_chunk(*dict(inputs, k=inputs["k"][:, :1].contiguous()).values(), geometry=geom)
    with pytest.raises(TypeError, match="block_table must have dtype"):
        paged_attention_chunk(*dict(inputs, block_table=inputs["block_table"].long()).values(), geometry=geom)
    with pytest.raises(ValueError, match=r"seq_lens\[0\]"):
        paged_attention_chunk(*dict(inputs, seq_lens=torch.tensor([1, 23], dtype=torch.int32)).values(),
                              geometry=geom)  # fmt: skip
    with pytest.raises(ValueError, match="contiguous"):
        paged_attention_chunk(*dict(inputs, q=inputs["q"].transpose(2, 3).contiguous().transpose(2, 3)).values(),
                              geometry=geom)  # fmt: skip
    with pytest.raises(ValueError, match="tactic must be one of"):
        paged_attention_chunk(*inputs.values(), geometry=geom, tactic=7)
    with pytest.raises(ValueError, match="num_splits"):
        paged_attention_chunk(*inputs.values(), geometry=geom, num_splits=0)


def test_geometry_validation_names_field():
    from ucm_trt.kernels.aot import PagedAttentionGeometry

    base = dict(num_q_heads=4, num_kv_heads=2, head_dim=64, block_size=16, scale=0.1)
    with pytest.raises(ValueError, match="num_q_heads"):
        PagedAttentionGeometry(**dict(base, num_q_heads=3))
    with pytest.raises(ValueError, match="head_dim"):
        PagedAttentionGeometry(**dict(base, head_dim=40))
    assert PagedAttentionGeometry(**dict(base, head_dim=96)).head_dim == 96
    with pytest.raises(ValueError, match="logn_training_length"):
        PagedAttentionGeometry(**base, rerope_window=4, logn_training_length=1)
    with pytest.raises(ValueError, match="scale"):
        PagedAttentionGeometry(**dict(base, scale=0.0))
