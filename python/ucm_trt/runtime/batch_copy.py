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
        self._attr_ref = ctypes.byref(self._attr)
        self._one = ctypes.c_size_t(1)
        self._sizes: np.ndarray | None = None  # every copy's byte count, reused while it is long enough
        self.name = "cuMemcpyBatchAsync" + ("" if self.with_fail_index else "_v2")

    def copy(self, dst: np.ndarray, src: np.ndarray, nbytes: int, stream: int) -> None:
        """Copy ``nbytes`` from each address in ``src`` to the address at the same index in ``dst``
        (uint64 arrays of equal length), in stream order on ``stream`` (a raw ``cudaStream_t``,
        e.g. ``torch.cuda.Stream.cuda_stream``). Returns once the copies are enqueued."""
        n = int(dst.size)
        if src.size != n:
            raise ValueError(f"dst and src must list as many addresses, got {n} and {src.size}")
        dst = np.ascontiguousarray(dst, dtype=np.uint64)
        src = np.ascontiguousarray(src, dtype=np.uint64)
        self.enqueue(dst.ctypes.data, src.ctypes.data, n, nbytes, stream)

    def enqueue(self, dst_list: int, src_list: int, n: int, nbytes: int, stream: int) -> None:
        """:meth:`copy` of ``n`` address pairs given as the addresses of two uint64 arrays in host memory
        (``ndarray.ctypes.data`` plus an offset: a run of several calls over one address array, e.g.
        one per layer, without a view, a contiguity check and three ctypes conversions each). The
        arrays must stay alive until the call returns (the driver reads them during the call)."""
        if not stream:
            # the driver answers CUDA_ERROR_INVALID_VALUE (CUresult 1) for the legacy NULL stream
            raise ValueError("stream must be a created CUDA stream (cuMemcpyBatchAsync refuses the legacy default "
                             f"stream), got {stream!r}")
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        if n == 0:
            return
        if not dst_list or not src_list:
            raise ValueError(f"dst_list and src_list must be addresses of uint64 arrays, got {dst_list!r}, {src_list!r}")
        sizes = self._sizes
        if sizes is None or sizes.size < n or sizes[0] != nbytes:
            sizes = self._sizes = np.full(max(n, 1024), nbytes, dtype=np.uint64)
        args = [ctypes.c_void_p(dst_list), ctypes.c_void_p(src_list), ctypes.c_void_p(sizes.ctypes.data),
                ctypes.c_size_t(n), self._attr_ref, self._attr_index, self._one]
        fail = ctypes.c_size_t(0)
        if self.with_fail_index:
            args.append(ctypes.byref(fail))
        args.append(ctypes.c_void_p(stream))
        rc = self._fn(*args)
        if rc != 0:
            where = f" (copy {fail.value})" if self.with_fail_index else ""
            raise RuntimeError(f"{self.name} failed with CUresult {rc}{where} for {n} copies of {nbytes} bytes")
