"""Capture the un-rotated q/k and the RoPE theta for the ReRoPE rewrite.

Recognised RoPE forms (NeoX / ``rotate_half`` layout only; interleaved RoPE is reported):

* decomposed:  ``Add(Mul(x, cos), Mul(Concat(Neg(Slice(x)), Slice(x)), sin))`` (operands in any order),
  as HF ``apply_rotary_pos_emb`` is exported by both torch.onnx exporters;
* ONNX ``RotaryEmbedding`` (opset 23) with 4-D ``[B, H, S, D]`` input, ``interleaved=0``, full rotary dim;
* ``com.microsoft.RotaryEmbedding`` with ``interleaved=0`` and full rotary dim.

theta is recovered from the graph's constants upstream of ``cos``: an ``inv_freq`` vector
(D/2 values) or a cos cache ``[max_pos, D/2]`` (or ``[max_pos, D]``); it must be exactly the
default RoPE ``theta ** (-2j/D)`` (scaled RoPE variants are reported, not guessed).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from ucm_trt.graph.rules.base import AttentionMatch, Failure, attr, const_array, producer

__all__ = ["unrotate", "rope_theta"]


def _slice_source(v: ir.Value) -> ir.Value | None:
    n = producer(v, "Slice")
    return n.inputs[0] if n is not None else None


def _rotate_half_source(v: ir.Value) -> ir.Value | None:
    c = producer(v, "Concat")
    if c is None or len(c.inputs) != 2 or attr(c, "axis") not in (-1, 3):
        return None
    neg = producer(c.inputs[0], "Neg")
    if neg is None:
        return None
    a, b = _slice_source(neg.inputs[0]), _slice_source(c.inputs[1])
    if a is None or a is not b:
        return None
    return a


def unrotate(v: ir.Value) -> tuple[ir.Value, ir.Value, str] | Failure:
    """(x before RoPE, cos value, form) for a RoPE output ``v``, else a Failure."""
    n = v.producer()
    if n is None:
        return Failure(f"{v.name!r} is a graph input, not a RoPE output")
    if n.op_type == "RotaryEmbedding" and n.domain in ("", "ai.onnx"):
        if attr(n, "interleaved", 0) != 0:
            return Failure("RotaryEmbedding is interleaved; ReRoPE supports the rotate_half layout only")
        if attr(n, "rotary_embedding_dim", 0) not in (0, None):
            return Failure("RotaryEmbedding rotates part of the head (rotary_embedding_dim set); unsupported")
        x = n.inputs[0]
        if x.shape is not None and len(x.shape) != 4:
            return Failure("RotaryEmbedding input is not 4-D [B, H, S, D]; unsupported for ReRoPE")
        return x, n.inputs[1], "onnx"
    if n.op_type == "RotaryEmbedding" and n.domain == "com.microsoft":
        if attr(n, "interleaved", 0) != 0:
            return Failure("com.microsoft.RotaryEmbedding is interleaved; ReRoPE supports rotate_half only")
        if attr(n, "rotary_embedding_dim", 0) not in (0, None):
            return Failure("com.microsoft.RotaryEmbedding rotates part of the head; unsupported")
        return n.inputs[0], n.inputs[2], "com.microsoft"
    if n.op_type == "Add" and n.domain == "":
        for m1, m2 in ((0, 1), (1, 0)):
            p1, p2 = producer(n.inputs[m1], "Mul"), producer(n.inputs[m2], "Mul")
            if p1 is None or p2 is None:
                continue
            for i in (0, 1):
                src = _rotate_half_source(p2.inputs[i])
                if src is None:
                    continue
                for j in (0, 1):
                    if p1.inputs[j] is src:
                        return src, p1.inputs[1 - j], "decomposed"
        return Failure(f"{v.name!r} is an Add but not x*cos + rotate_half(x)*sin")
    return Failure(f"{v.name!r} is produced by {n.op_type}, not a recognised RoPE (needs un-rotated q/k)")


def _fit_theta(inv_freq: np.ndarray, head_dim: int) -> float | None:
    inv_freq = np.asarray(inv_freq, dtype=np.float64).ravel()
    if inv_freq.size != head_dim // 2 or inv_freq.size < 2 or not np.all(inv_freq > 0):
        return None
    theta = float(inv_freq[1] ** (-head_dim / 2.0))
    expect = theta ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    if not np.allclose(inv_freq, expect, rtol=1e-4, atol=0):
        return None
    # inv_freq is stored in fp32: snap to the nearest integer theta when that fits as well
    snapped = float(round(theta))
    if snapped > 0 and np.allclose(inv_freq, snapped ** (-np.arange(0, head_dim, 2) / head_dim), rtol=1e-5, atol=0):
        return snapped
    return theta


def rope_theta(cos: ir.Value, head_dim: int, *, max_nodes: int = 64) -> float | Failure:
    """Recover theta from constants upstream of ``cos`` (bounded search)."""
    seen: set[int] = set()
    frontier = [cos]
    visited = 0
    candidates: list[np.ndarray] = []
    while frontier and visited < max_nodes:
        v = frontier.pop()
        if v is None or id(v) in seen:
            continue
        seen.add(id(v))
        arr = const_array(v)
        if arr is not None and arr.dtype.kind == "f" and arr.size >= head_dim // 2:
            candidates.append(arr)
            continue
        n = v.producer()
        if n is None:
            continue
        visited += 1
        frontier.extend(n.inputs)
    for arr in candidates:
        flat = arr.reshape(-1)
        if flat.size == head_dim // 2:  # inv_freq
            theta = _fit_theta(flat, head_dim)
            if theta is not None:
                return theta
        elif arr.ndim >= 2 and arr.shape[-1] in (head_dim // 2, head_dim) and arr.shape[-2] >= 2:
            row1 = arr.reshape(-1, arr.shape[-1])[1][: head_dim // 2].astype(np.float64)
            if np.all(np.abs(row1) <= 1.0):  # a cos cache: row 1 = cos(inv_freq); inv_freq[1] < pi
                approx = float(np.arccos(np.clip(row1[1], -1.0, 1.0)) ** (-head_dim / 2.0))
                table = arr.reshape(-1, arr.shape[-1])[:, : head_dim // 2].astype(np.float64)
                pos = np.arange(table.shape[0], dtype=np.float64)[:, None]
                for theta in (float(round(approx)), approx):
                    if theta <= 0:
                        continue
                    inv_exact = theta ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
                    if np.allclose(table, np.cos(pos * inv_exact), atol=2e-5):
                        return theta
    return Failure(
        f"could not recover a default-RoPE theta from the constants feeding {cos.name!r} "
        f"(inv_freq of {head_dim // 2} values or a cos cache); scaled RoPE variants are not supported by ReRoPE"
    )


def capture_rope(m: AttentionMatch) -> None:
    """Fill ``q_unrot`` / ``k_unrot`` / ``rope_theta`` of a match (or ``rope_failure`` with the reason).

    Shared by every attention rule: the ReRoPE rewrite needs the query and key before rotation.
    """
    uq, uk = unrotate(m.q), unrotate(m.k_new)
    for what, u in (("query", uq), ("key", uk)):
        if isinstance(u, Failure):
            m.rope_failure = f"{what}: {u.reason}"
            return
    theta = rope_theta(uq[1], m.head_dim)
    if isinstance(theta, Failure):
        m.rope_failure = theta.reason
        return
    m.q_unrot, m.k_unrot, m.rope_theta = uq[0], uk[0], theta
