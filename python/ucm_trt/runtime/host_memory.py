"""Page-locked host tensors of their exact size (the offload runtime's host block store).

``torch.zeros(..., pin_memory=True)`` goes through torch's caching host allocator, which rounds
every allocation up to a power of two: a 3.4 GiB layer store takes 4 GiB of page-locked memory,
so an 8B-class store of 108 GiB would need 128 GiB. :func:`page_locked_empty` instead allocates an
ordinary (pageable, uninitialised: the store is only read where it was written) tensor of the
exact size and page-locks it with ``cudaHostRegister``
(``cudaHostRegisterDefault``: with unified addressing the memory is mapped and portable, so the
copy kernels reach it through its host pointer, as they reach ``cudaHostAlloc`` memory; torch's
``is_pinned()`` reports it pinned). :class:`PageLock` unregisters the tensors when its owner is
garbage-collected, while it still holds them (so the memory is never freed registered).
"""

from __future__ import annotations

import weakref

import torch

__all__ = ["PageLock", "page_locked_empty"]

#: ``cudaHostRegisterDefault``
REGISTER_DEFAULT = 0


def _code(err) -> int:
    """A cudart return value (a pybind enum or an int) as an int (0 = success)."""
    return int(getattr(err, "value", err))


class PageLock:
    """Page-locks host tensors with ``cudart.cudaHostRegister`` until ``owner`` is collected (or
    :meth:`release`). ``cudart`` is ``torch.cuda.cudart()`` (tests pass a stand-in)."""

    def __init__(self, owner: object, tensors: list[torch.Tensor], cudart) -> None:
        done: list[torch.Tensor] = []
        try:
            for i, t in enumerate(tensors):
                if t.device.type != "cpu" or not t.is_contiguous():
                    raise ValueError(f"tensors[{i}] must be a contiguous CPU tensor, got {t.device} "
                                     f"{'contiguous' if t.is_contiguous() else 'strided'}")
                nbytes = t.numel() * t.element_size()
                err = _code(cudart.cudaHostRegister(t.data_ptr(), nbytes, REGISTER_DEFAULT))
                if err:
                    raise RuntimeError(
                        f"cudaHostRegister of host store tensor {i} ({nbytes / 2**30:.2f} GiB) failed with CUDA "
                        f"error {err}; lower RuntimeConfig.num_host_blocks (page-locked memory is limited by "
                        "the machine's RAM and the memlock limit)"
                    )
                done.append(t)
        except BaseException:
            _unregister(cudart, done)
            raise
        self._finalizer = weakref.finalize(owner, _unregister, cudart, done)

    def release(self) -> None:
        """Unregister now (idempotent)."""
        self._finalizer()


def _unregister(cudart, tensors: list[torch.Tensor]) -> None:
    for t in tensors:
        cudart.cudaHostUnregister(t.data_ptr())
    tensors.clear()


def page_locked_empty(owner: object, count: int, shape: tuple[int, ...], dtype: torch.dtype,
                      cudart=None) -> tuple[list[torch.Tensor], PageLock]:
    """``count`` uninitialised host tensors of ``shape``, page-locked at their exact size until
    ``owner`` is collected. ``cudart`` defaults to ``torch.cuda.cudart()``."""
    tensors = [torch.empty(shape, dtype=dtype) for _ in range(count)]
    if cudart is None:
        cudart = torch.cuda.cudart()
    return tensors, PageLock(owner, tensors, cudart)
