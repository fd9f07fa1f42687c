"""The device side of :class:`~ucm_trt.kernels.guard.IndexGuard`: how a kernel raises the flag.

One ``@triton.jit`` helper, so every kernel sets the flag the same way: an atomic max (the host
reports the largest code seen) with **relaxed** ordering. The flag is only read by the host after
the launch has completed (at a later stream sync), which orders it after every write of the
kernel, so no ordering is needed (Triton's default is acquire-release). Timed on an H100 this did not
change the attention kernel's guard cost (session 12); that cost was registers, see
:func:`ucm_trt.kernels.attention._paged_attn_fwd`'s check after its key loop.
"""

from __future__ import annotations

import triton
import triton.language as tl

__all__ = ["raise_flag"]


@triton.jit
def raise_flag(flag_ptr, code, mask):
    """Set the flag at ``flag_ptr`` to at least ``code`` where ``mask`` (scalars or same-shaped blocks)."""
    tl.atomic_max(flag_ptr, code, mask=mask, sem="relaxed")
