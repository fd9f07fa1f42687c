"""Index safety without a host sync (issue 17): clamp on the device, flag, raise at the next sync.

A kernel that reads block ids from a table it did not build (a block table, a selection, a copy
list) must never read or write outside its pool, also when the launcher skips the content checks
(``validate=False``, the hot path and CUDA graphs). Such a kernel takes an ``IndexGuard``'s
``flag`` (an int32 device tensor of one element): an out-of-range id is replaced by a safe one
(the op's documented fallback: skip the block, or read the null block 0) and the kernel stores a
non-zero code in the flag. The host reads the flag only where it synchronises anyway (the end of a
step, a ``.cpu()`` it already does) through :meth:`IndexGuard.check`, which raises a
``RuntimeError`` naming the op and what was wrong. No launch pays a device-to-host copy.

Codes are small integers an op defines; :meth:`IndexGuard.check` reports the largest seen, so
kernels set them with an atomic max.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

__all__ = ["IndexGuard", "IndexOutOfRangeError"]


class IndexOutOfRangeError(RuntimeError):
    """A kernel met an out-of-range id (clamped on the device, so nothing outside the pool was touched)."""


class IndexGuard:
    """One device flag shared by the launches of one owner (an engine, a test).

    ``codes`` maps a non-zero flag value to the words :meth:`check` raises with.
    """

    def __init__(self, device: torch.device | str, codes: Mapping[int, str] | None = None) -> None:
        self.device = torch.device(device)
        self.flag = torch.zeros(1, dtype=torch.int32, device=self.device)
        self.codes = dict(codes or {})

    def reset(self) -> None:
        """Clear the flag (an asynchronous device write; no sync)."""
        self.flag.zero_()

    def value(self) -> int:
        """The flag's value: a device-to-host read, so call it only where the host syncs anyway."""
        return int(self.flag.item())

    def check(self, where: str) -> None:
        """Raise :class:`IndexOutOfRangeError` if a kernel flagged a bad id since the last reset."""
        code = self.value()
        if code == 0:
            return
        what = self.codes.get(code, f"error code {code}")
        self.reset()
        raise IndexOutOfRangeError(
            f"{where}: a kernel met an out-of-range block id ({what}); it was clamped on the device, so no "
            "memory outside the pool was read or written, but the step's result is invalid"
        )
