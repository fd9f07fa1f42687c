"""Dense attention with an explicit boolean mask (causal, GQA)."""

from __future__ import annotations

import math

import torch

from ucm_trt._validation import FLOAT_DTYPES, INT_DTYPES, check_gqa, check_tensor


def _positions(name: str, pos: torch.Tensor | None, default: torch.Tensor, batch: int, n: int) -> torch.Tensor:
    if pos is None:
        return default.expand(batch, n)
    check_tensor(name, pos, dtypes=INT_DTYPES)
    if pos.dim() == 1:
        pos = pos[None]
    if pos.dim() != 2 or pos.shape[-1] != n or pos.shape[0] not in (1, batch):
        raise ValueError(
            f"{name} must have shape [{n}] or [{batch}, {n}], got {tuple(pos.shape)}"
        )
    return pos.expand(batch, n)


def visible_mask(
    q_positions: torch.Tensor, k_positions: torch.Tensor, *, causal: bool
) -> torch.Tensor:
    """``[B, 1, Tq, Tk]`` bool: key j visible to query i (``k_pos <= q_pos`` when causal)."""
    b, tq = q_positions.shape
    tk = k_positions.shape[-1]
    if not causal:
        return torch.ones(b, 1, tq, tk, dtype=torch.bool, device=q_positions.device)
    return (k_positions[:, None, None, :] <= q_positions[:, None, :, None])


def positions_and_mask(
    q: torch.Tensor,
    k: torch.Tensor,
    q_positions: torch.Tensor | None,
    k_positions: torch.Tensor | None,
    *,
    causal: bool,
    mask: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Resolve query/key positions (``[B, Tq]``, ``[B, Tk]``) and the ``[B, 1|Hq, Tq, Tk]`` visibility mask.

    Defaults: the queries are the last ``Tq`` of the ``Tk`` keys. ``mask`` (bool, broadcastable to
    ``[B, Hq, Tq, Tk]``) is ANDed with the causal rule.
    """
    b, hq, tq, _ = q.shape
    tk = k.shape[2]
    dev = q.device
    qp = _positions("q_positions", q_positions, torch.arange(tk - tq, tk, device=dev)[None], b, tq)
    kp = _positions("k_positions", k_positions, torch.arange(tk, device=dev)[None], b, tk)
    allowed = visible_mask(qp, kp, causal=causal)
    if mask is not None:
        check_tensor("mask", mask, dtypes=(torch.bool,))
        try:
            torch.broadcast_shapes(mask.shape, (b, hq, tq, tk))
        except RuntimeError as exc:
            raise ValueError(
                f"mask of shape {tuple(mask.shape)} must broadcast to {(b, hq, tq, tk)}"
            ) from exc
        allowed = allowed & mask
    return qp, kp, allowed


def masked_softmax_attention(
    logits: torch.Tensor, v: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """softmax(logits masked) @ v with fully masked rows returning zeros.

    logits ``[B, Hq, Tq, Tk]`` (compute dtype), v ``[B, Hq, Tk, D]``, mask broadcastable bool.
    """
    logits = logits.masked_fill(~mask, float("-inf"))
    row_max = logits.amax(dim=-1, keepdim=True)
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    p = torch.exp(logits - row_max)
    denom = p.sum(dim=-1, keepdim=True)
    out = (p @ v) / torch.where(denom > 0, denom, torch.ones_like(denom))
    return out


def dense_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float | None = None,
    causal: bool = True,
    q_positions: torch.Tensor | None = None,
    k_positions: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Reference attention ``softmax(q k^T * scale + mask) v`` in fp32.

    Parameters
    ----------
    q : ``[B, Hq, Tq, D]``
    k, v : ``[B, Hkv, Tk, D]``; query head ``h`` reads KV head ``h // (Hq // Hkv)``.
    scale : default ``1 / sqrt(D)``.
    causal : key ``j`` is visible to query ``i`` iff ``k_positions[j] <= q_positions[i]``.
    q_positions, k_positions : int ``[Tq]``/``[B, Tq]`` and ``[Tk]``/``[B, Tk]``; default
        ``Tk - Tq + arange(Tq)`` and ``arange(Tk)`` (the queries are the last ``Tq`` keys).
    mask : optional bool, broadcastable to ``[B, Hq, Tq, Tk]``; ``True`` = may attend.

    Returns
    -------
    ``[B, Hq, Tq, D]`` float32 (float64 for float64 input). Rows with no visible key are zero.
    """
    check_tensor("q", q, ndim=4, dtypes=FLOAT_DTYPES)
    b, hq, tq, d = q.shape
    check_tensor("k", k, ndim=4, dtypes=FLOAT_DTYPES)
    hkv, tk = k.shape[1], k.shape[2]
    check_tensor("k", k, shape=(b, None, None, d))
    check_tensor("v", v, ndim=4, dtypes=FLOAT_DTYPES, shape=(b, hkv, tk, d))
    group = check_gqa(hq, hkv)
    if scale is None:
        scale = 1.0 / math.sqrt(d)
    _, _, allowed = positions_and_mask(q, k, q_positions, k_positions, causal=causal, mask=mask)
    ct = torch.float64 if q.dtype == torch.float64 else torch.float32
    kx = k.to(ct).repeat_interleave(group, dim=1)
    vx = v.to(ct).repeat_interleave(group, dim=1)
    logits = (q.to(ct) @ kx.transpose(-1, -2)) * scale
    return masked_softmax_attention(logits, vx, allowed)
