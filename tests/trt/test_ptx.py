"""CPU tier: Triton -> PTX for sm_80 / sm_90 with no GPU, and the PTX entry post-processing that
TensorRT's AOT launcher needs (parameters = inputs + int32 extras + outputs, nothing else)."""

from __future__ import annotations

import re

import pytest
import torch

from tests.trt._cases import CASES
from tests.trt._kernels import axpy_kernel
from trt_plugins.aot import MAX_AOT_SHARED_MEM, aot_launch, int_cdiv
from trt_plugins.ptx import (
    PtxTarget,
    _compile_in_child,
    _jit_function,
    compile_ptx,
    entry_params,
    ptx_isa_for_cuda,
    strip_scratch_params,
)
from trt_plugins.spec import plugin_spec
from ucm_trt.kernels.aot import TACTIC_PREFILL, paged_attention_kernel_args, tile_config
from ucm_trt.kernels.aot.attention_op import divisible_by_16

PTR = ".param .u64 .ptr .global .align 1"
I32 = ".param .u32"


_axpy = axpy_kernel
_AXPY_SIG = {"x_ptr": "*fp32", "y_ptr": "*fp32", "n": "i32", "out_ptr": "*fp32"}


@pytest.mark.parametrize("arch", [80, 90])
def test_raw_triton_entry_has_trailing_scratch_pointers(arch):
    """What the issue observed: Triton's own entry carries scratch pointers beyond the kernel's params.

    Compiled in a child process without TRITON_INTERPRET, as ``compile_ptx`` does: in this process the
    interpreter has replaced every ``@triton.jit`` function, and ``triton.compile`` only "worked" here
    when Triton's on-disk cache already held the kernel (issue 12).
    """
    fn = _jit_function(_axpy)
    raw = fn.fn
    request = {
        "module": raw.__module__,
        "qualname": raw.__qualname__,
        "signature": {**_AXPY_SIG, "BLOCK": "constexpr"},
        "constexprs": {"BLOCK": 128},
        "arch": arch,
        "options": {"ptx_version": 80, "enable_fp_fusion": True},
    }
    ck = _compile_in_child(request)
    params = entry_params(ck["ptx"], ck["name"])
    assert len(params) > len(_AXPY_SIG)
    assert all(".u64" in decl for decl, _ in params[len(_AXPY_SIG):])
    assert ck["global_scratch_size"] == 0


@pytest.mark.parametrize("arch,target_line", [(80, ".target sm_80"), (90, ".target sm_90a")])
def test_compile_ptx_strips_to_own_params_and_caps_isa(arch, target_line):
    k = compile_ptx(_axpy, signature=_AXPY_SIG, constexprs={"BLOCK": 128}, target=PtxTarget(arch=arch, ptx_version=80))
    assert k.param_types == (PTR, PTR, I32, PTR)
    assert target_line in k.ptx
    assert re.search(r"^\.version 8\.0$", k.ptx, flags=re.MULTILINE)
    assert k.block_x == 128 and k.name == "axpy_kernel"


# (case, dtype, tactic, arch): each op, each arch, fp16/bf16/fp32, both tactics somewhere.
_AOT = [
    ("decode", torch.float16, 1, 80),
    ("prefill", torch.bfloat16, TACTIC_PREFILL, 90),
    ("rerope_logn_prefill", torch.float16, TACTIC_PREFILL, 90),
    ("gqa8_d64", torch.float32, 1, 80),
    ("d96_gqa4", torch.bfloat16, 1, 90),
]


