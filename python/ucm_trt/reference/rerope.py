"""ReRoPE attention (Su, 2023) in its windowed form, as upstream UCM computes it.

For query position ``i`` and key position ``j``:

- ``i - j < window``: ``s1 = rope(q_i, i) . rope(k_j, j)`` — the real relative position;
- otherwise:          ``s2 = rope(q_i, window) . k_j``   — relative position clamped to ``window``.

With log-n scaling the query is first multiplied by ``max(1, log(i + 1) / log(L_train))``.
Keys are passed UN-rotated; with a window covering every distance and log-n off this is
exactly ordinary RoPE attention.
"""

from __future__ import annotations

import math

import torch

from ucm_trt._validation import FLOAT_DTYPES, INT_DTYPES, check_gqa, check_tensor
from ucm_trt.reference.dense import masked_softmax_attention, positions_and_mask
from ucm_trt.reference.rope import apply_rope


def logn_scale(positions: torch.Tensor, training_length: int) -> torch.Tensor:
    """``max(1, log(pos + 1) / log(training_length))`` in float64, same shape as ``positions``."""
    check_tensor("positions", positions, dtypes=INT_DTYPES)
    if isinstance(training_length, bool) or not isinstance(training_length, int) or training_length < 2:
        raise ValueError(f"logn_training_length must be an int >= 2, got {training_length!r}")
    ratio = torch.log(positions.to(torch.float64) + 1.0) / math.log(training_length)
    return ratio.clamp_min(1.0)


def rerope_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    window: int,
    theta: float,
    logn_training_length: int | None = None,
    scale: float | None = None,
    q_positions: torch.Tensor | None = None,
    k_positions: torch.Tensor | None = None,
    causal: bool = True,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Reference ReRoPE attention; q ``[B, Hq, Tq, D]`` and k ``[B, Hkv, Tk, D]`` un-rotated.

    Positions default as in :func:`ucm_trt.reference.dense_attention`. ``mask`` (bool,
    broadcastable to ``[B, Hq, Tq, Tk]``) is ANDed with the causal mask. Returns fp32.
    """
    check_tensor("q", q, ndim=4, dtypes=FLOAT_DTYPES)
    b, hq, tq, d = q.shape
    check_tensor("k", k, ndim=4, dtypes=FLOAT_DTYPES, shape=(b, None, None, d))
    hkv, tk = k.shape[1], k.shape[2]
    check_tensor("v", v, ndim=4, dtypes=FLOAT_DTYPES, shape=(b, hkv, tk, d))
    group = check_gqa(hq, hkv)
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"window must be an int >= 1, got {window!r}")
    if scale is None:
        scale = 1.0 / math.sqrt(d)
    qp, kp, allowed = positions_and_mask(q, k, q_positions, k_positions, causal=causal, mask=mask)
    ct = torch.float64 if q.dtype == torch.float64 else torch.float32
    qf = q.to(ct)
    if logn_training_length is not None:
        qf = qf * logn_scale(qp, logn_training_length).to(ct)[:, None, :, None]
    kf = k.to(ct).repeat_interleave(group, dim=1)
    vf = v.to(ct).repeat_interleave(group, dim=1)
    q1 = apply_rope(qf, qp[:, None, :], theta=theta)
    k1 = apply_rope(kf, kp[:, None, :], theta=theta)
    q2 = apply_rope(qf, torch.full_like(qp, window)[:, None, :], theta=theta)
    s1 = q1 @ k1.transpose(-1, -2)
    s2 = q2 @ kf.transpose(-1, -2)
    inside = (qp[:, :, None] - kp[:, None, :]) < window  # [B, Tq, Tk]
    logits = torch.where(inside[:, None], s1, s2) * scale
    return masked_softmax_attention(logits, vf, allowed)
