"""NeoX-style rotary position embedding (the half-rotation used by Llama/Qwen/Mistral in HF).

``apply_rope(x, p) = x * cos(p * inv_freq) + rotate_half(x) * sin(p * inv_freq)`` where the
frequencies are repeated for both halves of the head dimension. Rotations compose:
``delta_rope(apply_rope(x, a), b) == apply_rope(x, a + b)``.
"""

from __future__ import annotations

import torch

from ucm_trt._validation import FLOAT_DTYPES, INT_DTYPES, check_tensor


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _check_theta(theta: object) -> float:
    if isinstance(theta, bool) or not isinstance(theta, (int, float)) or not theta > 0:
        raise ValueError(f"theta must be a positive number, got {theta!r}")
    return float(theta)


def rope_cos_sin(
    positions: torch.Tensor, head_dim: int, theta: float, *, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cos/sin tables for integer ``positions``: each ``[*positions.shape, head_dim]``.

    Angles are computed in float64 so large positions (128K+) stay exact to fp32 rounding.
    """
    check_tensor("positions", positions, dtypes=INT_DTYPES)
    if isinstance(head_dim, bool) or not isinstance(head_dim, int) or head_dim <= 0 or head_dim % 2:
        raise ValueError(f"head_dim must be a positive even int, got {head_dim!r}")
    theta = _check_theta(theta)
    inv_freq = theta ** (
        -torch.arange(0, head_dim, 2, dtype=torch.float64, device=positions.device) / head_dim
    )
    angles = positions.to(torch.float64)[..., None] * inv_freq
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """``[x1, x2] -> [-x2, x1]`` over the last dimension (HF's ``rotate_half``)."""
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def apply_rope(x: torch.Tensor, positions: torch.Tensor, *, theta: float) -> torch.Tensor:
    """Rotate ``x`` ``[..., T, D]`` by ``positions`` (int, broadcastable to ``x.shape[:-1]``)."""
    check_tensor("x", x, dtypes=FLOAT_DTYPES)
    if x.dim() < 1 or x.shape[-1] % 2:
        raise ValueError(f"x must have an even last dimension (head_dim), got shape {tuple(x.shape)}")
    check_tensor("positions", positions, dtypes=INT_DTYPES)
    try:
        torch.broadcast_shapes(positions.shape, x.shape[:-1])
    except RuntimeError as exc:
        raise ValueError(
            f"positions of shape {tuple(positions.shape)} must broadcast to x.shape[:-1] "
            f"= {tuple(x.shape[:-1])}"
        ) from exc
    ct = _compute_dtype(x)
    cos, sin = rope_cos_sin(positions, x.shape[-1], theta, dtype=ct)
    xf = x.to(ct)
    return xf * cos + rotate_half(xf) * sin


def delta_rope(k: torch.Tensor, offsets: torch.Tensor, *, theta: float) -> torch.Tensor:
    """Rotate already-rotated keys by an extra ``offsets`` (Blend's position correction).

    RoPE is a rotation, so rotating by ``a`` and then by ``b`` equals rotating by ``a + b``.
    """
    return apply_rope(k, offsets, theta=theta)
