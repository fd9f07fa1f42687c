"""Argument checks shared by every public entry point.

Each helper raises ``ValueError`` or ``TypeError`` whose message names the
argument, the offending value and the rule it broke (DESIGN §6). Nothing here
asserts: user input never reaches a bare ``assert``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INT_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)


def _fmt_dtypes(dtypes: Iterable[torch.dtype]) -> str:
    return ", ".join(str(d).replace("torch.", "") for d in dtypes)


def check_tensor(
    name: str,
    value: object,
    *,
    ndim: int | None = None,
    dtypes: Sequence[torch.dtype] | None = None,
    shape: Sequence[int | None] | None = None,
) -> torch.Tensor:
    """Check that ``value`` is a tensor with the given rank, dtype and shape.

    ``shape`` entries that are ``None`` are not checked. Returns the tensor.
    """
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if ndim is not None and value.dim() != ndim:
        raise ValueError(
            f"{name} must have {ndim} dimensions, got shape {tuple(value.shape)}"
        )
    if dtypes is not None and value.dtype not in dtypes:
        raise TypeError(
            f"{name} must have dtype in ({_fmt_dtypes(dtypes)}), got {value.dtype}"
        )
    if shape is not None:
        if len(shape) != value.dim():
            raise ValueError(
                f"{name} must have {len(shape)} dimensions, got shape {tuple(value.shape)}"
            )
        for axis, (want, got) in enumerate(zip(shape, value.shape, strict=True)):
            if want is not None and want != got:
                raise ValueError(
                    f"{name} must have size {want} on axis {axis} "
                    f"(expected shape {tuple('*' if s is None else s for s in shape)}), "
                    f"got shape {tuple(value.shape)}"
                )
    return value


def check_same_device(**tensors: torch.Tensor | None) -> None:
    """All given tensors (``None`` skipped) must live on one device."""
    devices = {n: t.device for n, t in tensors.items() if t is not None}
    if len(set(devices.values())) > 1:
        listing = ", ".join(f"{n} on {d}" for n, d in devices.items())
        raise ValueError(f"tensors must be on one device, got {listing}")


def check_positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {value!r} ({type(value).__name__})")
    if value <= 0:
        raise ValueError(f"{name} must be > 0, got {value}")
    return value


def check_non_negative_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {value!r} ({type(value).__name__})")
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    return value


def check_gqa(num_q_heads: int, num_kv_heads: int, *, q_name: str = "q", kv_name: str = "k") -> int:
    """Return the GQA group size; query heads must be a multiple of KV heads."""
    if num_kv_heads <= 0 or num_q_heads % num_kv_heads != 0:
        raise ValueError(
            f"{q_name} heads ({num_q_heads}) must be a positive multiple of "
            f"{kv_name} heads ({num_kv_heads}) for grouped-query attention"
        )
    return num_q_heads // num_kv_heads
