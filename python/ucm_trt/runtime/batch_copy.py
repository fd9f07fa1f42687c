"""Many host <-> device block copies in ONE driver call: ``cuMemcpyBatchAsync`` (CUDA 12.8+ driver).

The copies run on the copy engines (DMA), not on the SMs, so a load beside a model step does not
take the step's SMs, and issuing thousands of scattered blocks costs one call instead of one
``cudaMemcpyAsync`` each. PyTorch does not expose the call and cuda-python is not a dependency, so
it is reached through ``ctypes`` in the driver library (``libcuda.so.1``) that every CUDA process
has loaded: ``cuMemcpyBatchAsync_v2`` (CUDA 13 drivers: no ``failIdx`` argument) or, on 12.8-12.9
drivers, ``cuMemcpyBatchAsync`` (with ``failIdx``). Pointers are plain addresses: pinned host
memory is in the unified address space, so a pinned host tensor's ``data_ptr()`` is a valid source
or destination. Every copy uses one attribute set: source accessed in stream order, no location
hints (ignored for non-managed memory), default flags.
"""

from __future__ import annotations

import ctypes

import numpy as np

__all__ = ["BatchMemcpy"]


class _MemLocation(ctypes.Structure):
    _fields_ = [("type", ctypes.c_int), ("id", ctypes.c_int)]


class _MemcpyAttributes(ctypes.Structure):
    _fields_ = [("srcAccessOrder", ctypes.c_int), ("srcLocHint", _MemLocation), ("dstLocHint", _MemLocation),
                ("flags", ctypes.c_uint)]


_SRC_ACCESS_ORDER_STREAM = 1


class BatchMemcpy:
    """``cuMemcpyBatchAsync`` through ctypes. Construct once (it resolves the symbol); raises
    ``RuntimeError`` naming what is missing when the driver lacks the call."""

    def __init__(self) -> None:
        try:
            lib = ctypes.CDLL("libcuda.so.1")
        except OSError as exc:
            raise RuntimeError(f"batched DMA copies need the CUDA driver library libcuda.so.1: {exc}") from None
        if hasattr(lib, "cuMemcpyBatchAsync_v2"):
            self._fn, self.with_fail_index = lib.cuMemcpyBatchAsync_v2, False
        elif hasattr(lib, "cuMemcpyBatchAsync"):
            self._fn, self.with_fail_index = lib.cuMemcpyBatchAsync, True
        else:
            raise RuntimeError("the CUDA driver has no cuMemcpyBatchAsync (needs a CUDA 12.8 or newer driver); "
                               "use load_method='kernel' or 'staged'")
        self._fn.restype = ctypes.c_int
        self._attr = _MemcpyAttributes()
        self._attr.srcAccessOrder = _SRC_ACCESS_ORDER_STREAM
        self._attr_index = (ctypes.c_size_t * 1)(0)
        self.name = "cuMemcpyBatchAsync" + ("" if self.with_fail_index else "_v2")

    def copy(self, dst: np.ndarray, src: np.ndarray, nbytes: int, stream: int) -> None:
        """Copy ``nbytes`` from each address in ``src`` to the address at the same index in ``dst``
        (uint64 arrays of equal length), in stream order on ``stream`` (a raw ``cudaStream_t``,
        e.g. ``torch.cuda.Stream.cuda_stream``). Returns once the copies are enqueued."""
        if not stream:
            # the driver answers CUDA_ERROR_INVALID_VALUE (CUresult 1) for the legacy NULL stream
            raise ValueError("stream must be a created CUDA stream (cuMemcpyBatchAsync refuses the legacy default "
                             f"stream), got {stream!r}")
        n = int(dst.size)
        if src.size != n:
            raise ValueError(f"dst and src must list as many addresses, got {n} and {src.size}")
        if n == 0:
            return
        dst = np.ascontiguousarray(dst, dtype=np.uint64)
        src = np.ascontiguousarray(src, dtype=np.uint64)
        sizes = np.full(n, nbytes, dtype=np.uint64)
        args = [dst.ctypes.data_as(ctypes.c_void_p), src.ctypes.data_as(ctypes.c_void_p),
                sizes.ctypes.data_as(ctypes.c_void_p), ctypes.c_size_t(n), ctypes.byref(self._attr),
                self._attr_index, ctypes.c_size_t(1)]
        fail = ctypes.c_size_t(0)
        if self.with_fail_index:
            args.append(ctypes.byref(fail))
        args.append(ctypes.c_void_p(stream))
        rc = self._fn(*args)
        if rc != 0:
            where = f" (copy {fail.value})" if self.with_fail_index else ""
            raise RuntimeError(f"{self.name} failed with CUresult {rc}{where} for {n} copies of {nbytes} bytes")
