"""Named comparison tolerances, each with the reason for its value.

Use them through :func:`tolerances_for`, for example
``torch.testing.assert_close(out.float(), ref, **tolerances_for(out.dtype))``. They are for kernel
or backend outputs compared with the fp32 references in :mod:`ucm_trt.reference`. Both sides see the
*same* low-precision inputs: the reference upcasts the very tensors the kernel read. Input rounding
is therefore not part of the error budget, only the kernel's own rounding is.

Machine epsilons (the spacing of numbers just above 1.0): fp32 2**-23 = 1.19e-7,
fp16 2**-10 = 9.77e-4, bf16 2**-7 = 7.81e-3.
"""

from __future__ import annotations

import torch

__all__ = [
    "BF16_ATOL",
    "BF16_RTOL",
    "FP16_ATOL",
    "FP16_RTOL",
    "FP32_ATOL",
    "FP32_RTOL",
    "MODEL_LOGITS_FP32_ATOL",
    "tolerances_for",
]

# fp32 vs fp32 (for example a Triton kernel in the interpreter, or a rewritten ONNX graph on ONNX
# Runtime, against the reference). The only differences come from summation order: in a softmax-
# weighted sum over n keys, a reordered sum has relative error of about sqrt(n) * eps. That is about
# 1e-5 at n = 8K and under 1e-4 even at 128K keys. Attention outputs are convex combinations of V
# rows with |V| = O(1), so an absolute floor of 1e-5 covers outputs near zero.
FP32_RTOL = 1e-5
FP32_ATOL = 1e-5

# fp16 kernel output vs fp32 reference. The output is rounded to fp16 (0.5 ulp, 4.9e-4 relative).
# Flash-style kernels also round the probabilities P to fp16 before the P@V matmul (a further
# <= 0.5 ulp per term; the rounding errors of different terms partly cancel). Accumulation is fp32.
# Two ulps at magnitude 1 (2e-3) covers both, with margin for the online-softmax rescaling.
FP16_RTOL = 2e-3
FP16_ATOL = 2e-3

# bf16 kernel output vs fp32 reference: the same error sources as fp16, but bf16 has 8 fewer
# mantissa bits (ulp 7.8e-3). Two ulps at magnitude 1 gives 1.6e-2. This is also torch.testing's
# bf16 rtol.
BF16_RTOL = 1.6e-2
BF16_ATOL = 1.6e-2

# Whole-model fp32 logits from two backends (torch vs ONNX Runtime, dense vs "select all" sparse).
# Thirty layers of differently fused or ordered ops compound the fp32 rounding. Measured on
# SmolLM2-135M: max |delta logit| = 7e-4 between ONNX Runtime 1.32 and torch 2.13 (logits are
# O(10), shared/reference/models.md §4). 5e-3 leaves about 7x margin, and is still far below a
# change that could flip a greedy token, where the top-2 logit gap is typically > 0.1.
MODEL_LOGITS_FP32_ATOL = 5e-3

_BY_DTYPE = {
    torch.float32: (FP32_RTOL, FP32_ATOL),
    torch.float16: (FP16_RTOL, FP16_ATOL),
    torch.bfloat16: (BF16_RTOL, BF16_ATOL),
}


def tolerances_for(dtype: torch.dtype) -> dict[str, float]:
    """``{"rtol": ..., "atol": ...}`` for comparing a ``dtype`` kernel output with the fp32 reference."""
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype must be a torch.dtype, got {dtype!r} ({type(dtype).__name__})")
    if dtype not in _BY_DTYPE:
        raise ValueError(f"dtype must be one of float32, float16, bfloat16, got {dtype}")
    rtol, atol = _BY_DTYPE[dtype]
    return {"rtol": rtol, "atol": atol}