@pytest.mark.parametrize("name,dtype,tactic,arch", _AOT)
def test_attention_aot_entry_is_inputs_extras_outputs(name, dtype, tactic, arch):
    case = CASES[name]
    spec = plugin_spec(case.op_name)
    launch = aot_launch(case.op_name, case.attrs(), dtype, tactic, PtxTarget(arch=arch, ptx_version=80))
    k = launch.kernel
    params = entry_params(k.ptx, k.name)
    # schema inputs (7 pointers), int32 extras (sizes, dynamic strides), schema outputs (1 pointer)
    shapes = {"q": (2, case.hq, 37, case.d), "kv_pool": (50, 2, case.hkv, case.bs, case.d),
              "block_table": (2, 9), "selection": (2, case.hkv, 4)}  # fmt: skip
    extras = launch.extras(shapes)
    assert [d for d, _ in params] == [PTR] * len(spec.inputs) + [I32] * len(extras) + [PTR] * len(spec.outputs)
    d = case.d
    assert extras == (37, 9, 4, 50, 37 * case.hq * d, 37 * d, 37 * case.hkv * d, 37 * d, 9, 4 * case.hkv, 4,
                      37 * case.hq * d, 37 * d)  # fmt: skip
    gx, gy, gz = launch.grid(shapes, int_cdiv)
    tile = launch.config
    assert tile.block_m <= tile_config(launch.tactic, case.geometry()).block_m
    assert (gx, gy, gz) == (2 * case.hkv, -(-37 // tile.block_t), 1)
    assert k.shared_mem <= MAX_AOT_SHARED_MEM
    assert ("sm_90a" if arch == 90 else "sm_80") in k.ptx


@pytest.mark.parametrize("arch", [80, 90])
def test_select_all_aot_entry(arch):
    launch = aot_launch("UcmSelectAllBlocks", {"num_kv_heads": 3}, torch.int32, 0, PtxTarget(arch=arch, ptx_version=80))
    assert [d for d, _ in entry_params(launch.kernel.ptx, launch.kernel.name)] == [PTR, I32, PTR]
    assert launch.grid({"block_table": (4, 300)}, int_cdiv) == (12, 2, 1)
    assert launch.extras({"block_table": (4, 300)}) == (300,)


def test_prefill_rerope_d128_fits_shared_memory_by_fewer_stages():
    """D=128 ReRoPE prefill tiles need 64 KiB with 2 stages; the AOT path drops to 1 stage (< 48 KiB)."""
    from tests.trt._cases import Case

    case = Case(hq=16, hkv=4, d=128, bs=64, rerope_window=64, logn=4096, lens=(9, 9))
    launch = aot_launch(case.op_name, case.attrs(), torch.float16, TACTIC_PREFILL, PtxTarget(arch=90, ptx_version=80))
    assert launch.kernel.shared_mem <= MAX_AOT_SHARED_MEM


def test_decode_tile_at_the_issue_shape_is_the_runtime_tile():
    """GQA 32/8, head_dim 128, block 64, bf16 decode: the AOT path runs the runtime's own decode tile
    (64 keys, 4 warps, 2 stages: :func:`~ucm_trt.kernels.attention.plan_attention`'s), within 48 KiB,
    for the unsplit kernel and the split-K kernel alike. Until the kernel walked the pool and the chunk
    in separate passes the tile needed 100 KiB and the AOT rule fell back to 16-key tiles (0.63-0.87x
    the runtime's kernel on an H100)."""
    from tests.trt._cases import Case
    from trt_plugins._attention import aot_split_launch
    from ucm_trt.kernels.attention import AttentionLaunch, default_block_n, default_warps_stages

    case = Case(hq=32, hkv=8, d=128, bs=64, t=1, lens=(300, 70))
    target = PtxTarget(arch=90, ptx_version=80)
    block_n = AttentionLaunch().block_n or default_block_n(64, 128)
    _, warps, stages = default_warps_stages(dense=False, decode=True, head_dim=128, block_size=64)
    for launch in (aot_launch(case.op_name, case.attrs(), torch.bfloat16, 1, target),
                   aot_split_launch(case.attrs(), torch.bfloat16, 1, target, spec=plugin_spec(case.op_name), sms=132)):
        assert (launch.config.block_n, launch.config.num_warps, launch.config.num_stages) == (block_n, warps, stages)
        assert launch.kernel.shared_mem <= MAX_AOT_SHARED_MEM


@pytest.mark.parametrize("block_n,stages", [(16, 3), (64, 2), (32, 3)])
def test_chunk_kv_kernel_needs_no_more_shared_memory_than_the_pool_kernel(block_n, stages):
    """The kernel TensorRT runs (the chunk's K/V as inputs, ``CHUNK_KV``) buffers one K/V tile per
    pipeline stage, as the runtime's (keys in the pool) does: it walks the selection slots and the
    chunk in separate passes, one load per operand. With both loads in every tile (pool or chunk,
    masked) the pipeliner buffered both: 45 KiB instead of 21 at 16 keys x 3 stages, 100 KiB instead
    of 38 at 64 x 2 (sm_90, d128, bf16)."""
    from dataclasses import replace

    from tests.trt._cases import Case

    g = Case(hq=32, hkv=8, d=128, bs=64, t=1).geometry()
    tile = replace(tile_config(1, g), block_n=block_n, num_stages=stages)
    fn, sig, cx = paged_attention_kernel_args(g, tile, torch.bfloat16, split=True)
    smem = {}
    for chunk_kv in (False, True):
        k = compile_ptx(fn, signature=sig, constexprs=dict(cx, CHUNK_KV=chunk_kv),
                        target=PtxTarget(arch=90, ptx_version=80), num_warps=tile.num_warps, num_stages=stages,
                        divisible_by_16=divisible_by_16(sig))  # fmt: skip
        smem[chunk_kv] = k.shared_mem
    assert smem[True] <= smem[False], smem


_FAKE_PTX = """.version 8.0
.target sm_90a
.address_size 64
.visible .entry k(
\t.param .u64 .ptr .global .align 1 k_param_0,
\t.param .u32 k_param_1,
\t.param .u64 .ptr .global .align 1 k_param_2,
\t.param .u64 .ptr .global .align 1 k_param_3
)
{
\tld.param.b64 \t%rd1, [k_param_0];
\tld.param.b64 \t%rd3, [k_param_3];
\tret;
}
"""


def test_strip_refuses_nonzero_scratch_and_reads_of_dropped_params():
    with pytest.raises(ValueError, match="global_scratch_size = 64"):
        strip_scratch_params(_FAKE_PTX, "k", 2, global_scratch_size=64, profile_scratch_size=0)
    with pytest.raises(ValueError, match="profile_scratch_size = 8"):
        strip_scratch_params(_FAKE_PTX, "k", 2, global_scratch_size=0, profile_scratch_size=8)
    with pytest.raises(ValueError, match="reads trailing parameter k_param_3"):
        strip_scratch_params(_FAKE_PTX, "k", 2, global_scratch_size=0, profile_scratch_size=0)
    with pytest.raises(ValueError, match="not a scratch pointer"):
        strip_scratch_params(_FAKE_PTX, "k", 1, global_scratch_size=0, profile_scratch_size=0)
    with pytest.raises(ValueError, match="fewer than"):
        strip_scratch_params(_FAKE_PTX, "k", 5, global_scratch_size=0, profile_scratch_size=0)
    with pytest.raises(ValueError, match="no `.visible .entry other"):
        strip_scratch_params(_FAKE_PTX, "other", 1, global_scratch_size=0, profile_scratch_size=0)
    kept = strip_scratch_params(_FAKE_PTX, "k", 4, global_scratch_size=0, profile_scratch_size=0)
    assert kept == _FAKE_PTX


def test_compile_ptx_rejects_float_scalars_and_wrong_order():
    with pytest.raises(ValueError, match="int32 scalar"):
        compile_ptx(_axpy, signature={**_AXPY_SIG, "n": "fp32"}, constexprs={"BLOCK": 128}, target=PtxTarget(arch=80))
    with pytest.raises(ValueError, match="declaration order"):
        compile_ptx(_axpy, signature=dict(reversed(list(_AXPY_SIG.items()))), constexprs={"BLOCK": 128},
                    target=PtxTarget(arch=80))  # fmt: skip
    with pytest.raises(TypeError, match="triton.jit"):
        compile_ptx(lambda: None, signature={}, constexprs={}, target=PtxTarget(arch=80))


def test_ptx_isa_for_driver_versions():
    assert ptx_isa_for_cuda(11, 8) == 78
    assert ptx_isa_for_cuda(12, 4) == 84
    assert ptx_isa_for_cuda(12, 6) == 85
    assert ptx_isa_for_cuda(12, 8) == 87
    assert ptx_isa_for_cuda(13, 0) == 90
    with pytest.raises(ValueError, match="too old"):
        ptx_isa_for_cuda(10, 2)
    with pytest.raises(ValueError, match="below PTX 8.0"):
        PtxTarget(arch=90, ptx_version=78)
    with pytest.raises(ValueError, match="arch"):
        PtxTarget(arch=75)


def test_kernel_signature_has_no_float_scalars():
    """Every float of the op (scale, theta, log-n) is a constexpr: TensorRT passes int32 extras only."""
    case = CASES["rerope_logn_prefill"]
    _, signature, constexprs = paged_attention_kernel_args(case.geometry(), tile_config(1, case.geometry()), torch.float16)
    assert all(t.startswith("*") or t == "i32" for t in signature.values())
    assert isinstance(constexprs["QK_SCALE"], float) and isinstance(constexprs["INV_LOG_TRAIN"], float)


@pytest.mark.parametrize("name,tactic,arch", [("d96_gqa4", 1, 90), ("rerope_logn_prefill", TACTIC_PREFILL, 80)])
def test_split_k_kernel_compiles_as_one_launch_with_tensorrt_argument_order(name, tactic, arch):
    """Split-K on the AOT path is ONE kernel: the op's 7 inputs + the int32 counter input, 14 int32
    extras (ITEMS_PER_SPLIT among them), the output + the fp32 partials output; within 48 KiB of shared
    memory. The PTX holds the in-kernel merge's acquire-release ticket (an atom.add on the counters)."""
    from trt_plugins._attention import aot_split_launch
    from trt_plugins.spec import plugin_spec

    case = CASES[name]
    launch = aot_split_launch(case.attrs(), torch.bfloat16, tactic, PtxTarget(arch=arch, ptx_version=80),
                              spec=plugin_spec(case.op_name), sms=132)  # fmt: skip
    shapes = {"q": (2, case.hq, 1, case.d), "kv_pool": (50, 2, case.hkv, case.bs, case.d),
              "block_table": (2, 9), "selection": (2, case.hkv, 4)}  # fmt: skip
    extras = launch.extras(shapes)
    gx, gy, gz = launch.grid(shapes, int_cdiv)
    assert (gx, gy) == (2 * case.hkv, 1) and gz == -(-264 // (2 * case.hkv))  # min_splits at 2 programs per SM
    assert len(extras) == 14 and extras[4] == -(-(4 + 1) // gz)  # ITEMS_PER_SPLIT = ceil((S + 1 chunk block) / splits)
    k = launch.kernel
    assert [d for d, _ in entry_params(k.ptx, k.name)] == [PTR] * 8 + [I32] * 14 + [PTR] * 2
    assert k.shared_mem <= MAX_AOT_SHARED_MEM
    assert re.search(r"atom\.[a-z.]*acq_rel[a-z.]*\.add|atom\.[a-z.]*add[a-z.]*acq_rel", k.ptx)
    cnt, part = launch.scratch(shapes)
    tile = launch.config
    assert cnt == (2 * case.hkv,) and part == (2 * case.hkv * gz * tile.block_m * (1 + max(16, 1 << (case.d - 1).bit_length())),)
    fixed = aot_split_launch(case.attrs(), torch.bfloat16, tactic, PtxTarget(arch=arch, ptx_version=80),
                             spec=plugin_spec(case.op_name), sms=132, splits=3, tile=tile)  # fmt: skip
    assert fixed.grid(shapes, int_cdiv)[2] == 3 and fixed.kernel.ptx == k.ptx


@pytest.mark.parametrize("name,tactic", [("decode", 1), ("rerope_logn_prefill", TACTIC_PREFILL)])
def test_split_variant_plugin_compiles_the_split_kernel_for_the_rule_s_tile(name, tactic):
    """What the split variants' ``aot_impl`` hands TensorRT (``aot_launch`` of the ``...SplitK`` op, the call
    the QDP makes): the split kernel (8 input pointers: the op's 7 + the counters; 14 int32 extras; output +
    fp32 partials), compiled for the tile :func:`_fit_tile` picks, its grid's third axis the launch rule's
    split count for the node's ``num_sms``, and its scratch within the lengths the plugin declares to TensorRT
    (the ``split_partials`` output, the counters the builder sizes). The v1 op still gets the unsplit kernel."""
    from trt_plugins._attention import aot_split_launch, counters_needed, scratch_bounds
    from ucm_trt.kernels.aot import split_count
    from ucm_trt.kernels.attention import DEFAULT_LAUNCH

    case = CASES[name]
    split_op = case.op_name + "SplitK"
    attrs = dict(case.attrs(), num_sms=132)
    target = PtxTarget(arch=90, ptx_version=80)
    launch = aot_launch(split_op, attrs, torch.bfloat16, tactic, target)
    k = launch.kernel
    assert [d for d, _ in entry_params(k.ptx, k.name)] == [PTR] * 8 + [I32] * 14 + [PTR] * 2
    assert k.shared_mem <= MAX_AOT_SHARED_MEM
    rule = aot_split_launch(case.attrs(), torch.bfloat16, tactic, target, spec=plugin_spec(case.op_name), sms=132)
    assert launch.config == rule.config and k.ptx == rule.kernel.ptx  # the tile _fit_tile picks, same kernel
    spec = plugin_spec(split_op)
    geom = case.geometry()
    for b, t in ((1, 1), (2, 3), (8, 1), (3, 40)):
        shapes = {"q": (b, case.hq, t, case.d), "kv_pool": (50, 2, case.hkv, case.bs, case.d),
                  "block_table": (b, 9), "selection": (b, case.hkv, 4)}  # fmt: skip
        splits = split_count(b, t, geom, launch.config, sms=132, programs_per_sm=DEFAULT_LAUNCH.programs_per_sm)
        assert launch.grid(shapes, int_cdiv)[2] == splits >= 1
        (cnt,), (part,) = launch.scratch(shapes)
        max_cnt, max_part = scratch_bounds(b, t, geom, sms=132, maximum=max)
        assert cnt <= counters_needed(b, t, attrs, spec=spec) == max_cnt and part <= max_part
    unsplit = aot_launch(case.op_name, case.attrs(), torch.bfloat16, tactic, target).kernel
    assert [d for d, _ in entry_params(unsplit.ptx, unsplit.name)] == [PTR] * 7 + [I32] * 13 + [PTR]
    with pytest.raises(ValueError, match=r"num_sms is 0: the split count is planned"):
        aot_launch(split_op, dict(case.attrs(), num_sms=0), torch.bfloat16, tactic, target)


def _atoms(ptx: str, op: str) -> list[str]:
    """The PTX atomics of ``op`` (``max``, ``add``) with their qualifiers: ``atom`` (returns the old
    value) and ``red`` (does not; what an unused relaxed atomic becomes)."""
    return [m.group(0) for m in re.finditer(r"\b(atom|red)(\.[a-z0-9_]+)+", ptx) if f".{op}." in m.group(0) + "."]


def test_index_guard_flag_is_a_relaxed_atomic_max():
    """Every kernel raises the IndexGuard flag through ``raise_flag``: a relaxed atomic max. An
    acquire-release one (Triton's default) puts fences into every program that reaches the call
    (masked off or not); the flag is read only after the launch completes, so nothing needs them.
    Checked on the attention kernel (guard on; its split-K ticket keeps acq_rel) and on copy_blocks."""
    from ucm_trt.kernels.block_copy import _copy_blocks_kernel

    case = CASES["d96_gqa4"]
    fn, signature, constexprs = paged_attention_kernel_args(case.geometry(), tile_config(1, case.geometry()),
                                                            torch.bfloat16, split=True)  # fmt: skip
    del constexprs["guard_ptr"]
    constexprs["HAS_GUARD"] = True
    sig = {**signature, "guard_ptr": "*i32"}
    order = [n for n in _jit_function(fn).arg_names if n in sig]
    k = compile_ptx(fn, signature={n: sig[n] for n in order}, constexprs=constexprs,
                    target=PtxTarget(arch=90, ptx_version=80), num_warps=4, num_stages=2)  # fmt: skip
    maxes = _atoms(k.ptx, "max")
    assert len(maxes) >= 2 and all(".relaxed" in a for a in maxes), maxes  # seq_len; selection / block table
    assert any(".acq_rel" in a for a in _atoms(k.ptx, "add"))  # the split-K ticket is unchanged
    copy_sig = {"src_ptr": "*bf16", "dst_ptr": "*bf16", "src_ids_ptr": "*i64", "dst_ids_ptr": "*i64",
                "flag_ptr": "*i32", "block_elems": "i32", "n_src": "i32", "n_dst": "i32"}  # fmt: skip
    k = compile_ptx(_copy_blocks_kernel, signature=copy_sig, constexprs={"CHUNK": 1024, "GUARD": True},
                    target=PtxTarget(arch=90, ptx_version=80))  # fmt: skip
    maxes = _atoms(k.ptx, "max")
    assert len(maxes) == 2 and all(".relaxed" in a for a in maxes), maxes


_REGISTERS = r"""
import json, re, subprocess, sys, os
import torch, triton
from triton.backends.compiler import GPUTarget
from tests.trt._cases import Case
from trt_plugins.ptx import _jit_function
from ucm_trt.kernels.aot import paged_attention_kernel_args, tile_config
from ucm_trt.kernels.aot.attention_op import divisible_by_16
from ucm_trt.kernels.attention import blocks_per_tile
bs, d = int(sys.argv[1]), int(sys.argv[2])
g = Case(hq=32, hkv=8, d=d, bs=bs, t=1).geometry()
fn, sig, cx = paged_attention_kernel_args(g, tile_config(1, g), torch.bfloat16, split=True)
# the runtime's decode launch: keys already in the pool, 64-key tiles, 4 warps, 2 stages
cx.update(CHUNK_KV=False, BLOCK_N=64, BPT=blocks_per_tile(64, bs))
jf = _jit_function(fn)
tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
out = {}
for guard in (False, True):
    c, s = dict(cx), dict(sig)
    if guard:
        del c["guard_ptr"]
        c["HAS_GUARD"], s["guard_ptr"] = True, "*i32"
    full = {n: s.get(n, "constexpr") for n in jf.arg_names}
    attrs = {(jf.arg_names.index(n),): [["tt.divisibility", 16]] for n in divisible_by_16(s)}
    ck = triton.compile(triton.compiler.ASTSource(fn=jf, signature=full, constexprs=c, attrs=attrs),
                        target=GPUTarget("cuda", 90, 32), options={"num_warps": 4, "num_stages": 2})
    path = f"{sys.argv[3]}/k{int(guard)}.cubin"
    open(path, "wb").write(ck.asm["cubin"])
    usage = subprocess.run([tool, "-res-usage", path], capture_output=True, text=True, check=True).stdout
    out[str(guard)] = int(re.search(r"REG:(\d+)", usage).group(1))
print(json.dumps(out))
"""


@pytest.mark.parametrize("bs,d", [(64, 128), (16, 128), (64, 96)])
def test_index_guard_adds_no_registers_to_the_decode_kernel(bs, d, tmp_path):
    """The guarded attention kernel (``HAS_GUARD``) needs no more registers per thread than the unguarded
    one at the runtime's decode tile (sm_90 cubin, ``cuobjdump -res-usage``, the installed Triton's
    ptxas): the guard checks the ids again after the key loop instead of carrying flags through it.
    Carried per-lane flags took 96 -> 103 registers at d128 and 112 -> 156 at block 16 (Triton 3.9).
    Session 12 took that for the guard's ~11 % at 128K batch 8; session 13's H100 run (Triton 3.6, where
    the kernel takes 162 / 158 registers) showed the cost unchanged after it, so this guards the
    register budget, not that cost."""
    import json
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    proc = subprocess.run([sys.executable, "-c", _REGISTERS, str(bs), str(d), str(tmp_path)], env=env,
                          capture_output=True, text=True, check=False)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    regs = json.loads(proc.stdout.strip().splitlines()[-1])
    assert regs["True"] <= regs["False"], regs
