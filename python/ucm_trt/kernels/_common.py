"""Launcher helpers shared by the Triton kernels (no ``@triton.jit`` code here).

Launchers check shapes, dtypes and devices on every call (cheap, no device sync). Checks that
must read tensor *contents* (index ranges, sortedness) need a device->host copy, so they run
only when the caller passes ``validate=True`` (the default); hot paths (CUDA-graph capture,
benchmarks) pass ``validate=False`` after validating once.
"""

from __future__ import annotations

import functools

import torch

HALF_DTYPES = (torch.float16, torch.bfloat16)
KERNEL_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def is_pow2(n: int) -> bool:
    return n > 0 and (n & (n - 1)) == 0


@functools.lru_cache(maxsize=16)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of ``device``; a fixed stand-in (8) off the GPU (interpreter)."""
    if device.type == "cuda":
        return _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return 8


def check_last_dim_contiguous(name: str, t: torch.Tensor) -> None:
    if t.dim() and t.stride(-1) != 1:
        raise ValueError(
            f"{name} must be contiguous in its last dimension (stride 1), got strides {tuple(t.stride())}"
        )


def check_bool(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {value!r} ({type(value).__name__})")
    return value


def check_float(name: str, value: object, *, positive: bool = True) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {value!r} ({type(value).__name__})")
    if positive and not value > 0:
        raise ValueError(f"{name} must be > 0, got {value!r}")
    return float(value)


def check_block_table_contents(
    block_table: torch.Tensor, seq_lens: torch.Tensor, block_size: int, num_blocks: int
) -> list[int]:
    """Content checks (device sync): seq_lens within capacity, used table entries in range."""
    lens = seq_lens.tolist()
    cap = block_table.shape[1] * block_size
    for i, n in enumerate(lens):
        if n < 1 or n > cap:
            raise ValueError(
                f"seq_lens[{i}] = {n} must be in [1, {cap}] (block_table capacity "
                f"{block_table.shape[1]} blocks x block_size {block_size})"
            )
        used = block_table[i, : (n + block_size - 1) // block_size]
        lo, hi = int(used.min()), int(used.max())
        if lo < 0 or hi >= num_blocks:
            raise ValueError(
                f"block_table[{i}] holds physical block ids in [{lo}, {hi}] for seq_len {n}; "
                f"they must be in [0, {num_blocks}) (kv_pool num_blocks)"
            )
    return lens


def check_selection_contents(selection: torch.Tensor, lens: list[int], block_size: int) -> None:
    """Each selection row: valid ids sorted strictly ascending, < blocks of the sequence, then -1 padding."""
    sel = selection.cpu()
    for b, n in enumerate(lens):
        nb = (n + block_size - 1) // block_size
        for h in range(sel.shape[1]):
            row = sel[b, h]
            valid = row >= 0
            nv = int(valid.sum())
            if bool((row < -1).any()):
                raise ValueError(f"selection[{b}, {h}] holds ids < -1 (only -1 pads): {row.tolist()}")
            if nv and not bool(valid[:nv].all()):
                raise ValueError(
                    f"selection[{b}, {h}] must hold its block ids first and -1 padding last, got {row.tolist()}"
                )
            ids = row[:nv]
            if nv and int(ids.max()) >= nb:
                raise ValueError(
                    f"selection[{b}, {h}] holds logical block {int(ids.max())} >= {nb} blocks "
                    f"of seq_len {n}: {row.tolist()}"
                )
            if nv > 1 and not bool((ids[1:] > ids[:-1]).all()):
                raise ValueError(
                    f"selection[{b}, {h}] must be sorted strictly ascending, got {row.tolist()}"
                )
