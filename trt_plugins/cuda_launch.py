"""Launch an AOT kernel's PTX through the CUDA driver exactly as TensorRT's AOT launcher does.

``cuModuleLoadData`` on the PTX (the driver JIT-compiles it), then ``cuLaunchKernel`` with the
arguments ``[input pointers] [int32 extras] [output pointers]``, block ``(num_warps * 32, 1, 1)``
and the kernel's dynamic shared memory, on the current torch stream (so a CUDA graph captures it).
Used by the GPU tests and the kernel benchmark; needs cuda-python (``cuda-bindings``).
"""

from __future__ import annotations

import ctypes

__all__ = ["PtxModule"]


def _driver():
    try:
        from cuda.bindings import driver
    except ImportError:  # cuda-python < 12.6 layout
        from cuda import cuda as driver
    return driver


def _ok(res):
    drv = _driver()
    err, *rest = res if isinstance(res, tuple) else (res,)
    if err != drv.CUresult.CUDA_SUCCESS:
        raise RuntimeError(f"CUDA driver call failed: {err}")
    return rest[0] if len(rest) == 1 else rest


class PtxModule:
    """A PTX module loaded into torch's primary context, with one entry ``name``."""

    def __init__(self, name: str, ptx: str) -> None:
        import torch

        drv = _driver()
        torch.cuda.init()
        torch.zeros(1, device="cuda")  # makes the primary context current on this thread
        image = ctypes.create_string_buffer(ptx.encode())  # NUL-terminated, alive during the call
        self.module = _ok(drv.cuModuleLoadData(ctypes.addressof(image)))
        self.func = _ok(drv.cuModuleGetFunction(self.module, name.encode()))

    def launch(self, grid, block, shared, pointers_in, extras, pointers_out) -> None:
        """cuLaunchKernel with TensorRT's argument order on the current stream (asynchronous)."""
        import torch

        drv = _driver()
        vals = ([ctypes.c_void_p(p) for p in pointers_in] + [ctypes.c_int32(int(e)) for e in extras]
                + [ctypes.c_void_p(p) for p in pointers_out])  # fmt: skip
        arr = (ctypes.c_void_p * len(vals))(*[ctypes.addressof(v) for v in vals])
        if shared > 48 * 1024:
            _ok(drv.cuFuncSetAttribute(
                self.func, drv.CUfunction_attribute.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, shared))
        stream = drv.CUstream(torch.cuda.current_stream().cuda_stream)
        _ok(drv.cuLaunchKernel(self.func, *[int(g) for g in grid], *block, shared, stream, ctypes.addressof(arr), 0))

    def __del__(self):
        try:
            _driver().cuModuleUnload(self.module)
        except Exception:
            pass
