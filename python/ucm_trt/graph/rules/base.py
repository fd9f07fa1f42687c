"""Shared pieces of the attention rewrite rules: match results, failures, graph walking helpers.

A rule is a small object with

* ``anchors``: the (domain, op_type) pairs it starts from (Softmax, Attention, GroupQueryAttention ...);
* ``match(node) -> AttentionMatch | Failure``: the pattern + check step; every failed
  precondition returns a ``Failure`` whose reason names what was expected and what was found;
* ``rewrite(tape, match, emit) -> ir.Value``: builds the layout adapters around the UCM node
  (created by ``emit``, owned by the driver) and returns the value that replaces the
  anchor's attention output.

Walking helpers peel the ops that exporters put between the interesting values (scale
multiplies, GQA ``repeat_kv``, single-input Concats) and say why when they cannot.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import onnx_ir as ir

__all__ = [
    "Failure",
    "AttentionMatch",
    "Rule",
    "producer",
    "const_array",
    "const_scalar",
    "peel_scale",
    "peel_repeat_kv",
    "kv_cache_concat",
    "static_dim",
    "attr",
]


@dataclass(frozen=True)
class Failure:
    """Why a candidate was not rewritten. ``attention_like`` False = not attention at all (ignored)."""

    reason: str
    attention_like: bool = True


@dataclass
class AttentionMatch:
    """Everything a rewrite needs, in the rule's native layout (see ``layout``)."""

    rule: str
    anchor: ir.Node
    output: ir.Value  # the attention output the UCM node replaces
    q: ir.Value  # post-RoPE query
    k_new: ir.Value  # post-RoPE key of the chunk
    v_new: ir.Value
    past_key: ir.Value  # graph inputs
    past_value: ir.Value
    present_key: ir.Value  # graph outputs
    present_value: ir.Value
    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    scale: float
    layout: Literal["bhtd", "bt(hd)"] = "bhtd"
    q_unrot: ir.Value | None = None  # for ReRoPE: the query/key before RoPE (same layout)
    k_unrot: ir.Value | None = None
    rope_theta: float | None = None
    rope_failure: str | None = None  # why q_unrot/k_unrot/theta could not be captured
    extra: dict = field(default_factory=dict)


class Rule:
    name: str = "rule"
    anchors: tuple[tuple[str, str], ...] = ()
    description: str = ""

    def match(self, node: ir.Node) -> AttentionMatch | Failure:  # pragma: no cover - interface
        raise NotImplementedError

    def rewrite(self, tape: ir.tape.Tape, m: AttentionMatch, emit: Callable) -> ir.Value:
        """Default for layout ``bhtd``: the UCM node's output replaces the anchor output as is."""
        return emit(m.q, m.k_new, m.v_new, m.q_unrot, m.k_unrot)


# ---------------------------------------------------------------------------------------------
# graph helpers


def producer(v: ir.Value | None, *op_types: str, domain: str = "") -> ir.Node | None:
    """The node producing ``v`` if its op_type is one of ``op_types`` (any if empty) in ``domain``."""
    if v is None:
        return None
    n = v.producer()
    if n is None:
        return None
    if op_types and (n.op_type not in op_types or n.domain not in (domain, "ai.onnx" if domain == "" else domain)):
        return None
    return n


def const_array(v: ir.Value | None) -> np.ndarray | None:
    """numpy value of a constant (initializer or Constant node output), else None."""
    if v is None:
        return None
    t = v.const_value
    if t is None:
        n = v.producer()
        if n is not None and n.op_type == "Constant" and n.domain == "":
            a = n.attributes.get("value")
            if a is not None:
                t = a.value
            else:
                for key in ("value_float", "value_int", "value_floats", "value_ints"):
                    if key in n.attributes:
                        return np.asarray(n.attributes[key].value)
    if t is None:
        return None
    try:
        return t.numpy()
    except Exception:  # external data not loaded, string tensors
        return None


def const_scalar(v: ir.Value | None) -> float | None:
    a = const_array(v)
    if a is None or a.size != 1 or a.dtype.kind not in "fiu":
        return None
    return float(a.reshape(()))


def attr(node: ir.Node, name: str, default=None):
    a = node.attributes.get(name)
    return default if a is None else a.value


def static_dim(v: ir.Value | None, axis: int) -> int | None:
    if v is None or v.shape is None:
        return None
    shape = v.shape
    if axis < 0:
        axis += len(shape)
    if not 0 <= axis < len(shape):
        return None
    d = shape[axis]
    return d if isinstance(d, int) else None


def peel_scale(v: ir.Value) -> tuple[ir.Value, float]:
    """Strip Mul/Div by constant scalars; returns (inner value, accumulated factor)."""
    factor = 1.0
    while True:
        n = producer(v, "Mul", "Div")
        if n is None:
            return v, factor
        a, b = n.inputs[0], n.inputs[1]
        ca, cb = const_scalar(a), const_scalar(b)
        if n.op_type == "Mul" and cb is not None:
            v, factor = a, factor * cb
        elif n.op_type == "Mul" and ca is not None:
            v, factor = b, factor * ca
        elif n.op_type == "Div" and cb is not None and cb != 0:
            v, factor = a, factor / cb
        else:
            return v, factor


def peel_repeat_kv(v: ir.Value) -> ir.Value:
    """HF ``repeat_kv`` as exported: Reshape(Expand(Unsqueeze(x, axis 2), ...), ...) -> x.

    Also accepts a missing repeat (Hq == Hkv). The head count check is done by the caller
    with static shapes.
    """
    r = producer(v, "Reshape")
    e = producer(r.inputs[0], "Expand") if r is not None else None
    u = producer(e.inputs[0], "Unsqueeze") if e is not None else None
    if u is None:
        return v
    axes = const_array(u.inputs[1]) if len(u.inputs) > 1 else np.asarray(attr(u, "axes", []))
    if axes is None or [int(x) for x in np.ravel(axes)] not in ([2], [-3]):
        return v
    return u.inputs[0]


def _skip_trivial(v: ir.Value) -> ir.Value:
    while True:
        n = producer(v, "Concat", "Identity")
        if n is None or (n.op_type == "Concat" and len(n.inputs) != 1):
            return v
        v = n.inputs[0]


def kv_cache_concat(cat_value: ir.Value, what: str) -> tuple[ir.Value, ir.Value] | Failure:
    """``present = Concat(past, new, axis=2)`` with ``past`` a graph input and ``present`` a graph output.

    Returns (past graph input, new value) or a Failure naming what is missing.
    """
    n = producer(cat_value, "Concat")
    if n is None:
        found = cat_value.producer().op_type if cat_value.producer() is not None else "a graph input"
        return Failure(f"{what} is not a past/present KV-cache Concat (found {found}); no KV cache I/O to page")
    if len(n.inputs) != 2 or attr(n, "axis") not in (2, -2):
        return Failure(f"{what} Concat must join (past, new) on axis 2; got {len(n.inputs)} inputs, axis={attr(n, 'axis')}")
    past, new = _skip_trivial(n.inputs[0]), n.inputs[1]
    if not past.is_graph_input():
        return Failure(f"{what} cache Concat's first input {past.name!r} is not a graph input (past KV)")
    if not cat_value.is_graph_output():
        return Failure(f"{what} cache Concat output {cat_value.name!r} is not a graph output (present KV)")
    return past, new


def default_scale(head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim)
