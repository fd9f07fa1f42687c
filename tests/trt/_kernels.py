"""A tiny Triton kernel for the PTX tests (importable by name: PTX compilation may run in a child process)."""

import triton
import triton.language as tl


@triton.jit
def axpy_kernel(x_ptr, y_ptr, n, out_ptr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    tl.store(out_ptr + offs, 2.0 * tl.load(x_ptr + offs, mask=m) + tl.load(y_ptr + offs, mask=m), mask=m)
