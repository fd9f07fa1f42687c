"""Shape limits of the kernels, stated once (issue 17).

Every launcher, the ONNX rewriter and the CLI check shapes against these rules, so a shape the
kernels cannot run is refused where the user gives it (``ucm-trt rewrite``, ``ucm-trt run``), with
the same words everywhere. Imports nothing heavy: the CLI reads it before torch is loaded.

* ``head_dim``: a multiple of 16 in [16, 256]. Powers of two run at their own width; other sizes
  (80, 96, 112, ...) run in the next power-of-two tile with the extra lanes masked (the cache is
  never copied or padded).
* ``block_size`` (tokens per KV block): a power of two in [16, 256].
"""

from __future__ import annotations

__all__ = [
    "BLOCK_SIZE_MAX",
    "BLOCK_SIZE_MIN",
    "HEAD_DIM_MAX",
    "HEAD_DIM_MIN",
    "HEAD_DIM_MULTIPLE",
    "BLOCK_SIZE_RULE",
    "HEAD_DIM_RULE",
    "block_size_problem",
    "check_block_size",
    "check_head_dim",
    "head_dim_problem",
]

HEAD_DIM_MIN = 16
HEAD_DIM_MAX = 256
HEAD_DIM_MULTIPLE = 16
HEAD_DIM_RULE = f"a multiple of {HEAD_DIM_MULTIPLE} in [{HEAD_DIM_MIN}, {HEAD_DIM_MAX}]"

BLOCK_SIZE_MIN = 16
BLOCK_SIZE_MAX = 256
BLOCK_SIZE_RULE = f"a power of two in [{BLOCK_SIZE_MIN}, {BLOCK_SIZE_MAX}]"


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def head_dim_problem(d: object) -> str | None:
    """None when the kernels run ``head_dim = d``; otherwise the rule it breaks."""
    if not _is_int(d) or not (HEAD_DIM_MIN <= d <= HEAD_DIM_MAX and d % HEAD_DIM_MULTIPLE == 0):
        return f"must be {HEAD_DIM_RULE}"
    return None


def block_size_problem(bs: object) -> str | None:
    """None when the kernels run ``block_size = bs``; otherwise the rule it breaks."""
    if not _is_int(bs) or not (BLOCK_SIZE_MIN <= bs <= BLOCK_SIZE_MAX and bs & (bs - 1) == 0):
        return f"must be {BLOCK_SIZE_RULE}"
    return None


def check_head_dim(name: str, d: object) -> int:
    """Raise ``ValueError`` naming ``name`` and the value unless the kernels run this head_dim."""
    problem = head_dim_problem(d)
    if problem is not None:
        raise ValueError(f"{name} head_dim {problem}, got {d!r}")
    return d  # type: ignore[return-value]


def check_block_size(name: str, bs: object) -> int:
    """Raise ``ValueError`` naming ``name`` and the value unless the kernels run this block size."""
    problem = block_size_problem(bs)
    if problem is not None:
        raise ValueError(f"{name} block_size {problem}, got {bs!r}")
    return bs  # type: ignore[return-value]
