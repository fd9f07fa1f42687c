"""GPU tier: the AOT artifacts themselves, launched through the CUDA driver as TensorRT would.

For each op: take exactly what ``aot_impl`` hands TensorRT (kernel name, PTX with the scratch
parameters stripped and the ISA capped to the driver, launch rule, int32 extras), load the PTX
with ``cuModuleLoadData``, and ``cuLaunchKernel`` it with ``[input pointers] [int32 extras]
[output pointers]``, grid from the launch rule at the concrete shapes, block ``(num_warps*32,1,1)``
and the kernel's dynamic shared memory. Outputs are poisoned (NaN / -5) before the launch.
Also checks the JIT path (the same kernel through Triton's launcher) at a realistic size.

Needs a CUDA GPU and cuda-python (``cuda-bindings``).
"""

from __future__ import annotations

import pytest
import torch

from tests.trt._cases import CASES, Case, make_inputs, reference
from trt_plugins import ops
from trt_plugins.aot import aot_launch, int_cdiv
from trt_plugins.cuda_launch import PtxModule
from trt_plugins.ptx import entry_params
from ucm_trt.kernels.aot import TACTIC_DECODE, TACTIC_PREFILL, paged_attention_chunk
from ucm_trt.testing.tolerances import tolerances_for

pytestmark = pytest.mark.gpu


class _Loaded(PtxModule):
    def launch(self, *args):
        super().launch(*args)
        torch.cuda.synchronize()


def _run_aot(case: Case, inputs: dict, dtype: torch.dtype, tactic: int) -> torch.Tensor:
    spec = ops.module(case.op_name).SPEC
    launch = aot_launch(case.op_name, case.attrs(), dtype, tactic, ops.device_target())
    k = launch.kernel
    shapes = {n: tuple(inputs[n].shape) for n in spec.inputs}
    assert len(entry_params(k.ptx, k.name)) == len(spec.inputs) + len(launch.extras(shapes)) + len(spec.outputs)
    out = torch.full_like(inputs["q"], float("nan"))
    mod = _Loaded(k.name, k.ptx)
    mod.launch(launch.grid(shapes, int_cdiv), launch.block, k.shared_mem,
               [inputs[n].data_ptr() for n in spec.inputs], launch.extras(shapes), [out.data_ptr()])  # fmt: skip
    return out


# (case, dtype, tactics): every case in fp16 and bf16 with its natural tactic, both tactics on a few,
# fp32 on a few (IEEE dots). Kept small enough to compile and run in about two minutes.
_NATURAL = {"decode": 1, "chunk3": 1, "prefill": 2, "one_block": 1, "select_all": 1, "gqa8_d64": 1,
            "mha_d128": 1, "rerope": 1, "rerope_logn_prefill": 2, "d96_gqa4": 1, "d80": 1,
            "rerope_d80": 1, "bs64": 1}  # fmt: skip
_GPU = ([(n, dt, (t,)) for n, t in _NATURAL.items() for dt in (torch.float16, torch.bfloat16)]
        + [("prefill", torch.float16, (TACTIC_DECODE,)), ("rerope", torch.bfloat16, (TACTIC_PREFILL,))]
        + [(n, torch.float32, (t,)) for n, t in (("chunk3", 1), ("rerope_logn_prefill", 2))])  # fmt: skip


@pytest.mark.parametrize("name,dtype,tactics", _GPU, ids=[f"{n}-{str(d)[6:]}-t{t[0]}" for n, d, t in _GPU])
def test_aot_ptx_launched_like_tensorrt(name, dtype, tactics):
    case = CASES[name]
    inputs, pool_full = make_inputs(case, dtype, "cuda")
    ref = reference(case, inputs, pool_full)
    for tactic in tactics:
        out = _run_aot(case, inputs, dtype, tactic)
        torch.testing.assert_close(out.float().cpu(), ref, **tolerances_for(dtype))


# Realistic: GQA 32q/8kv, d=128, block 64, 4K context, 1/4 of the blocks selected; decode and a 512-token chunk.
_BIG = {
    "big_decode": Case(batch=2, hq=32, hkv=8, d=128, bs=64, t=1, lens=(4096, 3001), max_blocks=64,
                       num_blocks=160, num_sel=16),
    "big_decode_bs16_d96": Case(batch=2, hq=32, hkv=8, d=96, bs=16, t=1, lens=(4096, 3001), max_blocks=256,
                                num_blocks=600, num_sel=40),
    "big_prefill_rerope": Case(batch=1, hq=32, hkv=8, d=128, bs=64, t=512, lens=(4000,), max_blocks=64,
                               num_blocks=80, num_sel=16, rerope_window=512, logn=2048),
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(_BIG))
def test_aot_and_jit_at_realistic_size(name):
    case = _BIG[name]
    dtype = torch.bfloat16
    inputs, pool_full = make_inputs(case, dtype, "cuda")
    ref = reference(case, inputs, pool_full)
    tactic = TACTIC_DECODE if case.t <= 8 else TACTIC_PREFILL
    out_aot = _run_aot(case, inputs, dtype, tactic)
    torch.testing.assert_close(out_aot.float().cpu(), ref, **tolerances_for(dtype))
    out_jit = paged_attention_chunk(*inputs.values(), geometry=case.geometry(), tactic=tactic)
    torch.testing.assert_close(out_jit.float().cpu(), ref, **tolerances_for(dtype))


