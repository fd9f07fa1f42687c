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
    paged_attention_chunk,
    paged_attention_extras,
    paged_attention_grid,
    paged_attention_kernel_args,
    select_all_blocks,
    select_all_blocks_extras,
    select_all_blocks_grid,
    select_all_blocks_kernel_args,
    split_count,
    split_items,
    split_scratch_shapes,
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


def _split_launch_like_tensorrt(case, inputs, tactic, splits, counters=None, partials_len=None):
    """Split-K as ONE AOT kernel (the merge inside it): arguments = the op's inputs, the int32 counter
    input (zero), the int32 extras (ITEMS_PER_SPLIT too), the output, the fp32 partials output
    (poisoned); grid z = splits. Returns ``(out, counters)``."""
    geom = case.geometry()
    tile = tile_config(tactic, geom)
    dtype = inputs["q"].dtype
    names = ops.module(case.op_name).SPEC.inputs
    shapes = {n: tuple(inputs[n].shape) for n in names}
    b, _, t, _ = shapes["q"]
    kernel, signature, constexprs = paged_attention_kernel_args(geom, tile, dtype, split=True)
    cnt_shape, part_shape = split_scratch_shapes(b, t, geom, tile, splits)
    counters = torch.zeros(cnt_shape, dtype=torch.int32) if counters is None else counters
    if partials_len is not None:  # the plugin's declared length: at least what this launch writes
        assert partials_len >= part_shape[0]
        part_shape = (partials_len,)
    if counters.numel() < cnt_shape[0]:
        raise ValueError(f"counters has {counters.numel()} elements, the launch needs {cnt_shape[0]}")
    partials = torch.full(part_shape, float("nan"))
    extras = paged_attention_extras(shapes, geom, items_per_split=split_items(shapes["selection"][2], t,
                                                                              geom.block_size, splits))
    out = torch.full_like(inputs["q"], float("nan"))
    args = [inputs[n] for n in names] + [counters] + [int(e) for e in extras] + [out, partials]
    assert len(args) == len(signature)
    grid = paged_attention_grid(b, t, geom, tile, int_cdiv, splits)
    # by name: the constant strides are constexprs between the extras, so the call cannot be positional
    kernel[grid](**dict(zip(signature, args, strict=True)), **_interpreted(constexprs), num_warps=tile.num_warps,
                 num_stages=tile.num_stages)  # fmt: skip
    return out, counters


@pytest.mark.parametrize("tactic", [TACTIC_DECODE, TACTIC_PREFILL])
@pytest.mark.parametrize("name", sorted(CASES))
def test_attention_aot_convention_matches_reference(name, tactic):
    case = CASES[name]
    inputs, pool_full = make_inputs(case)
    out = _launch_like_tensorrt(case, inputs, tactic)
    torch.testing.assert_close(out, reference(case, inputs, pool_full), **tolerances_for(torch.float32))


@pytest.mark.parametrize("splits", [1, 2, 7])
@pytest.mark.parametrize("name", ["decode", "prefill", "rerope_logn_prefill", "d80", "one_block", "select_all"])
def test_split_k_in_one_aot_kernel_matches_reference(name, splits):
    """The AOT path's split-K: one kernel in TensorRT's calling convention, scratch as I/O; run twice
    on the same counters, which must be zero after each launch (7 splits exceed some rows' blocks)."""
    case = CASES[name]
    inputs, pool_full = make_inputs(case)
    tactic = TACTIC_DECODE if case.t <= 8 else TACTIC_PREFILL
    ref = reference(case, inputs, pool_full)
    counters = None
    for _ in range(2):
        out, counters = _split_launch_like_tensorrt(case, inputs, tactic, splits, counters)
        torch.testing.assert_close(out, ref, **tolerances_for(torch.float32))
        assert int(counters.abs().sum()) == 0


def test_one_counters_buffer_serves_consecutive_layers_at_the_plugin_s_lengths():
    """The rewritten graph feeds ONE zeroed ``attn_split_counters`` to every attention node. Three launches
    in a row -- a sparse layer, a ReRoPE layer of another geometry, the sparse layer again -- share one
    counters buffer of the builder's length (the most any of them needs), each with partials of exactly the
    length the plugin declares (``split_partials``) and the launch rule's split count; every output equals
    the reference and the counters are zero after every launch (so the next layer may use them)."""
    from trt_plugins._attention import counters_needed, scratch_bounds
    from trt_plugins.spec import plugin_spec
    from ucm_trt.kernels.attention import DEFAULT_LAUNCH

    sms = 3  # a small card, so that the rule splits these small cases (2-3 splits) and the interpreter stays quick
    layers = [CASES["decode"], CASES["rerope"], CASES["decode"]]
    n_cnt = max(counters_needed(c.batch, c.t, dict(c.attrs(), num_sms=sms), spec=plugin_spec(c.op_name + "SplitK"))
                for c in layers)  # fmt: skip
    counters = torch.zeros(n_cnt, dtype=torch.int32)
    for case in layers:
        inputs, pool_full = make_inputs(case)
        geom = case.geometry()
        splits = split_count(case.batch, case.t, geom, tile_config(TACTIC_DECODE, geom), sms=sms,
                             programs_per_sm=DEFAULT_LAUNCH.programs_per_sm)  # fmt: skip
        assert splits >= 2
        part_len = scratch_bounds(case.batch, case.t, geom, sms=sms, maximum=max)[1]
        out, counters = _split_launch_like_tensorrt(case, inputs, TACTIC_DECODE, splits, counters, partials_len=part_len)
        torch.testing.assert_close(out, reference(case, inputs, pool_full), **tolerances_for(torch.float32))
        assert counters.shape == (n_cnt,) and int(counters.abs().sum()) == 0


