"""What each plugin's ``aot_impl`` returns, computed without TensorRT.

``aot_launch(op, attrs, dtype, tactic, target)`` compiles the op's single kernel to PTX (scratch
parameters stripped, ISA capped) and returns the kernel together with two functions of the
input shapes -- the launch grid and the int32 extra arguments. ``aot_impl`` evaluates them on
TensorRT's symbolic shape expressions; the GPU-tier test evaluates the very same functions on
concrete ints and launches the PTX through the CUDA driver exactly as TensorRT would:
``[input pointers] [int32 extras] [output pointers]``, block = ``(num_warps * 32, 1, 1)``,
dynamic shared memory = the kernel's.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch

from trt_plugins.ptx import PtxKernel, PtxTarget, compile_ptx

__all__ = ["AotLaunch", "aot_launch", "MAX_AOT_SHARED_MEM", "SharedMemoryLimitError", "int_cdiv"]

# Dynamic shared memory a kernel may use without cuFuncSetAttribute(MAX_DYNAMIC_SHARED_SIZE).
# TensorRT's AOT launcher is not documented to opt in to more, so we stay within it.
MAX_AOT_SHARED_MEM = 48 * 1024

Shapes = Mapping[str, Sequence[object]]


def int_cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True)
class AotLaunch:
    """A compiled kernel plus its launch rule.

    ``grid(shapes, cdiv)`` -> ``(x, y, z)`` and ``extras(shapes)`` -> int32 extras, where
    ``shapes`` maps each op input name to its dims (ints or TensorRT shape expressions).
    ``scratch(shapes)`` (concrete ints), where the kernel has scratch I/O beyond the op's own: their
    shapes (the split-K attention kernel: the int32 counter input, zero before the launch and left
    zero, that follows the op's inputs; the fp32 partials output that follows the op's output).
    """

    kernel: PtxKernel
    grid: Callable[[Shapes, Callable], tuple]
    extras: Callable[[Shapes], tuple]
    tactic: int
    config: object = None  # the kernel's tile configuration, where it has one
    scratch: Callable[[Shapes], tuple] | None = None

    @property
    def block(self) -> tuple[int, int, int]:
        return self.kernel.block_x, 1, 1


class SharedMemoryLimitError(ValueError):
    """The kernel needs more shared memory than the AOT launcher can give."""

    def __init__(self, message: str, *, needed: str) -> None:
        super().__init__(message)
        self.needed = needed


def compile_within_shared_limit(kernel, signature, constexprs, target, num_warps, stages=(2, 1),
                                divisible_by_16=()) -> PtxKernel:
    """Compile with the first ``num_stages`` whose shared memory fits ``MAX_AOT_SHARED_MEM``."""
    seen = []
    for ns in stages:
        k = compile_ptx(kernel, signature=signature, constexprs=constexprs, target=target,
                        num_warps=num_warps, num_stages=ns, divisible_by_16=divisible_by_16)  # fmt: skip
        if k.shared_mem <= MAX_AOT_SHARED_MEM:
            return k
        seen.append(f"num_stages={ns}: {k.shared_mem} B")
    raise SharedMemoryLimitError(
        f"kernel {getattr(kernel, '__name__', kernel)} needs more than {MAX_AOT_SHARED_MEM} B of shared memory "
        f"for the AOT path ({'; '.join(seen)}); use the JIT plugin path or a smaller tile",
        needed=", ".join(seen),
    )


def _freeze(attrs: Mapping[str, object]) -> tuple:
    return tuple(sorted(attrs.items()))


@functools.lru_cache(maxsize=256)
def _cached(op_name: str, frozen_attrs: tuple, dtype: torch.dtype, tactic: int, target: PtxTarget) -> AotLaunch:
    from trt_plugins import ops

    return ops.module(op_name).aot_launch(dict(frozen_attrs), dtype, tactic, target)


def aot_launch(op_name: str, attrs: Mapping[str, object], dtype: torch.dtype, tactic: int, target: PtxTarget) -> AotLaunch:
    """Compile (cached) the AOT kernel of UCM op ``op_name`` for plugin field values ``attrs``."""
    if not isinstance(target, PtxTarget):
        raise TypeError(f"target must be a PtxTarget, got {type(target).__name__}")
    return _cached(op_name, _freeze(attrs), dtype, int(tactic), target)