def test_select_all_ptx_launched_like_tensorrt():
    bt = torch.randint(0, 100, (3, 300), dtype=torch.int32, device="cuda")
    launch = aot_launch("UcmSelectAllBlocks", {"num_kv_heads": 4}, torch.int32, 0, ops.device_target())
    out = torch.full((3, 4, 300), -5, dtype=torch.int32, device="cuda")
    mod = _Loaded(launch.kernel.name, launch.kernel.ptx)
    shapes = {"block_table": tuple(bt.shape)}
    mod.launch(launch.grid(shapes, int_cdiv), launch.block, launch.kernel.shared_mem, [bt.data_ptr()],
               launch.extras(shapes), [out.data_ptr()])  # fmt: skip
    assert torch.equal(out.cpu(), torch.arange(300, dtype=torch.int32).expand(3, 4, 300))


@pytest.mark.parametrize("name,splits", [("big_decode", None), ("big_decode", 8), ("big_decode_bs16_d96", None),
                                         ("big_prefill_rerope", 3)])
def test_aot_split_k_one_kernel_launched_like_tensorrt(name, splits):
    """Split-K on the AOT path: ONE PTX kernel (merge inside) through the driver in TensorRT's order, the
    counters an eighth input, the partials a second output; launched twice on the same counters, which
    stay zero.
    ``splits=None``: the launch rule's split count for this card."""
    from trt_plugins._attention import aot_split_launch
    from ucm_trt.kernels._common import num_sms

    case = _BIG[name]
    dtype = torch.bfloat16
    inputs, pool_full = make_inputs(case, dtype, "cuda")
    ref = reference(case, inputs, pool_full)
    spec = ops.module(case.op_name).SPEC
    tactic = TACTIC_DECODE if case.t <= 8 else TACTIC_PREFILL
    launch = aot_split_launch(case.attrs(), dtype, tactic, ops.device_target(), spec=spec,
                              sms=num_sms(torch.device("cuda")), splits=splits)  # fmt: skip
    shapes = {n: tuple(inputs[n].shape) for n in spec.inputs}
    cnt_shape, part_shape = launch.scratch(shapes)
    counters = torch.zeros(cnt_shape, dtype=torch.int32, device="cuda")
    partials = torch.full(part_shape, float("nan"), device="cuda")
    mod = _Loaded(launch.kernel.name, launch.kernel.ptx)
    for _ in range(2):
        out = torch.full_like(inputs["q"], float("nan"))
        mod.launch(launch.grid(shapes, int_cdiv), launch.block, launch.kernel.shared_mem,
                   [inputs[n].data_ptr() for n in spec.inputs] + [counters.data_ptr()], launch.extras(shapes),
                   [out.data_ptr(), partials.data_ptr()])  # fmt: skip
        torch.testing.assert_close(out.float().cpu(), ref, **tolerances_for(dtype))
        assert int(counters.abs().sum()) == 0


def test_split_variant_plugin_launch_shares_one_counters_buffer_across_layers():
    """What an engine of a rewritten graph runs, without TensorRT: the split variants' ``aot_impl`` artifacts
    (``aot_launch`` of ``UcmPagedSparseAttentionSplitK`` / ``UcmPagedReRoPEAttentionSplitK`` with ``num_sms`` =
    this card's count) launched through the CUDA driver in TensorRT's argument order, three layers in a row
    (sparse, ReRoPE, sparse) on ONE zeroed counters buffer of the builder's length, each with a NaN-poisoned
    partials buffer of exactly the length the plugin declares. Every output equals the reference, and the
    counters are zero after every launch: the next layer (and the next step) may reuse them unzeroed."""
    from trt_plugins._attention import counters_needed
    from trt_plugins.spec import output_shape, plugin_spec
    from ucm_trt.kernels._common import num_sms

    sms = num_sms(torch.device("cuda"))
    dtype = torch.bfloat16
    layers = [_BIG["big_decode"], _BIG["big_prefill_rerope"], _BIG["big_decode"]]
    specs = [plugin_spec(c.op_name + "SplitK") for c in layers]
    n_cnt = max(counters_needed(c.batch, c.t, dict(c.attrs(), num_sms=sms), spec=s) for c, s in zip(layers, specs, strict=True))
    counters = torch.zeros(n_cnt, dtype=torch.int32, device="cuda")
    for case, spec in zip(layers, specs, strict=True):
        attrs = dict(case.attrs(), num_sms=sms)
        inputs, pool_full = make_inputs(case, dtype, "cuda")
        ref = reference(case, inputs, pool_full)
        tactic = TACTIC_DECODE if case.t <= 8 else TACTIC_PREFILL
        launch = aot_launch(spec.name, attrs, dtype, tactic, ops.device_target())
        shapes = {n: tuple(inputs[n].shape) for n in spec.inputs[:7]}
        shapes["split_counters"] = (n_cnt,)
        (part_len,) = output_shape(spec, 1, [shapes[n] for n in spec.inputs], attrs)
        assert launch.grid(shapes, int_cdiv)[2] > 1 or case.t > 8  # decode at this size splits on any card
        partials = torch.full((part_len,), float("nan"), device="cuda")
        out = torch.full_like(inputs["q"], float("nan"))
        mod = _Loaded(launch.kernel.name, launch.kernel.ptx)
        mod.launch(launch.grid(shapes, int_cdiv), launch.block, launch.kernel.shared_mem,
                   [inputs[n].data_ptr() for n in spec.inputs[:7]] + [counters.data_ptr()], launch.extras(shapes),
                   [out.data_ptr(), partials.data_ptr()])  # fmt: skip
        torch.testing.assert_close(out.float().cpu(), ref, **tolerances_for(dtype))
        assert int(counters.abs().sum()) == 0
