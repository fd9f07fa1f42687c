"""Rules: ONNX Runtime contrib attention ops, as ONNX Runtime GenAI-style builders emit them.

``com.microsoft.GroupQueryAttention``
    (query [B, S, Hq*D], key [B, S, Hkv*D], value, past_key [B, Hkv, P, D], past_value,
    seqlens_k, total_sequence_length, cos_cache?, sin_cache?) -> (output [B, S, Hq*D],
    present_key, present_value). Supported: separate Q/K/V (not packed), ``do_rotary`` 0 or 1
    with ``rotary_interleaved=0`` (fused rotary uses the true positions seq_lens - T + t, as
    GQA itself does), ``local_window_size=-1``, ``softcap=0``, ``smooth_softmax=0``, no
    attention_bias / position_ids / head_sink inputs.

``com.microsoft.MultiHeadAttention`` (+ ``com.microsoft.RotaryEmbedding`` on Q and K)
    (query [B, S, H*D], key [B, S, H*D], value, bias?, key_padding_mask?, attention_bias?,
    past_key [B, H, P, D], past_value) -> (output, present_key, present_value).
    Supported: ``unidirectional=1`` (causal), no bias / key_padding_mask / attention_bias.

The 3-D [B, S, H*D] tensors are reshaped to [B, H, S, D] around the UCM node.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx_ir as ir

from ucm_trt.graph.rules.base import (
    AttentionMatch,
    Failure,
    Rule,
    attr,
    default_scale,
    static_dim,
)
from ucm_trt.graph.rules.rope import capture_rope, rope_theta

MS = "com.microsoft"


def _in(node: ir.Node, i: int) -> ir.Value | None:
    return node.inputs[i] if len(node.inputs) > i else None


def _present_ok(node: ir.Node) -> str | None:
    if len(node.outputs) < 3:
        return "present_key/present_value outputs missing"
    for i, what in ((1, "present_key"), (2, "present_value")):
        o = node.outputs[i]
        if not o.is_graph_output():
            return f"{what} {o.name!r} is not a graph output"
        if o.uses():
            return f"{what} {o.name!r} is consumed inside the graph"
    return None


def _const(tape: ir.tape.Tape, values, dtype=np.int64) -> ir.Value:
    return tape.op("Constant", [], attributes={"value": ir.tensor(np.asarray(values, dtype=dtype))})


def to_bhtd(tape: ir.tape.Tape, x: ir.Value, heads: int, head_dim: int) -> ir.Value:
    r = tape.op("Reshape", [x, _const(tape, [0, 0, heads, head_dim])])
    return tape.op("Transpose", [r], attributes={"perm": [0, 2, 1, 3]})


def from_bhtd(tape: ir.tape.Tape, x: ir.Value) -> ir.Value:
    t = tape.op("Transpose", [x], attributes={"perm": [0, 2, 1, 3]})
    return tape.op("Reshape", [t, _const(tape, [0, 0, -1])])


def rope_from_cache(tape: ir.tape.Tape, x: ir.Value, cos_cache: ir.Value, sin_cache: ir.Value,
                    positions: ir.Value) -> ir.Value:  # fmt: skip
    """NeoX RoPE of x [B, H, T, D] with caches [max_pos, D/2] gathered at positions [B, T]."""

    def table(cache):
        g = tape.op("Gather", [cache, positions], attributes={"axis": 0})  # [B, T, D/2]
        g = tape.op("Unsqueeze", [g, _const(tape, [1])])
        g = tape.op("Concat", [g, g], attributes={"axis": -1})
        return tape.op("CastLike", [g, x])

    cos, sin = table(cos_cache), table(sin_cache)
    half = tape.op("Div", [tape.op("Shape", [x], attributes={"start": -1}), _const(tape, [2])])
    x1 = tape.op("Slice", [x, _const(tape, [0]), half, _const(tape, [-1])])
    x2 = tape.op("Slice", [x, half, _const(tape, [np.iinfo(np.int64).max]), _const(tape, [-1])])
    rot = tape.op("Concat", [tape.op("Neg", [x2]), x1], attributes={"axis": -1})
    return tape.op("Add", [tape.op("Mul", [x, cos]), tape.op("Mul", [rot, sin])])


def rope_from_theta(tape: ir.tape.Tape, x: ir.Value, theta: float, head_dim: int, positions: ir.Value) -> ir.Value:
    """NeoX RoPE of x [B, H, T, D] at int64 positions [B, T], inv_freq = theta^(-2j/D) (fp32 constant)."""
    inv = (theta ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)).astype(np.float32)
    pos = tape.op("Unsqueeze", [tape.op("Cast", [positions], attributes={"to": ir.DataType.FLOAT}), _const(tape, [1, 3])])
    ang = tape.op("Mul", [pos, tape.op("Constant", [], attributes={"value": ir.tensor(inv)})])  # [B, 1, T, D/2]
    ang = tape.op("Concat", [ang, ang], attributes={"axis": -1})
    cos = tape.op("CastLike", [tape.op("Cos", [ang]), x])
    sin = tape.op("CastLike", [tape.op("Sin", [ang]), x])
    half = head_dim // 2
    x1 = tape.op("Slice", [x, _const(tape, [0]), _const(tape, [half]), _const(tape, [-1])])
    x2 = tape.op("Slice", [x, _const(tape, [half]), _const(tape, [head_dim]), _const(tape, [-1])])
    rot = tape.op("Concat", [tape.op("Neg", [x2]), x1], attributes={"axis": -1})
    return tape.op("Add", [tape.op("Mul", [x, cos]), tape.op("Mul", [rot, sin])])


class GroupQueryAttentionRule(Rule):
    name = "ms_group_query_attention"
    anchors = ((MS, "GroupQueryAttention"),)
    description = "com.microsoft.GroupQueryAttention (separate or packed Q/K/V, optional fused rotary)"

    def match(self, node: ir.Node) -> AttentionMatch | Failure:
        q, k, v = _in(node, 0), _in(node, 1), _in(node, 2)
        if (k is None) != (v is None):
            return Failure("GroupQueryAttention needs both key and value, or neither (packed QKV)")
        packed = k is None
        if _in(node, 11) is not None:
            return Failure("GroupQueryAttention input head_sink is not supported")
        for a, ok in (("local_window_size", -1), ("softcap", 0.0), ("smooth_softmax", 0), ("rotary_interleaved", 0)):
            if attr(node, a, ok) not in (ok, float(ok)):
                return Failure(f"GroupQueryAttention {a}={attr(node, a)} is not supported (must be {ok})")
        past_k, past_v = _in(node, 3), _in(node, 4)
        if past_k is None or past_v is None or not past_k.is_graph_input() or not past_v.is_graph_input():
            return Failure("GroupQueryAttention past_key/past_value must be graph inputs")
        bad = _present_ok(node)
        if bad:
            return Failure(f"GroupQueryAttention {bad}")
        hq, hkv = attr(node, "num_heads"), attr(node, "kv_num_heads")
        if not hq or not hkv:
            return Failure("GroupQueryAttention num_heads/kv_num_heads attributes are required")
        if hq % hkv:
            return Failure(f"num_heads {hq} is not a multiple of kv_num_heads {hkv}")
        do_rotary = attr(node, "do_rotary", 0)
        cos, sin = _in(node, 7), _in(node, 8)
        width = static_dim(q, -1)
        d = static_dim(past_k, 3)
        if d is None and do_rotary and static_dim(cos, 1):
            d = 2 * static_dim(cos, 1)
        if d is None and width is not None:
            d = width // (hq + 2 * hkv) if packed else width // hq
        if d is None:
            return Failure("GroupQueryAttention head_dim is not static (past_key axis 3, cos_cache, query width)")
        if packed and width is not None and width != (hq + 2 * hkv) * d:
            return Failure(f"packed QKV width {width} != (num_heads + 2 * kv_num_heads) * head_dim = {(hq + 2 * hkv) * d}")
        notes = []
        if packed:
            notes.append("packed QKV split")
        if _in(node, 10) is not None:
            notes.append("attention_bias checked to hide nothing beyond causality (not passed to the UCM op)")
        if _in(node, 9) is not None:
            notes.append("rotary at the true positions seq_lens - T + t (GQA position_ids not read)")
        scale = attr(node, "scale", 0.0) or default_scale(d)
        m = AttentionMatch(
            rule=self.name, anchor=node, output=node.outputs[0], q=q, k_new=q if packed else k,
            v_new=q if packed else v, past_key=past_k, past_value=past_v, present_key=node.outputs[1],
            present_value=node.outputs[2], num_q_heads=hq, num_kv_heads=hkv, head_dim=d, scale=float(scale),
            layout="bt(hd)", extra={"packed": packed, "notes": notes},
        )  # fmt: skip
        if _in(node, 10) is not None:  # GQA is causal itself; the driver checks the bias hides nothing more
            m.extra["mask"], m.extra["mask_causal_applied"] = _in(node, 10), True
        if do_rotary:
            if cos is None or sin is None:
                return Failure("GroupQueryAttention do_rotary=1 without cos_cache/sin_cache")
            if static_dim(cos, 1) not in (None, d // 2):
                return Failure(f"GroupQueryAttention rotary dim {2 * static_dim(cos, 1)} != head_dim {d} (partial rotary)")
            m.extra.update(cos=cos, sin=sin)
            m.q_unrot, m.k_unrot = m.q, m.k_new
            theta = rope_theta(cos, d)
            if isinstance(theta, Failure):
                m.rope_failure = theta.reason
            else:
                m.rope_theta = theta
        elif packed:
            m.rope_failure = "packed QKV without fused rotary: no RoPE to capture"
        else:
            capture_rope(m)
        return m

    def rewrite(self, tape: ir.tape.Tape, m: AttentionMatch, emit: Callable) -> ir.Value:
        return _rewrite_3d(tape, m, emit)


def _rewrite_3d(tape: ir.tape.Tape, m: AttentionMatch, emit: Callable) -> ir.Value:
    q3, k3, v3 = m.q, m.k_new, m.v_new
    if m.extra.get("packed"):
        hq, hkv = m.num_q_heads * m.head_dim, m.num_kv_heads * m.head_dim
        axis = _const(tape, [-1])
        q3 = tape.op("Slice", [m.q, _const(tape, [0]), _const(tape, [hq]), axis])
        k3 = tape.op("Slice", [m.q, _const(tape, [hq]), _const(tape, [hq + hkv]), axis])
        v3 = tape.op("Slice", [m.q, _const(tape, [hq + hkv]), _const(tape, [hq + 2 * hkv]), axis])
    q4 = to_bhtd(tape, q3, m.num_q_heads, m.head_dim)
    k4 = to_bhtd(tape, k3, m.num_kv_heads, m.head_dim)
    v4 = to_bhtd(tape, v3, m.num_kv_heads, m.head_dim)
    qu = ku = None
    if m.q_unrot is not None:
        qu = q4 if m.q_unrot is m.q else to_bhtd(tape, m.q_unrot, m.num_q_heads, m.head_dim)
        ku = k4 if m.k_unrot is m.k_new else to_bhtd(tape, m.k_unrot, m.num_kv_heads, m.head_dim)
    if "cos" in m.extra:  # fused rotary: rotate here at the true positions (sparse path)
        pos = emit.positions(q4)
        if m.rope_theta is not None:  # default RoPE: computed from theta, the graph's caches become dead
            q4 = rope_from_theta(tape, q4, m.rope_theta, m.head_dim, pos)
            k4 = rope_from_theta(tape, k4, m.rope_theta, m.head_dim, pos)
        else:
            q4 = rope_from_cache(tape, q4, m.extra["cos"], m.extra["sin"], pos)
            k4 = rope_from_cache(tape, k4, m.extra["cos"], m.extra["sin"], pos)
    out = emit(q4, k4, v4, qu, ku)
    return from_bhtd(tape, out)


class MultiHeadAttentionRule(Rule):
    name = "ms_multi_head_attention"
    anchors = ((MS, "MultiHeadAttention"),)
    description = "com.microsoft.MultiHeadAttention (unidirectional, past/present KV), RoPE via com.microsoft.RotaryEmbedding"

    def match(self, node: ir.Node) -> AttentionMatch | Failure:
        q, k, v = _in(node, 0), _in(node, 1), _in(node, 2)
        if k is None or v is None:
            return Failure("MultiHeadAttention with packed QKV is not supported")
        if k.shape is not None and len(k.shape) != 3:
            return Failure("MultiHeadAttention key is not 3-D [B, S, H*D] (cross-attention cache form)")
        for i, what in ((3, "bias"), (4, "key_padding_mask"), (5, "attention_bias")):
            if _in(node, i) is not None:
                return Failure(f"MultiHeadAttention input {what} is not supported")
        if len(node.inputs) > 8 and any(x is not None for x in node.inputs[8:]):
            return Failure("MultiHeadAttention inputs beyond past_value (beam search / cache indirection) unsupported")
        if attr(node, "unidirectional", 0) != 1:
            return Failure("MultiHeadAttention unidirectional=0: not causal self-attention")
        past_k, past_v = _in(node, 6), _in(node, 7)
        if past_k is None or past_v is None or not past_k.is_graph_input() or not past_v.is_graph_input():
            return Failure("MultiHeadAttention past_key/past_value must be graph inputs")
        bad = _present_ok(node)
        if bad:
            return Failure(f"MultiHeadAttention {bad}")
        h = attr(node, "num_heads")
        d = static_dim(past_k, 3)
        if not h or d is None:
            return Failure(f"num_heads attribute and a static head_dim are required (D={d})")
        m = AttentionMatch(
            rule=self.name, anchor=node, output=node.outputs[0], q=q, k_new=k, v_new=v,
            past_key=past_k, past_value=past_v, present_key=node.outputs[1], present_value=node.outputs[2],
            num_q_heads=h, num_kv_heads=h, head_dim=d, scale=float(attr(node, "scale", 0.0) or default_scale(d)),
            layout="bt(hd)",
        )  # fmt: skip
        capture_rope(m)
        return m

    def rewrite(self, tape: ir.tape.Tape, m: AttentionMatch, emit: Callable) -> ir.Value:
        return _rewrite_3d(tape, m, emit)
