"""GPU timing: the one timing utility of the project (warm-up, CUDA events, median, cold L2).

:func:`bench_gpu_ms` times a callable with CUDA events. It runs ``warmup`` untimed calls first,
then ``reps`` timed calls, and returns the median in milliseconds. It has two ways to keep the
working set out of L2, so that a kernel that streams KV from HBM is not flattered by cache hits:

* ``inputs``: a sequence of argument tuples. Rep ``i`` calls ``fn(*inputs[i % len(inputs)])``.
  Give it enough copies of the working set that together they exceed L2 (an H100 or H200 has
  50 to 60 MB). Each call then finds its data evicted by the copies used since.
* ``flush_l2=True``: before each timed call, write a scratch buffer of twice the device's L2
  size. This happens outside the timed window.

:func:`cuda_graphed` captures a callable in a CUDA graph and returns its replay, so that an op is
timed without the host's launch overhead.

:func:`copy_bandwidth_tbps` measures the device's achievable memory bandwidth: a large
device-to-device copy, counting both the bytes read and the bytes written. DESIGN §5 sets the
sparse decode kernel's target against this number.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from typing import Any

import torch

__all__ = ["bench_gpu_ms", "copy_bandwidth_tbps", "cuda_graphed"]


def _check_count(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {value!r} ({type(value).__name__})")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def _cuda_device(device: torch.device | str | int | None) -> torch.device:
    if device is None:
        if not torch.cuda.is_available():
            raise RuntimeError("GPU timing needs CUDA, but torch.cuda.is_available() is False")
        return torch.device("cuda", torch.cuda.current_device())
    if isinstance(device, bool) or not isinstance(device, (torch.device, str, int)):
        raise TypeError(f"device must be a torch.device, str, int or None, got {type(device).__name__}")
    dev = torch.device("cuda", device) if isinstance(device, int) else torch.device(device)
    if dev.type != "cuda":
        raise ValueError(f"device must be a CUDA device, got {dev}")
    if not torch.cuda.is_available():
        raise RuntimeError(f"device {dev} requested, but torch.cuda.is_available() is False")
    if dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    if dev.index >= torch.cuda.device_count():
        raise ValueError(f"device must be one of the {torch.cuda.device_count()} CUDA devices, got {dev}")
    return dev


def bench_gpu_ms(
    fn: Callable[..., Any],
    *,
    inputs: Sequence[tuple[Any, ...]] | None = None,
    warmup: int = 10,
    reps: int = 50,
    flush_l2: bool = False,
    device: torch.device | str | int | None = None,
) -> float:
    """Median GPU time of ``fn`` in milliseconds, measured with CUDA events.

    Parameters
    ----------
    fn:
        The callable to time. It is called as ``fn()`` when ``inputs`` is None, else as
        ``fn(*inputs[i % len(inputs)])``. It must enqueue its work on the current stream.
    inputs:
        Argument tuples to rotate through (see the module docstring).
    warmup, reps:
        Untimed and timed calls. ``reps`` must be >= 1.
    flush_l2:
        Whether to write a scratch buffer of 2x the L2 size before each timed call.
    device:
        The CUDA device whose current stream is timed (default: the current device).
    """
    if not callable(fn):
        raise TypeError(f"fn must be callable, got {type(fn).__name__}")
    _check_count("warmup", warmup, 0)
    _check_count("reps", reps, 1)
    if not isinstance(flush_l2, bool):
        raise TypeError(f"flush_l2 must be a bool, got {flush_l2!r}")
    if inputs is not None:
        if isinstance(inputs, (str, bytes)) or not isinstance(inputs, Sequence) or len(inputs) == 0:
            raise ValueError(
                f"inputs must be a non-empty sequence of argument tuples or None, got {inputs!r}"
            )
        for i, args in enumerate(inputs):
            if not isinstance(args, tuple):
                raise TypeError(f"inputs[{i}] must be a tuple of arguments, got {type(args).__name__}")
    dev = _cuda_device(device)

    def call(i: int) -> Any:
        return fn() if inputs is None else fn(*inputs[i % len(inputs)])

    with torch.cuda.device(dev):
        scratch = None
        if flush_l2:
            l2_bytes = int(getattr(torch.cuda.get_device_properties(dev), "L2_cache_size", 0)) or (64 << 20)
            scratch = torch.empty(2 * l2_bytes, dtype=torch.uint8, device=dev)
        for i in range(warmup):
            call(i)
        torch.cuda.synchronize(dev)
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        for i in range(reps):
            if scratch is not None:
                scratch.zero_()
            starts[i].record()
            call(warmup + i)
            ends[i].record()
        torch.cuda.synchronize(dev)
    return float(statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends, strict=True)))


def copy_bandwidth_tbps(
    device: torch.device | str | int | None = None,
    *,
    nbytes: int = 1 << 30,
    warmup: int = 3,
    reps: int = 20,
) -> float:
    """Achieved device-to-device copy bandwidth in TB/s (10**12 bytes/s), counting read + write.

    A copy of ``nbytes`` moves ``2 * nbytes`` through DRAM. The default 1 GiB is far larger than
    any L2, so the number is a DRAM figure. The result is ``2 * nbytes / median_time``.
    """
    _check_count("nbytes", nbytes, 1 << 20)
    dev = _cuda_device(device)
    src = torch.empty(nbytes, dtype=torch.uint8, device=dev).fill_(1)
    dst = torch.empty_like(src)
    ms = bench_gpu_ms(lambda: dst.copy_(src), warmup=warmup, reps=reps, device=dev)
    return 2.0 * nbytes / (ms * 1e-3) / 1e12


def cuda_graphed(fn: Callable[[], Any], *, warmup: int = 2) -> Callable[[], None]:
    """Capture ``fn()`` in a CUDA graph after ``warmup`` calls on a side stream; return the replay.

    The warm-up compiles kernels and lets caching allocators settle outside the capture. Tensors
    ``fn`` allocates during the capture live in the graph's memory pool; each replay rewrites them.
    """
    if not callable(fn):
        raise TypeError(f"fn must be callable, got {type(fn).__name__}")
    _check_count("warmup", warmup, 0)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return g.replay
