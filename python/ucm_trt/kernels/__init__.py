"""Triton kernels (the only place with ``@triton.jit`` code) and their validating launchers.

Run on a CUDA GPU, or on the CPU through Triton's interpreter (``TRITON_INTERPRET=1`` set by
the caller before the first import of this package; the library never sets it).
"""

from ucm_trt.kernels.attention import (
    AttentionLaunch,
    paged_rerope_attention,
    paged_sparse_attention,
)

__all__ = [
    "AttentionLaunch",
    "paged_rerope_attention",
    "paged_sparse_attention",
]
