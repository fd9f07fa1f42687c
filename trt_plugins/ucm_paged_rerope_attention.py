"""Plugin ``ucm::UcmPagedReRoPEAttention`` (spec: ``ucm_trt.graph.schemas.PAGED_REROPE_ATTENTION``).

Same kernel as the sparse op with ``REROPE`` on: the pool and the chunk hold UN-rotated K; the
window / theta / log-n attributes become constexprs. Tactics and launch as the sparse op.
"""

from __future__ import annotations

from trt_plugins import _attention
from trt_plugins.spec import plugin_spec

SPEC = plugin_spec("UcmPagedReRoPEAttention")
TACTICS = _attention.ATTENTION_TACTICS


def jit_run(tensors, values, out, tactic):
    _attention.jit_run(tensors, values, out, tactic, rerope=True)


def aot_launch(values, dtype, tactic, target):
    return _attention.aot_launch(values, dtype, tactic, target, rerope=True)


def check(values):
    _attention.geometry(values, rerope=True)
