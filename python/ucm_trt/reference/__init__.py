"""Independent fp32 PyTorch references: the ground truth every kernel and rewrite is checked against.

These functions favour clarity over speed: they materialise tokens and explicit boolean masks,
compute in float32 (float64 when given float64) and share no code with ``ucm_trt.kernels``.
"""

from ucm_trt.reference.dense import dense_attention
from ucm_trt.reference.paged import gather_visible_tokens, paged_rerope_attention, paged_sparse_attention
from ucm_trt.reference.rerope import logn_scale, rerope_attention
from ucm_trt.reference.rope import apply_rope, delta_rope, rope_cos_sin, rotate_half

__all__ = [
    "apply_rope",
    "delta_rope",
    "dense_attention",
    "gather_visible_tokens",
    "logn_scale",
    "paged_rerope_attention",
    "paged_sparse_attention",
    "rerope_attention",
    "rope_cos_sin",
    "rotate_half",
]