class _Expr:
    """A stand-in for a TensorRT shape expression: + - * // with an expression on the left only (TensorRT's
    ShapeExpr has no reflected operators), recording the arithmetic so it can be evaluated later."""

    def __init__(self, fn):
        self.fn = fn

    def _op(self, other, f):
        o = other.fn if isinstance(other, _Expr) else (lambda env, c=other: c)
        return _Expr(lambda env: f(self.fn(env), o(env)))

    def __add__(self, other):
        return self._op(other, lambda a, b: a + b)

    def __sub__(self, other):
        return self._op(other, lambda a, b: a - b)

    def __mul__(self, other):
        return self._op(other, lambda a, b: a * b)

    def __floordiv__(self, other):
        return self._op(other, lambda a, b: a // b)


def test_split_rule_is_a_shape_expression():
    """split_count / split_items / the grid / the extras build from TensorRT-like expressions of the batch,
    chunk length and selection width (no Python max or int on the left) and evaluate to the int rule."""
    from tests.trt._cases import Case

    geom = Case(hq=32, hkv=8, d=128, bs=64).geometry()
    tile = tile_config(TACTIC_DECODE, geom)
    B, T, S = (_Expr(lambda env, k=k: env[k]) for k in "BTS")
    splits = split_count(B, T, geom, tile, sms=132, programs_per_sm=2)
    per = split_items(S, T, 64, splits)
    grid = paged_attention_grid(B, T, geom, tile, lambda a, b: (a + (b - 1)) // b, splits)
    for b, t, s in ((1, 1, 256), (8, 1, 256), (3, 40, 17), (64, 1, 1000)):
        env = {"B": b, "T": t, "S": s}
        n = splits.fn(env)
        assert n == split_count(b, t, geom, tile, sms=132, programs_per_sm=2) == max(1, -(-264 // (b * 8 * -(-t // tile.block_t))))
        assert per.fn(env) == -(-(s + -(-t // 64)) // n)
        assert grid[0].fn(env) == b * 8 and grid[2].fn(env) == n


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


def test_split_scratch_lengths_as_shape_expressions():
    """The lengths TensorRT infers for the split variants (``split_scratch_exprs``, ``scratch_bounds``) build
    from TensorRT-like expressions of B and T (expression on the left only, ``maximum`` a function) and
    evaluate to the kernel's own sizes (``split_scratch_shapes``) for every tile, and to the most of them
    over the candidate tiles."""
    from tests.trt._cases import Case
    from trt_plugins._attention import _size_tiles, scratch_bounds
    from ucm_trt.kernels.aot import split_scratch_exprs

    geom = Case(hq=32, hkv=8, d=96, bs=16).geometry()
    B, T = (_Expr(lambda env, k=k: env[k]) for k in "BT")
    smax = lambda a, b: _Expr(lambda env: max(a.fn(env), b.fn(env)))  # noqa: E731
    cnt_e, part_e = scratch_bounds(B, T, geom, sms=132, maximum=smax, programs_per_sm=2)
    tiles = _size_tiles(geom)
    assert len(tiles) >= 3  # both tactics' tiles and their smaller fallbacks
    for b, t in ((1, 1), (8, 1), (3, 40), (2, 700)):
        env = {"B": b, "T": t}
        want_cnt = want_part = 0
        for tile in tiles:
            splits = split_count(b, t, geom, tile, sms=132, programs_per_sm=2)
            (c,), (p,) = split_scratch_shapes(b, t, geom, tile, splits)
            ce, pe = split_scratch_exprs(B, T, geom, tile, split_count(B, T, geom, tile, sms=132, programs_per_sm=2))
            assert (ce.fn(env), pe.fn(env)) == (c, p) == split_scratch_exprs(b, t, geom, tile, splits)
            want_cnt, want_part = max(want_cnt, c), max(want_part, p)
        assert (cnt_e.fn(env), part_e.fn(env)) == (want_cnt, want_part)
