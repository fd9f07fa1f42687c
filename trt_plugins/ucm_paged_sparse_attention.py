"""Plugin ``ucm::UcmPagedSparseAttention`` (spec: ``ucm_trt.graph.schemas.PAGED_SPARSE_ATTENTION``).

JIT: ``ucm_trt.kernels.aot.paged_attention_chunk`` on TensorRT's stream (tactic 1 = decode
tiles, 2 = prefill tiles). AOT: the same Triton kernel compiled to PTX, one launch per plugin,
grid ``(B * Hkv, cdiv(T, BLOCK_T))``, extras ``(T, max_blocks, S)``.
"""

from __future__ import annotations

from trt_plugins import _attention
from trt_plugins.spec import plugin_spec

SPEC = plugin_spec("UcmPagedSparseAttention")
TACTICS = _attention.ATTENTION_TACTICS


def jit_run(tensors, values, out, tactic):
    _attention.jit_run(tensors, values, out, tactic, rerope=False)


def aot_launch(values, dtype, tactic, target):
    return _attention.aot_launch(values, dtype, tactic, target, rerope=False)


def check(values):
    _attention.geometry(values, rerope=False)
