"""Rule: decomposed scaled-dot-product attention as torch.onnx exporters emit it (opset <= 22).

Pattern (shared/reference/models.md §4), anchored at Softmax:

    scores = MatMul(Q * s_q, Kt * s_k) [* s]             Q [B, Hq, T, D] post-RoPE
    Kt     = Transpose(K, perm=[0,1,3,2])                 legacy exporter / eager
           | Reshape(Transpose(Reshape(K), perm=[0,2,1]))  dynamo (flattened 3-D transpose)
    K      = repeat_kv(Concat(past_key, k_new, axis=2))   repeat_kv = Reshape(Expand(Unsqueeze(x, 2)))
    P      = Softmax(Add(scores, mask), axis=-1)          mask: the exporter's causal/padding mask
    P'     = Where(IsNaN(P), 0, P) | P                    NaN guard (SDPA export) or none (eager;
                                                          Cast / Identity / Dropout are skipped)
    out    = MatMul(P', repeat_kv(Concat(past_value, v_new, axis=2)))

The mask is not interpreted here: the UCM node applies causal + block visibility itself, so the
graph must be plain causal self-attention (padding masks are replaced by ``seq_lens``). The driver
runs the subgraph computing the mask to check that it is causal (``graph.mask_probe``): sliding
windows and other restrictions are refused, not rewritten.
"""

from __future__ import annotations

import onnx_ir as ir

from ucm_trt.graph.rules.base import (
    AttentionMatch,
    Failure,
    Rule,
    attr,
    kv_cache_concat,
    peel_repeat_kv,
    peel_scale,
    producer,
    static_dim,
)
from ucm_trt.graph.rules.rope import capture_rope


def _untranspose_key(kt: ir.Value) -> ir.Value | None:
    t = producer(kt, "Transpose")
    if t is not None and list(attr(t, "perm", [])) == [0, 1, 3, 2]:
        return t.inputs[0]
    r = producer(kt, "Reshape")
    t = producer(r.inputs[0], "Transpose") if r is not None else None
    r2 = producer(t.inputs[0], "Reshape") if t is not None else None
    if r2 is not None and list(attr(t, "perm", [])) == [0, 2, 1]:
        return r2.inputs[0]
    return None


_PASS_THROUGH = ("Cast", "Identity", "Dropout")  # eager: softmax(dtype=fp32).to(dtype), dropout (eval)


def _pv_matmul(sm: ir.Node) -> ir.Node | None:
    out = sm.outputs[0]
    while True:  # skip Cast / Identity / Dropout with a single consumer
        uses = list(out.uses())
        if len(uses) != 1 or uses[0][0].op_type not in _PASS_THROUGH or uses[0][1] != 0:
            break
        out = uses[0][0].outputs[0]
    for user, idx in out.uses():
        if user.op_type == "MatMul" and idx == 0:
            return user
        if user.op_type == "Where" and idx == 2:
            cond = producer(user.inputs[0], "IsNaN")
            if cond is not None and cond.inputs[0] is out:
                for u2, i2 in user.outputs[0].uses():
                    if u2.op_type == "MatMul" and i2 == 0:
                        return u2
    return None


class DecomposedAttentionRule(Rule):
    name = "decomposed_sdpa"
    anchors = (("", "Softmax"),)
    description = "MatMul -> scale -> mask Add -> Softmax -> (IsNaN guard) -> MatMul, KV cache Concat, repeat_kv"

    def match(self, node: ir.Node) -> AttentionMatch | Failure:
        pv = _pv_matmul(node)
        x = node.inputs[0]
        add = producer(x, "Add")
        qk = None
        mask_found = False
        mask = None
        if add is not None:
            for i in (0, 1):
                inner, _ = peel_scale(add.inputs[i])
                if producer(inner, "MatMul") is not None:
                    qk, mask_found, mask = add.inputs[i], True, add.inputs[1 - i]
                    break
        else:
            inner, _ = peel_scale(x)
            if producer(inner, "MatMul") is not None:
                qk = x
        if qk is None or pv is None:
            what = "its input is not a (masked, scaled) MatMul" if qk is None else "its output does not feed a MatMul"
            return Failure(f"Softmax is not attention: {what}", attention_like=False)
        rank = len(x.shape) if x.shape is not None else None
        axis = attr(node, "axis", -1)
        if axis not in (-1, (rank - 1) if rank else -1):
            return Failure(f"Softmax over axis {axis} (rank {rank}) is not over the key axis")
        if not mask_found:
            return Failure("attention scores have no additive mask: not causal self-attention")
        inner, s_out = peel_scale(qk)
        mm = producer(inner, "MatMul")
        q, s_q = peel_scale(mm.inputs[0])
        kt, s_k = peel_scale(mm.inputs[1])
        k_rep = _untranspose_key(kt)
        if k_rep is None:
            return Failure("second operand of the QK MatMul is not a transposed key (Transpose 0,1,3,2 or its 3-D form)")
        k_cat = peel_repeat_kv(k_rep)
        v_cat = peel_repeat_kv(pv.inputs[1])
        kk = kv_cache_concat(k_cat, "key")
        if isinstance(kk, Failure):
            return kk
        vv = kv_cache_concat(v_cat, "value")
        if isinstance(vv, Failure):
            return vv
        past_k, k_new = kk
        past_v, v_new = vv
        hkv, d = static_dim(past_k, 1), static_dim(past_k, 3)
        hq = static_dim(q, 1) or static_dim(pv.outputs[0], 1) or static_dim(x, 1)
        if hkv is None or d is None or hq is None:
            return Failure(
                f"head counts / head_dim must be static (Hq={hq}, Hkv={hkv}, D={d} from {q.name!r}, {past_k.name!r})"
            )
        if hq % hkv:
            return Failure(f"query heads {hq} are not a multiple of KV heads {hkv}")
        if q.shape is not None and len(q.shape) != 4:
            return Failure(f"query {q.name!r} is not 4-D [B, H, T, D]")
        m = AttentionMatch(
            rule=self.name, anchor=node, output=pv.outputs[0], q=q, k_new=k_new, v_new=v_new,
            past_key=past_k, past_value=past_v, present_key=k_cat, present_value=v_cat,
            num_q_heads=hq, num_kv_heads=hkv, head_dim=d, scale=s_out * s_q * s_k,
        )  # fmt: skip
        m.extra["mask"] = mask  # the driver checks it is plain causal (graph.mask_probe)
        capture_rope(m)
        return m
