"""Rule: ONNX opset-23 ``Attention`` (+ ``RotaryEmbedding``), as torch.onnx dynamo exports it.

Two KV-cache forms:

* external cache (torch.onnx dynamo, opset 23): ``Attention(Q, repeat_kv(Concat(past_k, k_new)),
  repeat_kv(Concat(past_v, v_new)), mask)``, no ``past_key`` input; ``is_causal=0`` with a mask.
* internal cache: ``Attention(Q, k_new, v_new, mask?, past_key, past_value) -> (Y, present_key,
  present_value)`` with native GQA (K/V have Hkv heads), past_* graph inputs and present_*
  graph outputs.

Only 4-D ``[B, H, S, D]`` inputs; ``softcap`` must be 0 and output 3 (``qk_matmul_output``) unused.
"""

from __future__ import annotations

import onnx_ir as ir

from ucm_trt.graph.rules.base import (
    AttentionMatch,
    Failure,
    Rule,
    attr,
    default_scale,
    kv_cache_concat,
    peel_repeat_kv,
    static_dim,
)
from ucm_trt.graph.rules.rope import capture_rope


def _input(node: ir.Node, i: int) -> ir.Value | None:
    return node.inputs[i] if len(node.inputs) > i else None


def _output_used(node: ir.Node, i: int) -> bool:
    return len(node.outputs) > i and (bool(node.outputs[i].uses()) or node.outputs[i].is_graph_output())


class OnnxAttentionRule(Rule):
    name = "onnx_attention"
    anchors = (("", "Attention"),)
    description = "ai.onnx Attention (opset 23), external Concat cache or internal past_key/past_value"

    def match(self, node: ir.Node) -> AttentionMatch | Failure:
        q, k, v = node.inputs[0], node.inputs[1], node.inputs[2]
        for name, val in (("Q", q), ("K", k), ("V", v)):
            if val is None or val.shape is None or len(val.shape) != 4:
                return Failure(f"Attention {name} is not 4-D [B, H, S, D] (3-D inputs unsupported)")
        if attr(node, "softcap", 0.0) not in (0, 0.0):
            return Failure(f"Attention softcap={attr(node, 'softcap')} is not supported")
        if _output_used(node, 3):
            return Failure("Attention qk_matmul_output (output 3) is used")
        mask = _input(node, 3)
        causal = attr(node, "is_causal", 0)
        if mask is None and not causal:
            return Failure("Attention has no mask and is_causal=0: not causal self-attention")
        past_k, past_v = _input(node, 4), _input(node, 5)
        if past_k is not None or past_v is not None:
            if past_k is None or past_v is None or not past_k.is_graph_input() or not past_v.is_graph_input():
                return Failure("Attention past_key/past_value must both be graph inputs")
            if not (_output_used(node, 1) and node.outputs[1].is_graph_output()
                    and _output_used(node, 2) and node.outputs[2].is_graph_output()):  # fmt: skip
                return Failure("Attention present_key/present_value must both be graph outputs")
            if node.outputs[1].uses() or node.outputs[2].uses():
                return Failure("Attention present_key/present_value are consumed inside the graph")
            k_new, v_new, present_k, present_v = k, v, node.outputs[1], node.outputs[2]
        else:
            kk = kv_cache_concat(peel_repeat_kv(k), "key")
            if isinstance(kk, Failure):
                return kk
            vv = kv_cache_concat(peel_repeat_kv(v), "value")
            if isinstance(vv, Failure):
                return vv
            (past_k, k_new), (past_v, v_new) = kk, vv
            present_k, present_v = peel_repeat_kv(k), peel_repeat_kv(v)
        hq, hkv, d = static_dim(q, 1), static_dim(past_k, 1), static_dim(past_k, 3)
        if hq is None or hkv is None or d is None:
            return Failure(f"head counts / head_dim must be static (Hq={hq}, Hkv={hkv}, D={d})")
        if hq % hkv:
            return Failure(f"query heads {hq} are not a multiple of KV heads {hkv}")
        scale = attr(node, "scale", None)
        m = AttentionMatch(
            rule=self.name, anchor=node, output=node.outputs[0], q=q, k_new=k_new, v_new=v_new,
            past_key=past_k, past_value=past_v, present_key=present_k, present_value=present_v,
            num_q_heads=hq, num_kv_heads=hkv, head_dim=d,
            scale=float(scale) if scale is not None else default_scale(d),
        )  # fmt: skip
        capture_rope(m)
        if mask is not None:  # the driver checks it (graph.mask_probe); with is_causal=1 the op adds causality
            m.extra["mask"], m.extra["mask_causal_applied"] = mask, bool(causal)
        return m
