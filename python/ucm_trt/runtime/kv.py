"""Paged KV management: block allocator, per-layer device pools, host block store, working sets.

Layout (DESIGN §3)
------------------
* Device pool, one per layer: ``[num_device_blocks, 2, Hkv, block_size, D]`` (index 0 = K, 1 = V).
  Physical block 0 of every layer is the *null block*: never allocated, it is what block-table
  entries of non-resident logical blocks point at (the attention never reads them: they are
  not selected). Lives on the runtime device.
* Block tables, one per layer: int32 ``[max_batch, max_blocks]`` logical -> physical, a device
  buffer allocated once plus a host mirror (pinned on CUDA) that the plan writes and copies
  ``non_blocking``.
* Host block store (offload mode only): ``[num_host_blocks, 2, Hkv, block_size, D]`` per layer in
  host memory (page-locked at its exact size with ``cudaHostRegister`` when the device is CUDA:
  :mod:`ucm_trt.runtime.host_memory`). Every *completed* block of every layer is written
  back to it once (device -> host, when it fills); the partial last block is always resident
  because the local window holds it. One host id per logical block, shared by all layers.
* Working set, per (request, layer): the resident logical blocks, held as a numpy block-table
  row plus last-use stamps (LRU order), held in per-manager ``[layers, slots, width]`` arrays (one
  slot per active request). Each step the policy names the blocks a layer needs (sink + local +
  selected); :meth:`KVManager.plan_step` computes which blocks to evict (unneeded ones beyond
  ``cache_blocks`` of LRU cache) and which to copy in (delta prefetch, host -> device: one
  :func:`ucm_trt.kernels.copy_blocks` launch per layer on a side CUDA stream on GPU, reading the
  pinned store directly; an indexed copy on the CPU). It plans every (request, layer) pair of the
  step in one pass of array operations (:meth:`KVManager._plan_batched`), except for layers where
  pool pressure could arise (evictions of other requests' blocks, whose outcome depends on the
  order of the rows) or with early prefetch: those go request by request (:meth:`KVManager._plan_layer`),
  the rules below; both give the same working sets (``tests/runtime/test_kv_batched.py``).

Without offload every block of every request stays resident and the host store is not built.

Copies and the event discipline (CUDA)
--------------------------------------
Every copy between the host store and a pool (a layer's loads of one plan, a layer's write-backs)
runs on the one side stream ``copy_stream`` and gets a *generation* number, increasing in issue
order; ``_block_gen[layer][phys]`` is the generation of the last copy into or out of that physical
block (kept after the block is freed). The side stream is in order, so once the compute stream
has waited for generation ``g`` every copy ``<= g`` is done (``_waited``). Then:

* a step that reads or writes a block whose generation is ``> _waited`` first makes the compute
  stream wait for that generation's event (per layer: :meth:`KVManager.layer_waits`), so no step
  reads a block that is still loading and no new token lands in a block a copy still uses;
* a load into a block waits (on the side stream) for the compute work enqueued before the step
  that evicted it (``mark_forward_start``), so a block is never overwritten while a step that
  read it may still run; a write-back waits for the step that filled the block;
* nothing else waits: no host synchronisation per step.

Overlapped (stale-by-one) loads (``overlap=True``)
---------------------------------------------------
When a layer's new selection needs blocks that are not resident, the plan allocates them and
*defers* their loads: :meth:`KVManager.issue_deferred` issues them after the step's forward was
enqueued (they run beside it), and this step attends with the previous visible selection of that
layer, extended with the blocks opened since (the new token's block; the local window is in it).
Both sets stay resident for that step. The next plan finds the new blocks resident and makes them
visible; that step's compute waits for their copies' events (normally long finished). A layer
switches synchronously instead (counted in ``StepTransfer.sync_switches``) when it has no
resident previous selection (e.g. evicted under pool pressure) or the pool has no room for both
sets. :meth:`KVManager.plan_step` returns, per layer and row, whether the step attends with the
stale selection; the engine hands attention the matching selection tensors.
"""

from __future__ import annotations

import contextlib
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ucm_trt._validation import check_non_negative_int, check_positive_int
from ucm_trt.runtime.host_memory import page_locked_empty

__all__ = [
    "LOAD_METHODS",
    "NULL_BLOCK",
    "BlockAllocator",
    "KVLayout",
    "KVManager",
    "PoolExhaustedError",
    "StepTransfer",
]

NULL_BLOCK = 0
#: blocks per chunk of the ``"staged"`` load method (two pinned + two device slots of this size)
STAGING_BLOCKS = 64
#: pinned block-id buffers the copies rotate through (the host reuses one after its upload ran)
ID_STAGING_SLOTS = 4
#: how host -> device loads move on CUDA (KVManager ``load_method``)
LOAD_METHODS = ("auto", "kernel", "staged", "batch_dma")


def resolve_load_method(method: str, device: torch.device, offload: bool) -> str:
    """The load method a KVManager uses: ``"auto"`` is ``"batch_dma"`` on CUDA with offload where the
    driver has ``cuMemcpyBatchAsync`` (CUDA 12.8+), else ``"kernel"``; any other name is itself.
    On an H100 (benchmarks/results/runtime/block_copy_NVIDIA-H100-80GB-HBM3_2026-12-07.json, 256
    blocks of 256 KiB over 16 layers through this manager) batched DMA moved 44.9 GB/s and slowed
    the paged attention running beside it 1.08x; the copy kernel moved 29.4 GB/s and slowed it
    1.73x (it takes SMs). ``Engine.stats()["load_method"]`` reports the method used."""
    if method not in LOAD_METHODS:
        raise ValueError(f"load_method must be one of {LOAD_METHODS}, got {method!r}")
    if method != "auto":
        return method
    if device.type != "cuda" or not offload:
        return "kernel"
    from ucm_trt.runtime.batch_copy import BatchMemcpy

    try:
        BatchMemcpy()
    except RuntimeError:
        return "kernel"  # an older driver: the copy kernel (reported in the stats)
    return "batch_dma"


class PoolExhaustedError(RuntimeError):
    """A block pool has no free block left; the message names the pool and the sizes."""


class BlockAllocator:
    """Free-list allocator of block ids ``[first, num_blocks)``.

    ``allocate`` pops from the free list (LIFO, so recently freed blocks are reused first),
    ``free`` returns blocks; freeing a block that is not allocated raises ``ValueError``
    (double free or foreign id), so leaks and double frees are caught where they happen.
    ``allocate_array`` / ``free_array`` do the same on numpy arrays (the offload planner's path).
    """

    def __init__(self, num_blocks: int, *, first: int = 0, name: str = "pool",
                 _storage: tuple[np.ndarray, np.ndarray] | None = None) -> None:
        check_positive_int("num_blocks", num_blocks)
        check_non_negative_int("first", first)
        if first >= num_blocks:
            raise ValueError(f"first ({first}) must be < num_blocks ({num_blocks})")
        self.name = name
        self.num_blocks = num_blocks
        self.first = first
        # free stack: the top (end) is handed out first; starts with `first` on top. ``_storage``
        # (LayerAllocators): the stack and in-use rows live in arrays shared by every layer
        self._stack, self._used = _storage if _storage is not None else (
            np.empty(num_blocks, dtype=np.int64), np.empty(num_blocks, dtype=bool))
        self._stack[: num_blocks - first] = np.arange(num_blocks - 1, first - 1, -1)
        self._used[:] = False
        self._top = num_blocks - first
        self._num_used = 0

    @property
    def capacity(self) -> int:
        return self.num_blocks - self.first

    @property
    def num_free(self) -> int:
        return self._top

    @property
    def num_used(self) -> int:
        return self._num_used

    def allocate_array(self, n: int) -> np.ndarray:
        check_non_negative_int("n", n)
        if n > self._top:
            raise PoolExhaustedError(
                f"{self.name}: cannot allocate {n} block(s), {self._top} free of {self.capacity}; "
                "raise the pool size (RuntimeConfig.num_device_blocks / num_host_blocks) or lower "
                "max_batch / max_seq_len"
            )
        out = self._stack[self._top - n : self._top][::-1].copy()
        self._top -= n
        self._used[out] = True
        self._num_used += n
        return out

    def allocate(self, n: int = 1) -> list[int]:
        return self.allocate_array(n).tolist()

    def free_array(self, ids: np.ndarray) -> None:
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        if ids.size == 0:
            return
        if ids.min() >= 0 and ids.max() < self.num_blocks and self._used[ids].all():
            self._used[ids] = False
            if np.count_nonzero(self._used) == self._num_used - ids.size:  # no id twice in this call
                self._stack[self._top : self._top + ids.size] = ids
                self._top += ids.size
                self._num_used -= ids.size
                return
            self._used[ids] = True  # undo: every id was in use, one of them is here twice
        bad = int(ids[_first_refused(ids, ids, self._used, self.num_blocks)])
        raise ValueError(f"{self.name}: block {bad} is not allocated (double free or foreign id)")

    def free(self, ids) -> None:
        self.free_array(np.fromiter((int(i) for i in ids), dtype=np.int64))


def _first_refused(ids: np.ndarray, keys: np.ndarray, used: np.ndarray, n: int) -> int:
    """Index of the first id a free must refuse: outside ``[0, n)``, not in use (``used[keys]``) or a
    repeat of an earlier one in the same call (``keys``: the ids, or unique per-layer keys of them)."""
    inside = (ids >= 0) & (ids < n)
    good = inside.copy()
    good[inside] = used[keys[inside]]
    _, first = np.unique(keys, return_index=True)
    again = np.ones(ids.size, dtype=bool)
    again[first] = False
    return int(np.flatnonzero(~good | again)[0])


class LayerAllocators(Sequence):
    """One :class:`BlockAllocator` per layer (``allocators[layer]``) over shared ``[L, N]`` arrays, so
    the batched planner frees and allocates the blocks of every layer in a few array operations
    (:meth:`free_many`, :meth:`allocate_many`) with the per-layer allocators' results, checks and
    messages (a refused call changes nothing; the message names the pool and the bad id)."""

    def __init__(self, num_layers: int, num_blocks: int, *, first: int, name: str) -> None:
        check_positive_int("num_layers", num_layers)
        check_positive_int("num_blocks", num_blocks)
        self._stack = np.empty((num_layers, num_blocks), dtype=np.int64)
        self._used = np.empty((num_layers, num_blocks), dtype=bool)
        self._layers = [BlockAllocator(num_blocks, first=first, name=name.format(layer=i),
                                       _storage=(self._stack[i], self._used[i])) for i in range(num_layers)]

    def __len__(self) -> int:
        return len(self._layers)

    def __getitem__(self, layer):
        return self._layers[layer]

    def free_many(self, layer_of: np.ndarray, ids: np.ndarray) -> None:
        """``allocators[layer_of[i]].free_array`` of each ``ids[i]``, ``layer_of`` ascending (each layer's
        ids pushed in the given order, as one ``free_array`` call per layer would)."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        if ids.size == 0:
            return
        n = self._used.shape[1]
        flat = layer_of * n + ids
        used = self._used.reshape(-1)
        ok = ids.min() >= 0 and ids.max() < n and used[flat].all()
        if ok:
            used[flat] = False
            before = sum(a._num_used for a in self._layers)
            ok = np.count_nonzero(self._used) == before - ids.size  # no id twice
            if not ok:
                used[flat] = True
        if not ok:  # name the first id out of the pool, not in use or freed twice; nothing was changed
            i = _first_refused(ids, flat, used, n)
            raise ValueError(f"{self._layers[int(layer_of[i])].name}: block {int(ids[i])} is not allocated "
                             "(double free or foreign id)")
        counts = np.bincount(layer_of, minlength=len(self._layers))
        tops = np.fromiter((a._top for a in self._layers), dtype=np.int64, count=len(self._layers))
        rank = np.arange(ids.size) - (np.cumsum(counts) - counts)[layer_of]
        self._stack.reshape(-1)[layer_of * n + tops[layer_of] + rank] = ids
        for layer in np.flatnonzero(counts).tolist():
            a, c = self._layers[layer], int(counts[layer])
            a._top += c
            a._num_used -= c

    def allocate_many(self, counts: np.ndarray) -> np.ndarray:
        """``np.concatenate([allocators[layer].allocate_array(counts[layer]) for each layer])``: the same ids
        in the same order; where a pool lacks room, that layer's ``PoolExhaustedError`` and nothing taken."""
        counts = np.asarray(counts, dtype=np.int64)
        tops = np.fromiter((a._top for a in self._layers), dtype=np.int64, count=len(self._layers))
        short = np.flatnonzero(counts > tops)
        if short.size:
            layer = int(short[0])
            self._layers[layer].allocate_array(int(counts[layer]))  # raises, naming the pool
        total = int(counts.sum())
        if total == 0:
            return np.zeros(0, dtype=np.int64)
        layer_of = np.repeat(np.arange(len(self._layers)), counts)
        n = self._used.shape[1]
        rank = np.arange(total) - (np.cumsum(counts) - counts)[layer_of]
        out = self._stack.reshape(-1)[layer_of * n + tops[layer_of] - 1 - rank]
        self._used.reshape(-1)[layer_of * n + out] = True
        for layer in np.flatnonzero(counts).tolist():
            a, c = self._layers[layer], int(counts[layer])
            a._top -= c
            a._num_used += c
        return out


@dataclass(frozen=True, kw_only=True)
class KVLayout:
    """Shape of the KV cache of one model."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    dtype: torch.dtype
    device: torch.device

    def __post_init__(self) -> None:
        for name in ("num_layers", "num_kv_heads", "head_dim", "block_size"):
            check_positive_int(f"KVLayout.{name}", getattr(self, name))
        if not isinstance(self.dtype, torch.dtype) or not self.dtype.is_floating_point:
            raise TypeError(f"KVLayout.dtype must be a floating torch.dtype, got {self.dtype!r}")
        object.__setattr__(self, "device", torch.device(self.device))

    @property
    def block_bytes(self) -> int:
        """Bytes of one block of one layer (K and V)."""
        elem = torch.empty((), dtype=self.dtype).element_size()
        return 2 * self.num_kv_heads * self.block_size * self.head_dim * elem


@dataclass
class StepTransfer:
    """What one plan moved: filled by :meth:`KVManager.plan_step` and the write-back."""

    blocks_loaded: int = 0  # host -> device (delta prefetch misses)
    blocks_needed: int = 0  # needed blocks of offloaded layers (hits + misses)
    blocks_written_back: int = 0  # device -> host (blocks that filled)
    blocks_evicted: int = 0
    working_set_blocks: int = 0  # sum over (request, layer) of the blocks this step needs
    bytes_h2d: int = 0
    bytes_d2h: int = 0
    load_seconds: float = 0.0
    blocks_prefetched: int = 0  # early prefetch: loaded for a coming selection, not waited for this step
    prefetch_skipped: int = 0  # early-prefetch blocks left for later (no free pool block)
    blocks_deferred: int = 0  # overlapped schedule: loaded beside this step, visible from the next (in blocks_loaded)
    stale_layers: int = 0  # (row, layer) pairs that attended their previous selection while new blocks load
    sync_switches: int = 0  # (row, layer) pairs that had to switch synchronously (no resident old set / no room)


def _mark_spans(mask: np.ndarray, start: np.ndarray, stop: np.ndarray) -> None:
    """``mask[i, start[i]:stop[i]] = True`` for every row ``i`` (a decode step opens one block per row:
    a few indexed writes instead of three passes over the ``[rows, width]`` mask)."""
    span = stop - start
    longest = int(span.max()) if span.size else 0
    if longest > 8:
        ar = np.arange(mask.shape[1])
        mask |= (ar >= start[:, None]) & (ar < stop[:, None])
        return
    flat = mask.reshape(-1)
    base = np.arange(span.size) * mask.shape[1] + start
    for k in range(longest):
        rows = np.flatnonzero(span > k)
        flat[base[rows] + k] = True


_BYTE_SUM = np.uint64(0x0101010101010101)


def _row_counts(mask: np.ndarray) -> np.ndarray:
    """``np.count_nonzero(mask, axis=1)`` of a C-contiguous bool ``[rows, width]`` mask, eight bytes at a
    time where ``width`` is a multiple of 8 (the per-slot arrays' rows are): a bool byte is 0 or 1, so
    multiplying a word by 0x0101..01 leaves the sum of its 8 bytes in its top byte (3-4x
    faster than count_nonzero on the planner's masks)."""
    if mask.shape[1] % 8 or not mask.flags.c_contiguous or mask.dtype != np.bool_:
        return np.count_nonzero(mask, axis=1)
    words = mask.view(np.uint64)
    return ((words * _BYTE_SUM) >> np.uint64(56)).sum(axis=1, dtype=np.int64)


def _layer_runs(layer_of: np.ndarray, sel: np.ndarray | None):
    """``(layer, slice)`` of each run of equal values in ``layer_of`` (ascending), over the
    entries where ``sel`` is true (``sel`` None: all): the indices of ``layer_of`` as a slice
    (``sel`` None) or an index array."""
    idx = None if sel is None else np.flatnonzero(sel)
    lay = layer_of if idx is None else layer_of[idx]
    if not lay.size:
        return
    starts = _run_starts(lay).tolist()
    for a, b in zip(starts, [*starts[1:], lay.size], strict=True):
        yield int(lay[a]), (slice(a, b) if idx is None else idx[a:b])


def _run_starts(values: np.ndarray) -> np.ndarray:
    """Index of the first entry of each run of equal values in a non-empty ``values``."""
    return np.concatenate(([0], np.flatnonzero(values[1:] != values[:-1]) + 1))


def _as_ids(blocks, limit: int) -> np.ndarray:
    """Logical block ids (a set, sequence or int64 array) below ``limit`` as an int64 array."""
    ids = blocks if isinstance(blocks, np.ndarray) else np.fromiter(blocks, dtype=np.int64, count=len(blocks))
    return ids[(ids >= 0) & (ids < limit)]


class _Seq:
    """KV state of one request. Its arrays live in the manager's per-slot arrays (so a plan works
    on every request and layer of a step at once): per layer a block table row (logical ->
    physical, ``NULL_BLOCK`` where not resident) and the last-use stamps of the resident blocks
    (LRU order), plus the host store id of every written-back logical block; ``table``, ``lru``
    and ``host_ids`` are views of the request's slot."""

    __slots__ = ("rid", "slot", "serial", "seq_len", "flushed", "version", "_kv")

    def __init__(self, kv: KVManager, rid: str, slot: int, serial: int = 0) -> None:
        self._kv = kv
        self.rid = rid
        self.slot = slot
        self.serial = serial  # unique per manager: (serial, version) names one state of ``table``
        self.seq_len = 0
        self.flushed = 0  # completed blocks written back to the host store
        self.version = 0  # bumped on every change of ``table`` (the engine re-uploads changed rows only)

    @property
    def table(self) -> np.ndarray:
        """int32 ``[L, max_blocks]`` (a view)."""
        return self._kv._table[:, self.slot, : self._kv.max_blocks]

    @property
    def lru(self) -> np.ndarray:
        """int64 ``[L, max_blocks]``: stamp of each resident block's last use (larger = more recent)."""
        return self._kv._lru[:, self.slot, : self._kv.max_blocks]

    @property
    def host_ids(self) -> np.ndarray:
        """int64 ``[max_blocks]``: host store id per logical block, -1 = not written back yet."""
        return self._kv._host_ids[self.slot, : self._kv.max_blocks]

    @property
    def resident(self) -> list[OrderedDict[int, int]]:
        """Per layer: logical -> physical of the resident blocks, least recently used first
        (a read-only view built from the arrays)."""
        out = []
        for tbl, lru in zip(self.table, self.lru, strict=True):
            blocks = np.flatnonzero(tbl)
            blocks = blocks[np.argsort(lru[blocks], kind="stable")]
            out.append(OrderedDict((int(b), int(tbl[b])) for b in blocks))
        return out


class KVManager:
    """Per-layer device pools, block tables, host block store and working sets.

    Parameters
    ----------
    layout:
        Model KV shape, dtype and device.
    max_batch, max_blocks:
        Rows and width of the block tables (``max_blocks`` = blocks of the longest sequence).
    num_device_blocks:
        Blocks per layer in the device pool, including the null block 0.
    offload:
        Keep the full KV in a host block store and only the working set on the device.
    num_host_blocks:
        Host store size (offload only).
    cache_blocks:
        Unneeded blocks a (request, layer) working set may keep as LRU cache (offload only).
    overlap:
        Overlapped (stale-by-one) loads, see the module docstring (offload only).
    load_method:
        How host -> device loads move on CUDA (:data:`LOAD_METHODS`): ``"kernel"`` = one
        ``copy_blocks`` launch per layer reading the pinned store over the bus (SMs do the copy);
        ``"staged"`` = the CPU gathers a layer's blocks into a pinned staging buffer, one DMA copy
        (copy engine) moves it, one ``index_copy_`` scatters it into the pool (write-backs use
        ``copy_blocks``); ``"batch_dma"`` = every block of a layer in one ``cuMemcpyBatchAsync``
        driver call (:class:`~ucm_trt.runtime.batch_copy.BatchMemcpy`; copy engines, both
        directions; a ``RuntimeError`` at construction where the driver lacks it); ``"auto"``
        (default) = ``"batch_dma"`` where the driver has it, else ``"kernel"``
        (:func:`resolve_load_method`; :attr:`load_method` holds the one used). Ignored on the CPU.
    time_copies:
        Record CUDA timing events around loads and around the compute stream's waits for them
        (:meth:`KVManager.collect_timings`): the load time and the part of it the step waited for.
    guard:
        An :class:`~ucm_trt.kernels.guard.IndexGuard` on the pools' device: ``copy_blocks`` skips
        and flags out-of-range block ids there (no sync; the owner reads it at its next sync), and
        the step's attention launches use the same one (``StepContext`` reads ``kv.guard``).
    """

    def __init__(
        self,
        layout: KVLayout,
        *,
        max_batch: int,
        max_blocks: int,
        num_device_blocks: int,
        offload: bool,
        num_host_blocks: int = 0,
        cache_blocks: int = 0,
        overlap: bool = False,
        load_method: str = "auto",
        time_copies: bool = False,
        guard=None,
    ) -> None:
        if not isinstance(layout, KVLayout):
            raise TypeError(f"layout must be a KVLayout, got {type(layout).__name__}")
        check_positive_int("max_batch", max_batch)
        check_positive_int("max_blocks", max_blocks)
        check_positive_int("num_device_blocks", num_device_blocks)
        if num_device_blocks < 2:
            raise ValueError(f"num_device_blocks must be >= 2 (block 0 is the null block), got {num_device_blocks}")
        if not isinstance(offload, bool):
            raise TypeError(f"offload must be a bool, got {offload!r}")
        check_non_negative_int("cache_blocks", cache_blocks)
        check_non_negative_int("num_host_blocks", num_host_blocks)
        if offload and num_host_blocks < 1:
            raise ValueError(f"num_host_blocks must be >= 1 with offload=True, got {num_host_blocks}")
        for name, flag in (("overlap", overlap), ("time_copies", time_copies)):
            if not isinstance(flag, bool):
                raise TypeError(f"{name} must be a bool, got {flag!r}")
        load_method = resolve_load_method(load_method, layout.device, offload)
        if guard is not None:
            from ucm_trt.kernels.guard import IndexGuard  # the Triton kernels' package: only with a guard

            if not isinstance(guard, IndexGuard):
                raise TypeError(f"guard must be an IndexGuard or None, got {type(guard).__name__}")
        self.guard = guard
        self.overlap = overlap and offload
        self.load_method = load_method
        self._dma = None
        self._bases: tuple[np.ndarray, np.ndarray] | None = None  # (host store, pool) address per layer (batch_dma)
        if load_method == "batch_dma" and layout.device.type == "cuda" and offload:
            from ucm_trt.runtime.batch_copy import BatchMemcpy

            self._dma = BatchMemcpy()
        self.time_copies = time_copies
        #: plan request by request (the sequential path) even where the batched plan applies; for
        #: tests and the before/after benchmark, not a tuning knob
        self.sequential_plans = False
        self.layout = layout
        self.max_batch = max_batch
        self.max_blocks = max_blocks
        self.offload = offload
        self.cache_blocks = cache_blocks
        L, H, bs, D = layout.num_layers, layout.num_kv_heads, layout.block_size, layout.head_dim
        dev = layout.device
        self.is_cuda = dev.type == "cuda"
        # device pools and allocators (block 0 = null block in every layer)
        self.pools = [torch.zeros(num_device_blocks, 2, H, bs, D, dtype=layout.dtype, device=dev) for _ in range(L)]
        self.allocators = LayerAllocators(L, num_device_blocks, first=1, name="device pool of layer {layer}")
        # block tables: device buffer + host mirror (pinned on CUDA)
        self.tables = torch.zeros(L, max_batch, max_blocks, dtype=torch.int32, device=dev)
        self.tables_host = torch.zeros(L, max_batch, max_blocks, dtype=torch.int32, pin_memory=self.is_cuda)
        # host block store
        if offload:
            shape = (num_host_blocks, 2, H, bs, D)
            if self.is_cuda:
                # page-locked at the exact size (cudaHostRegister), not rounded up to a power of two
                # by torch's caching host allocator; unregistered when this manager is collected
                self.host, self._host_lock = page_locked_empty(self, L, shape, layout.dtype)
            else:
                self.host = [torch.zeros(shape, dtype=layout.dtype) for _ in range(L)]
            self.host_allocator = BlockAllocator(num_host_blocks, name="host block store")
        else:
            self.host = []
            self.host_allocator = None
        self.copy_stream = torch.cuda.Stream(device=dev) if self.is_cuda else None
        # copy generations (module docstring): last copy into / out of each physical block
        self._gen = 0
        self._waited = 0  # the compute stream has waited for every generation <= this
        self._block_gen = np.zeros((L, num_device_blocks), dtype=np.int64)  # row per layer
        self._gen_events: dict[int, torch.cuda.Event] = {}
        #: None, or a list that records every copy ("load" / "write_back", generation, layer, physical ids),
        #: every block a step reads or writes ("read", 0, layer, physical ids), the compute stream's
        #: waits for new tokens' blocks ("wait", 0, layer, generation) and, once per step, each layer's
        #: wait before it runs ("step_wait", 0, layer, generation; 0 = none); for tests of the event order
        self.copy_log: list[tuple[str, int, int, np.ndarray | int]] | None = None
        self._layer_wait = [0] * L  # this step: generation each layer must wait for (0 = none)
        self._step_waits: list | None = None  # what layer_waits() answered for this step
        # the running plan's stale decisions, its load lists and transfer record (for _unstale)
        self._stale_entries: list[list[tuple]] = [[] for _ in range(L)]
        self._stale_flags: list[list[bool]] = []
        self._loads_now: list[list[tuple[np.ndarray, np.ndarray]]] = [[] for _ in range(L)]
        self._early_now: list[list[tuple[np.ndarray, np.ndarray]]] = [[] for _ in range(L)]
        self._early_entries: list[list[tuple]] = [[] for _ in range(L)]
        self._transfer = StepTransfer()
        self._deferred: list[list[tuple[np.ndarray, np.ndarray]]] = [[] for _ in range(L)]
        self._forward_start = None  # event on the compute stream before this step's forward
        self._staging: dict[str, tuple[torch.Tensor, torch.cuda.Event | None]] = {}  # pinned buffers + last use
        self._ids_turn = 0  # the next slot of the copies' block-id ring (_copy_layers)
        self._timings: list[tuple[str, torch.cuda.Event, torch.cuda.Event]] = []  # (load | wait, start, end)
        self._step_want: dict[tuple[str, int], np.ndarray] = {}  # sequential plan: want mask per (request, layer)
        # per-request state, one slot per active request (``_Seq.slot``), grown on demand:
        # block tables, LRU stamps, host ids, and per layer the blocks the attention read at the
        # last step (``_vis`` over ``_vis_len`` blocks; ``_vis_set`` False = every block, e.g. after
        # a prefill) and whether that was a stale selection (overlapped schedule)
        self._slots_free: list[int] = []
        self._alloc_slots(max_batch)
        self._uploaded: list[tuple[str, int] | None] = [None] * max_batch  # (rid, table version) per row
        self._tables_event = None  # the last table upload from the pinned mirror
        self._serials = 0
        self._stamp = 0  # LRU clock of the working sets
        self.seqs: dict[str, _Seq] = {}

    # ------------------------------------------------------------------ requests
    def _alloc_slots(self, n: int) -> None:
        """Make room for ``n`` request slots (keeps the existing ones' state)."""
        L = self.layout.num_layers
        mb = -(-self.max_blocks // 8) * 8  # row width of the per-slot arrays
        have = getattr(self, "_table", np.zeros((L, 0, mb), dtype=np.int32)).shape[1]
        if n <= have:
            return
        grow = [("_table", (L, n, mb), np.int32, 0), ("_lru", (L, n, mb), np.int64, 0),
                ("_host_ids", (n, mb), np.int64, -1), ("_vis", (L, n, mb), bool, False),
                ("_vis_len", (L, n), np.int64, 0), ("_vis_set", (L, n), bool, False), ("_stale", (L, n), bool, False),
                # the batched plan's record of each pair's last plan (see _plan_batched)
                ("_src", (L, n), object, None), ("_src_id", (L, n), np.uint64, 0), ("_geom", (L, n, 3), np.int64, -1),
                ("_clean", (L, n), bool, False),
                ("_counts", (L, n, 2), np.int64, 0)]
        for name, shape, dtype, fill in grow:
            new = np.full(shape, fill, dtype=dtype)
            if have:
                old = getattr(self, name)
                if name == "_host_ids":
                    new[:have] = old
                else:
                    new[:, :have] = old
            setattr(self, name, new)
        self._slots_free = list(range(n - 1, have - 1, -1)) + self._slots_free

    def add_request(self, rid: str) -> None:
        if rid in self.seqs:
            raise ValueError(f"request id {rid!r} is already active")
        if not self._slots_free:
            self._alloc_slots(2 * self._table.shape[1])
        slot = self._slots_free.pop()
        self._table[:, slot] = NULL_BLOCK
        self._lru[:, slot] = 0
        self._host_ids[slot] = -1
        self._vis[:, slot] = False
        self._vis_len[:, slot] = 0
        self._vis_set[:, slot] = False
        self._stale[:, slot] = False
        self._src[:, slot] = None
        self._src_id[:, slot] = 0
        self._geom[:, slot] = -1
        self._clean[:, slot] = False
        self._counts[:, slot] = 0
        self._serials += 1
        self.seqs[rid] = _Seq(self, rid, slot, self._serials)

    def free_request(self, rid: str) -> None:
        """Return every device and host block of ``rid``. No wait: a freed block keeps the
        generation of its last copy, which its next user waits for (module docstring)."""
        seq = self._seq(rid)
        for layer in range(self.layout.num_layers):
            tbl = seq.table[layer]
            self.allocators[layer].free_array(tbl[tbl != NULL_BLOCK])
        seq.table.fill(NULL_BLOCK)
        seq.version += 1
        if self.host_allocator is not None:
            self.host_allocator.free_array(seq.host_ids[seq.host_ids >= 0])
        del self.seqs[rid]
        self._slots_free.append(seq.slot)

    def _seq(self, rid: str) -> _Seq:
        try:
            return self.seqs[rid]
        except KeyError:
            raise KeyError(f"unknown request id {rid!r}") from None

    def seq_len(self, rid: str) -> int:
        return self._seq(rid).seq_len

    def num_blocks(self, rid: str) -> int:
        bs = self.layout.block_size
        return (self._seq(rid).seq_len + bs - 1) // bs

    def resident_blocks(self, rid: str, layer: int) -> list[int]:
        return np.flatnonzero(self._seq(rid).table[layer]).tolist()

    # ------------------------------------------------------------------ sizes / metrics
    @property
    def block_bytes(self) -> int:
        return self.layout.block_bytes

    def device_blocks_held(self) -> int:
        return sum(a.num_used for a in self.allocators)

    def device_bytes_held(self) -> int:
        return self.device_blocks_held() * self.block_bytes

    def dense_bytes(self) -> int:
        """Bytes the active sequences would hold on the device without offload (every block, every layer)."""
        return sum(self.num_blocks(r) for r in self.seqs) * self.block_bytes * self.layout.num_layers

    def host_bytes_held(self) -> int:
        """Host store bytes in use (one host block id holds that block of every layer)."""
        if self.host_allocator is None:
            return 0
        return self.host_allocator.num_used * self.block_bytes * self.layout.num_layers

    # ------------------------------------------------------------------ planning
    def plan_step(
        self,
        rids: list[str],
        num_new_tokens: list[int],
        needed: list[list[set[int] | None]],
        transfer: StepTransfer,
        prefetch: list[list[object | None]] | None = None,
    ) -> list[list[bool]]:
        """Make room for the new tokens and bring every needed block into each layer's working set.

        ``needed[layer][row]`` is the set (or int64 numpy array) of *existing* logical blocks the
        row's attention reads in that layer (``None`` = all blocks). The blocks that will receive the new tokens are
        always made resident. Writes the block tables (host mirror, then device) for rows
        ``0..len(rids)-1`` in this order.

        ``prefetch[layer][row]`` (offload only; optional): blocks a coming selection will need
        (``Policy.prefetch``). They are loaded too, on the side stream, but this step's forward
        does not wait for them (the first step that reads them does), and only into free pool
        blocks; they stay resident while named here. Attention still reads only ``needed``.

        Returns ``stale[layer][row]``: True where the step must attend with the row's previous
        selection of that layer (overlapped schedule: its new blocks load beside this step, see
        the module docstring); always False without ``overlap``. Without ``overlap`` every load is
        issued here; with it, loads of stale layers and early prefetches wait for
        :meth:`issue_deferred`, which the caller runs after enqueuing the forward.
        """
        if len(rids) > self.max_batch:
            raise ValueError(f"batch of {len(rids)} requests exceeds max_batch = {self.max_batch}")
        if any(self._deferred):
            raise RuntimeError("plan_step called before issue_deferred() issued the last plan's deferred loads")
        bs = self.layout.block_size
        L = self.layout.num_layers
        loads: list[list[tuple[np.ndarray, np.ndarray]]] = [[] for _ in range(L)]  # per layer (host ids, phys)
        early: list[list[tuple[np.ndarray, np.ndarray]]] = [[] for _ in range(L)]
        stale = [[False] * len(rids) for _ in range(L)]
        # what _unstale needs while this plan runs
        self._stale_flags, self._loads_now, self._early_now, self._transfer = stale, loads, early, transfer
        self._stale_entries = [[] for _ in range(L)]
        self._early_entries: list[list[tuple]] = [[] for _ in range(L)]
        self._step_want = {}
        self._layer_wait = [0] * L
        self._step_waits = None
        geoms: list[tuple[int, int, int]] = []
        seqs: list[_Seq] = []
        for rid, t in zip(rids, num_new_tokens, strict=True):
            seq = self._seq(rid)
            new_len = seq.seq_len + t
            if new_len > self.max_blocks * bs:
                raise ValueError(
                    f"request {rid!r}: sequence length {new_len} exceeds the planned maximum "
                    f"{self.max_blocks * bs} (RuntimeConfig.max_seq_len)"
                )
            # (blocks before, block that receives the first new token, blocks after)
            geoms.append(((seq.seq_len + bs - 1) // bs, seq.seq_len // bs, (new_len + bs - 1) // bs))
            seqs.append(seq)
        if not self.offload:
            # every block stays resident: only the blocks the new tokens open are allocated
            for seq, (old_nb, _, new_nb) in zip(seqs, geoms, strict=True):
                if new_nb > old_nb:
                    for layer in range(L):
                        phys = self.allocators[layer].allocate_array(new_nb - old_nb)
                        seq.table[layer, old_nb:new_nb] = phys
                        self._wait_fresh(layer, phys)
                    seq.version += 1
                transfer.working_set_blocks += new_nb * L
        else:
            layers = list(range(L))
            if prefetch is None and not self.sequential_plans and seqs:
                layers = self._plan_batched(seqs, geoms, needed, transfer, loads, stale)
            # layers under pool pressure (or with early prefetch): request by request, in row order
            for layer in layers:
                for row, (seq, geom) in enumerate(zip(seqs, geoms, strict=True)):
                    extra = None if prefetch is None else prefetch[layer][row]
                    stale[layer][row] = self._plan_layer(seq, layer, needed[layer][row], geom, loads[layer],
                                                         transfer, extra, early[layer], row)
        for seq, t in zip(seqs, num_new_tokens, strict=True):
            seq.seq_len += t
        if any(loads):
            self._load(loads, transfer)
        if any(early):
            if self.overlap:
                for layer in range(L):
                    self._deferred[layer] += early[layer]
            else:
                self._load(early, transfer, early=True)
        self._write_tables(rids)
        return stale

    def _wait_fresh(self, layer: int, phys: np.ndarray) -> None:
        """Blocks just allocated for new tokens: whoever writes them next (this step's forward, or
        a caller writing the pool directly, e.g. Blend) runs on the compute stream, so it waits
        now (a stream wait, no host sync) for a copy that may still use them since their eviction."""
        if self._gen <= self._waited or not phys.size:
            return
        self._wait_gen(int(self._block_gen[layer][phys].max()), layer)

    def _wait_gen(self, g: int, layer: int) -> None:
        """The compute stream waits (a stream wait, no host sync) for copy generation ``g``, so for
        every earlier one too (one side stream runs them in order); logged as ``layer``'s wait."""
        if g <= self._waited:
            return
        if self.copy_stream is not None:
            torch.cuda.current_stream(self.layout.device).wait_event(self._gen_events[g])
        if self.copy_log is not None:
            self.copy_log.append(("wait", 0, layer, g))
        self._set_waited(g)

    def _wait_fresh_many(self, layer_of: np.ndarray, phys: np.ndarray) -> None:
        """:meth:`_wait_fresh` of many layers' new blocks (``phys[i]`` of layer ``layer_of[i]``,
        ascending) in one pass: one stream wait for the newest copy among them, which orders the
        compute stream after every earlier copy too (one side stream runs them in order). With a
        copy log, layer by layer, so the log holds each layer's wait."""
        if self._gen <= self._waited or not phys.size:
            return
        if self.copy_log is not None:
            for layer, at in _layer_runs(layer_of, None):
                self._wait_fresh(layer, phys[at])
            return
        g = int(self._block_gen.reshape(-1)[layer_of * self._block_gen.shape[1] + phys].max())
        self._wait_gen(g, int(layer_of[-1]))  # no copy log on this path: the layer is not recorded

    def _set_waited(self, g: int) -> None:
        self._waited = g
        for old in [x for x in self._gen_events if x <= g]:
            del self._gen_events[old]

    def _note_wait(self, layer: int, phys: np.ndarray) -> None:
        """This step reads or writes ``phys`` of ``layer``: its compute waits for their last copies."""
        if self.copy_log is not None:
            self.copy_log.append(("read", 0, layer, np.asarray(phys, dtype=np.int64).copy()))
        if self._gen > self._waited and phys.size:
            g = int(self._block_gen[layer][phys].max())
            if g > self._layer_wait[layer]:
                self._layer_wait[layer] = g

    def _plan_batched(self, seqs: list[_Seq], geoms: list[tuple[int, int, int]], needed, transfer: StepTransfer,
                      loads: list[list[tuple[np.ndarray, np.ndarray]]], stale: list[list[bool]]) -> list[int]:
        """The plan of every (request, layer) pair of the step in one pass of array operations, for
        the layers where no pool pressure can arise (in row order, the free blocks before each row
        cover its new blocks). There the sequential rules (:meth:`_plan_layer`) do not depend on
        the order of the rows, and this gives the same working sets, LRU order, loads, deferrals
        and stale decisions (the physical ids may differ: the allocator hands them out in another
        order). Each layer's loads become one (host ids, physical ids) pair of arrays.

        A pair whose selection is the very object of its last plan, at the same block geometry, not
        stale then and untouched since (``_clean``), has the same working set, resident and last in
        LRU order: only its counters and its compute wait are renewed. The others ("dirty") are
        gathered into ``[pairs, width]`` masks (rows of the per-slot arrays). Returns the layers
        left for the sequential path."""
        L, b = self.layout.num_layers, len(seqs)
        S, W = self._table.shape[1], self._table.shape[2]
        slots = np.fromiter((s.slot for s in seqs), dtype=np.int64, count=b)
        geom = np.asarray(geoms, dtype=np.int64).reshape(b, 3)
        old_nb, first, new_nb = geom[:, 0], geom[:, 1], geom[:, 2]
        same = (self._geom[:, slots] == geom[None]).all(-1) & self._clean[:, slots] & ~self._stale[:, slots]
        # a pair's selection is the object of its last plan when its id is the one recorded (the
        # recorded object is kept alive in _src, so no other object can carry that id); 0 = None
        sid = np.array([[0 if w is None else id(w) for w in per_row] for per_row in needed], dtype=np.uint64)
        want_none = sid == 0
        same &= (self._src_id[:, slots] == sid) & ~want_none
        # the changed pairs record this plan's selection (ignored unless the pair ends clean, see below)
        cl, cr = np.nonzero(~same & ~want_none)
        objs = np.fromiter((w for per_row in needed for w in per_row), dtype=object, count=L * b).reshape(L, b)[cl, cr]
        self._src[cl, slots[cr]] = objs
        self._src_id[cl, slots[cr]] = sid[cl, cr]
        parts = [w if isinstance(w, np.ndarray) else np.fromiter(w, dtype=np.int64, count=len(w)) for w in objs]
        pairs = cl * b + cr
        dirty = np.flatnonzero(~same.reshape(-1))  # pair index layer * b + row, layer-major
        pl, pr = dirty // b, dirty % b
        P = dirty.size
        need = np.zeros((P, W), dtype=bool)
        if parts:
            sizes = np.fromiter((p.size for p in parts), dtype=np.int64, count=len(parts))
            ids = np.concatenate(parts).astype(np.int64, copy=False)
            pid = np.repeat(np.searchsorted(dirty, pairs), sizes)
            ok = (ids >= 0) & (ids < old_nb[pr[pid]])
            need.reshape(-1)[pid[ok] * W + ids[ok]] = True
        ar = np.arange(W, dtype=np.int16 if W <= np.iinfo(np.int16).max else np.int32)  # narrow: faster compares
        p_old, p_first, p_new = (x[pr][:, None].astype(ar.dtype) for x in (old_nb, first, new_nb))  # all <= W
        old_rng = ar < p_old
        want_sel = ~want_none[pl, pr]
        if not want_sel.all():
            need[~want_sel] |= old_rng[~want_sel]
        _mark_spans(need, p_first[:, 0], p_new[:, 0])
        prow = pl * S + slots[pr]  # row of the pair in the [L * S, W] views of the per-slot arrays
        tbl = self._table.reshape(L * S, W)[prow]  # [P, W] (a copy)
        resident = tbl != NULL_BLOCK
        missing_need = need & ~resident
        n_new = _row_counts(missing_need)
        st = cand = kept = np.zeros(P, dtype=bool)
        vis = need
        if self.overlap:
            # overlapped switch where the previous selection (+ the blocks opened since) is resident;
            # without pool pressure the room check of the sequential path always passes
            cand = want_sel & self._vis_set.reshape(-1)[prow] & (missing_need & old_rng).any(-1)
            c = np.flatnonzero(cand)
            if c.size:
                crow = prow[c]
                lo = np.minimum(self._vis_len.reshape(-1)[crow][:, None].astype(ar.dtype), p_first[c])
                old_vis = (self._vis.reshape(L * S, W)[crow] | (ar >= lo)) & (ar < p_new[c])
                ok_c = ~(old_vis & ~resident[c] & old_rng[c]).any(-1)
                kept = np.zeros(P, dtype=bool)
                kept[c] = ok_c
                st = cand & kept
                if ok_c.any():
                    vis = need.copy()
                    vis[c[ok_c]] = old_vis[ok_c]
        mask = need | vis if vis is not need else need
        spare = resident & ~mask
        n_evict = _row_counts(spare) - self.cache_blocks
        # pool pressure: in row order, the free blocks before each row (what the earlier rows
        # evicted and allocated) must cover its new blocks; a layer where they may not goes sequential
        delta = np.zeros((L, b), dtype=np.int64)
        n_new_lb = np.zeros((L, b), dtype=np.int64)
        n_new_lb[pl, pr] = n_new
        delta[pl, pr] = np.maximum(n_evict, 0) - n_new
        free = np.fromiter((a.num_free for a in self.allocators), dtype=np.int64, count=L)
        fits = (free[:, None] + np.cumsum(delta, axis=1) - delta >= n_new_lb).all(axis=1)
        if not fits.all():
            keep = fits[pl]
            (dirty, pl, pr, prow, need, old_rng, tbl, want_sel, cand, kept, st, vis, mask, spare, n_evict) = (
                x[keep] for x in (dirty, pl, pr, prow, need, old_rng, tbl, want_sel, cand, kept, st, vis, mask,
                                  spare, n_evict))
            p_old, p_new = p_old[keep], p_new[keep]
            same &= fits[:, None]
            P = dirty.size
        # the pairs that stand: counters and compute waits only
        sl, sr = np.nonzero(same)
        if sl.size:
            cnt = self._counts[sl, slots[sr]].sum(0)
            transfer.working_set_blocks += int(cnt[0])
            transfer.blocks_needed += int(cnt[1])
            self._note_standing(sl, slots[sr])
        for layer in np.flatnonzero(fits).tolist():
            stale[layer] = [False] * b
        if not P:
            return np.flatnonzero(~fits).tolist()
        transfer.stale_layers += int(st.sum())
        transfer.sync_switches += int((cand & ~kept).sum())
        self._vis.reshape(L * S, W)[prow] = vis
        self._vis_len.reshape(-1)[prow] = p_new[:, 0]
        self._vis_set.reshape(-1)[prow] = want_sel
        self._stale.reshape(-1)[prow] = st
        n_mask = _row_counts(mask)
        n_need = _row_counts(need & old_rng)
        transfer.working_set_blocks += int(n_mask.sum())
        transfer.blocks_needed += int(n_need.sum())
        counts = self._counts.reshape(L * S, 2)
        counts[prow, 0], counts[prow, 1] = n_mask, n_need
        self._geom.reshape(L * S, 3)[prow] = geom[pr]
        self._clean.reshape(-1)[prow] = want_sel
        changed = np.zeros(b, dtype=bool)
        table_flat, lru_flat = self._table.reshape(-1), self._lru.reshape(-1)
        # evict spare blocks (resident, not wanted) beyond the cache, least recently used first
        if (n_evict > 0).any():
            flat = np.flatnonzero(spare & (n_evict > 0)[:, None])
            ep, eb = np.divmod(flat, W)
            at = prow[ep] * W + eb
            lru_v = lru_flat[at]
            order = np.argsort(ep * (int(lru_v.max()) + 1) + lru_v)  # within a pair LRU values are distinct
            k = ep[order]
            rank = np.arange(k.size) - np.searchsorted(k, k, side="left")
            vic = order[rank < n_evict[k]]  # still in pair order, so layer-major
            vp, vb = ep[vic], eb[vic]
            bad = self._host_ids[slots[pr[vp]], vb] < 0
            if bad.any():
                i = int(np.flatnonzero(bad)[0])
                raise RuntimeError(
                    f"request {seqs[pr[vp[i]]].rid!r} layer {int(pl[vp[i]])}: evicting logical block {int(vb[i])} "
                    "that is not in the host store (only completed, written-back blocks may leave the device)"
                )
            self.allocators.free_many(pl[vp], tbl[vp, vb])
            tbl[vp, vb] = NULL_BLOCK
            table_flat[at[vic]] = NULL_BLOCK
            changed[pr[vp]] = True
            transfer.blocks_evicted += int(vp.size)
        # allocate the missing blocks; existing ones load from the host store (now, or beside the
        # step where the pair attends its stale selection), new ones are written by this step
        flat = np.flatnonzero(mask & (tbl == NULL_BLOCK))
        if flat.size:
            mp, mb = np.divmod(flat, W)
            ml = pl[mp]
            bounds = np.searchsorted(ml, np.arange(L + 1))
            phys = self.allocators.allocate_many(np.diff(bounds))
            table_flat[prow[mp] * W + mb] = phys
            changed[pr[mp]] = True
            old = mb < p_old[mp, 0]
            hids = self._host_ids[slots[pr[mp]], mb]
            bad = old & (hids < 0)
            if bad.any():
                i = int(np.flatnonzero(bad)[0])
                raise RuntimeError(
                    f"request {seqs[pr[mp[i]]].rid!r} layer {int(ml[i])}: logical block {int(mb[i])} is neither "
                    "resident nor in the host store (internal invariant broken)"
                )
            deferred = old & st[mp]
            now = old & ~deferred
            transfer.blocks_deferred += int(deferred.sum())
            for sel, out in ((now, loads), (deferred, self._deferred)):
                for layer, at in _layer_runs(ml, sel):
                    out[layer].append((hids[at], phys[at]))
            fresh = ~old
            if fresh.any():
                self._wait_fresh_many(ml[fresh], phys[fresh])
        for row in np.flatnonzero(changed).tolist():
            seqs[row].version += 1
        # the wanted blocks become the most recently used, in block order
        self._stamp += 1
        wp, wb = np.divmod(np.flatnonzero(mask), W)
        lru_flat[prow[wp] * W + wb] = self._stamp * W + wb
        # this step's compute waits for the last copies of the blocks it attends
        if self.copy_log is not None or self._gen > self._waited:
            vp, vb = np.divmod(np.flatnonzero(vis), W)
            phys = table_flat[prow[vp] * W + vb]
            if self.copy_log is not None:  # every read is logged, layer by layer
                bounds = np.searchsorted(pl[vp], np.arange(L + 1))
                for layer in np.flatnonzero(fits).tolist():
                    self._note_wait(layer, phys[bounds[layer] : bounds[layer + 1]])
            else:
                self._note_waits(pl[vp], phys)
        if st.any():
            flags = np.zeros((L, b), dtype=bool)
            flags[pl[st], pr[st]] = True
            for layer in np.unique(pl[st]).tolist():
                stale[layer] = flags[layer].tolist()
        return np.flatnonzero(~fits).tolist()

    def _note_standing(self, layers: np.ndarray, slots: np.ndarray) -> None:
        """The compute waits of (layer, slot) pairs whose working set stands from their last plan
        (:meth:`_plan_batched`): only where a copy newer than both the last wait and this layer's
        wait so far touched the layer's pool (with a copy log: every read is logged). All layers
        in one pass: each layer waits for the newest copy into or out of a block its standing
        pairs read (what :meth:`_note_wait` of each layer's blocks gives)."""
        if self.copy_log is not None:  # every read is logged, layer by layer
            for layer in np.unique(layers).tolist():
                sel = slots[layers == layer]
                tbl = self._table[layer, sel]
                self._note_wait(layer, tbl[self._vis[layer, sel] & (tbl != NULL_BLOCK)])
            return
        if self._gen <= self._waited or not layers.size:
            return
        floor = np.maximum(np.asarray(self._layer_wait, dtype=np.int64), self._waited)
        keep = (self._block_gen.max(axis=1) > floor)[layers]  # layers whose pool saw a newer copy
        if not keep.any():
            return
        li, si = layers[keep], slots[keep]
        tbl = self._table[li, si]  # [pairs, W]
        # the blocks read, pair-major (flat indices: a 2-D np.nonzero costs several times more)
        at = np.flatnonzero(self._vis[li, si] & (tbl != NULL_BLOCK))
        self._note_waits(li[at // tbl.shape[1]], tbl.reshape(-1)[at])

    def _note_waits(self, layer_of: np.ndarray, phys: np.ndarray) -> None:
        """:meth:`_note_wait` of many layers' blocks in one pass (no copy log): ``phys[i]`` is read in
        layer ``layer_of[i]`` (ascending); each layer waits for the newest copy of a block it reads."""
        if self._gen <= self._waited or not phys.size:
            return
        gens = self._block_gen.reshape(-1)[layer_of * self._block_gen.shape[1] + phys]
        starts = _run_starts(layer_of)  # each layer's first block
        for layer, g in zip(layer_of[starts].tolist(), np.maximum.reduceat(gens, starts).tolist(), strict=True):
            if g > self._layer_wait[layer]:
                self._layer_wait[layer] = g

    def _plan_layer(self, seq: _Seq, layer: int, want, geom: tuple[int, int, int],
                    loads: list[tuple[np.ndarray, np.ndarray]], transfer: StepTransfer, extra=None,
                    early: list[tuple[np.ndarray, np.ndarray]] | None = None, row: int = 0) -> bool:
        """The sequential path: working set of one (request, layer) for this step (the rules
        :meth:`_plan_batched` applies to all pairs at once where the pool has room): evict spare
        blocks beyond the LRU cache, allocate and schedule loads of the missing wanted blocks
        (evicting other requests' cached blocks under pool pressure), stamp the wanted blocks most
        recently used (in block order, as an LRU list would append them). Returns True when the
        step attends with the stale (previous) selection while the new blocks load (overlap).

        ``extra``: blocks a coming selection will need (early prefetch); made resident too, from
        free pool blocks only, with their loads in ``early`` (this step does not wait for them)."""
        old_nb, first_written, new_nb = geom
        slot = seq.slot
        tbl, lru = seq.table[layer], seq.lru[layer]
        need = np.zeros(new_nb, dtype=bool)
        if want is None:
            need[:old_nb] = True
        else:
            need[_as_ids(want, old_nb)] = True
        need[first_written:new_nb] = True
        resident = tbl[:new_nb] != NULL_BLOCK
        stale = False
        vis = need
        if (self.overlap and want is not None and self._vis_set[layer, slot]
                and (need[:old_nb] & ~resident[:old_nb]).any()):
            # overlapped switch: keep attending the previous selection (+ the blocks opened since)
            # while the new blocks load, if that set is still resident and the pool has room for both
            old_vis = self._vis[layer, slot, :new_nb].copy()
            old_vis[min(int(self._vis_len[layer, slot]), first_written):new_nb] = True
            n_new = int((need & ~resident).sum())
            room = self.allocators[layer].num_free + int((resident & ~(old_vis | need)).sum())
            if resident[:old_nb][old_vis[:old_nb]].all() and (room >= n_new or self._reclaimable(layer, seq) + room >= n_new):
                stale, vis = True, old_vis
                transfer.stale_layers += 1
            else:
                transfer.sync_switches += 1
        mask = need | vis
        early_blocks = np.zeros(0, dtype=np.int64)
        if extra is not None:
            ex = np.zeros(new_nb, dtype=bool)
            ex[_as_ids(extra, old_nb)] = True
            ex &= ~mask
            early_blocks = np.flatnonzero(ex & ~resident)
            # early prefetch uses free blocks only (never evicts for it); otherwise it waits its turn
            room = self.allocators[layer].num_free - int((mask & ~resident).sum())
            if early_blocks.size > room:
                transfer.prefetch_skipped += early_blocks.size
                early_blocks = early_blocks[:0]
                ex &= resident
            mask |= ex
        self._set_vis(layer, slot, vis, new_nb, want is not None, stale)
        # protected from pressure evictions in this plan: what the step reads or loads now; early
        # blocks that are already resident are only a cache for a coming selection
        self._step_want[(seq.rid, layer)] = mask if extra is None else (need | vis) | (mask & ~resident)
        wanted = np.flatnonzero(mask)
        transfer.working_set_blocks += wanted.size
        transfer.blocks_needed += int(need[:old_nb].sum())
        # evict spare blocks (resident, not wanted) beyond the cache, least recently used first
        spare = np.flatnonzero(resident & ~mask)
        n_evict = spare.size - self.cache_blocks
        if n_evict > 0:
            victims = spare[np.argsort(lru[spare], kind="stable")[:n_evict]]
            self._drop(seq, layer, victims)
            transfer.blocks_evicted += n_evict
        missing = wanted[tbl[wanted] == NULL_BLOCK]
        if missing.size:
            seq.version += 1
            now = missing[~np.isin(missing, early_blocks)] if early_blocks.size else missing
            if stale:
                # the new selection's blocks load beside this step (issue_deferred); only the
                # blocks the new tokens open are written by this step
                fresh = now[now >= old_nb]
                deferred, now = now[now < old_nb], fresh
                phys = self._allocate(layer, deferred.size)
                tbl[deferred] = phys
                dentry = (seq.host_ids[deferred], phys)
                self._deferred[layer].append(dentry)
                transfer.blocks_deferred += int(deferred.size)
            for blocks, out in ((now, loads), (early_blocks, early)):
                if not blocks.size:
                    continue
                phys = self._allocate(layer, blocks.size)
                tbl[blocks] = phys
                old = blocks < old_nb
                if old.any():
                    # existing blocks that were offloaded: fetch them from the host store
                    hids = seq.host_ids[blocks[old]]
                    if (hids < 0).any():
                        blk = int(blocks[old][np.flatnonzero(hids < 0)[0]])
                        raise RuntimeError(
                            f"request {seq.rid!r} layer {layer}: logical block {blk} is neither resident "
                            "nor in the host store (internal invariant broken)"
                        )
                    out.append((hids, phys[old]))
                    if out is early:
                        self._early_entries[layer].append((seq, out[-1], blocks))
            transfer.blocks_prefetched += int(early_blocks.size)
        self._stamp += 1
        lru[wanted] = self._stamp * self._table.shape[2] + wanted  # in block order, after every older stamp
        if new_nb > old_nb:
            self._wait_fresh(layer, tbl[old_nb:new_nb])
        self._note_wait(layer, tbl[np.flatnonzero(vis)])
        if stale:
            # kept for _unstale: pool pressure from a later row may turn this switch synchronous
            self._stale_entries[layer].append((seq, row, dentry, np.flatnonzero(vis[:old_nb] & ~need[:old_nb]),
                                               need))
        self._clean[layer, slot] = False  # planned here: the next batched plan recomputes the pair
        return stale

    def _set_vis(self, layer: int, slot: int, vis: np.ndarray, n: int, selected: bool, stale: bool) -> None:
        """Record the blocks a (request, layer) attends this step (``selected`` False: every block)."""
        self._vis[layer, slot] = False
        self._vis[layer, slot, :n] = vis
        self._vis_len[layer, slot] = n
        self._vis_set[layer, slot] = selected
        self._stale[layer, slot] = stale

    def _revoke_early(self, layer: int) -> bool:
        """Pool pressure: give back the blocks of the last early prefetch scheduled in this plan (a
        coming selection's; nothing reads them this step). False if none is left."""
        if not self._early_entries[layer]:
            return False
        seq, entry, blocks = self._early_entries[layer].pop()
        self._early_now[layer][:] = [e for e in self._early_now[layer] if e is not entry]
        self._drop(seq, layer, blocks)
        self._transfer.blocks_prefetched -= int(blocks.size)
        if (seq.rid, layer) in self._step_want:
            m = self._step_want[(seq.rid, layer)].copy()
            m[blocks] = False
            self._step_want[(seq.rid, layer)] = m
        return True

    def _unstale(self, layer: int) -> bool:
        """Pool pressure: turn the last stale (row, layer) switch of this plan synchronous: its
        deferred loads are issued before the forward (and waited for), the blocks only its old
        selection needed are freed, and the step attends its new selection. False if none is left."""
        if not self._stale_entries[layer]:
            return False
        seq, row, dentry, old_only, need = self._stale_entries[layer].pop()
        self._deferred[layer] = [d for d in self._deferred[layer] if d is not dentry]
        self._loads_now[layer].append(dentry)
        tr = self._transfer
        tr.blocks_deferred -= int(dentry[0].size)
        tr.stale_layers -= 1
        tr.sync_switches += 1
        old_only = old_only[seq.table[layer][old_only] != NULL_BLOCK]
        if old_only.size:
            self._drop(seq, layer, old_only)
            tr.blocks_evicted += int(old_only.size)
        mask = self._step_want[(seq.rid, layer)].copy()
        mask[old_only] = False
        self._step_want[(seq.rid, layer)] = mask
        self._set_vis(layer, seq.slot, need, need.size, True, False)
        self._stale_flags[layer][row] = False
        self._note_wait(layer, seq.table[layer][np.flatnonzero(need)])
        return True

    def _reclaimable(self, layer: int, seq: _Seq) -> int:
        """Cached blocks of *other* requests that pool pressure could evict now (see
        :meth:`_evict_under_pressure`); only counted when the pool looks short."""
        n = 0
        for other in self.seqs.values():
            if other is seq:
                continue
            cand = (other.table[layer] != NULL_BLOCK) & (other.host_ids >= 0)
            want = self._step_want.get((other.rid, layer))
            if want is not None:
                cand[: want.size] &= ~want
            n += int(cand.sum())
        return n

    def _allocate(self, layer: int, n: int) -> np.ndarray:
        alloc = self.allocators[layer]
        if alloc.num_free < n and self.offload:
            self._evict_under_pressure(layer, n - alloc.num_free)
            while alloc.num_free < n and (self._unstale(layer) or self._revoke_early(layer)):
                pass
        return alloc.allocate_array(n)

    def _drop(self, seq: _Seq, layer: int, blocks: np.ndarray) -> None:
        missing = blocks[seq.host_ids[blocks] < 0]
        if missing.size:
            raise RuntimeError(
                f"request {seq.rid!r} layer {layer}: evicting logical block {int(missing[0])} that is not in "
                "the host store (only completed, written-back blocks may leave the device)"
            )
        tbl = seq.table[layer]
        self.allocators[layer].free_array(tbl[blocks].astype(np.int64))
        tbl[blocks] = NULL_BLOCK
        seq.version += 1
        self._clean[layer, seq.slot] = False

    def _evict_under_pressure(self, layer: int, n: int) -> None:
        # Drop ``n`` cached blocks (written back, not needed by any row planned so far in this
        # step) of any request, in request order, least recently used first.
        for seq in self.seqs.values():
            tbl = seq.table[layer]
            cand = (tbl != NULL_BLOCK) & (seq.host_ids >= 0)
            want = self._step_want.get((seq.rid, layer))
            if want is not None:
                cand[: want.size] &= ~want
            blocks = np.flatnonzero(cand)
            if blocks.size == 0:
                continue
            blocks = blocks[np.argsort(seq.lru[layer][blocks], kind="stable")[:n]]
            self._drop(seq, layer, blocks)
            n -= blocks.size
            if n == 0:
                return

    # ------------------------------------------------------------------ copies
    def _pinned(self, name: str, numel: int, dtype: torch.dtype) -> torch.Tensor:
        """A reusable pinned host buffer of at least ``numel`` elements. The host waits for the
        event of its last use (the async copy that read it) before handing it out again, so a
        buffer is never overwritten before its copy ran; record the new use with :meth:`_used`."""
        buf, ev = self._staging.get(name, (None, None))
        if ev is not None:
            ev.synchronize()
        if buf is None or buf.numel() < numel or buf.dtype != dtype:
            buf = torch.empty(max(numel, 2 * (0 if buf is None else buf.numel())), dtype=dtype,
                              pin_memory=self.is_cuda)
        self._staging[name] = (buf, None)
        return buf

    def _used(self, name: str, stream) -> None:
        ev = torch.cuda.Event()
        ev.record(stream)
        self._staging[name] = (self._staging[name][0], ev)

    def _copy_layers(self, copies: list[list[tuple[np.ndarray, np.ndarray]]], *, to_device: bool,
                     after_forward_start: bool = False) -> list[int]:
        """Copy blocks of every layer between the host store and the device pool: ``copies[layer]``
        holds (host ids, physical ids) arrays. Each layer's copy gets a generation (module
        docstring). On CUDA the copies run on the side stream, which first waits for the compute
        work enqueued so far, or (``after_forward_start``: loads issued after the step's forward was
        enqueued) for the work enqueued before that forward. Loads move as ``load_method`` says;
        write-backs with one ``copy_blocks`` launch per layer. On the CPU: one indexed copy.
        Returns the generation of each layer's copy (0 = none)."""
        L = self.layout.num_layers
        gens = [0] * L
        layers = [layer for layer in range(L) if copies[layer]]
        if not layers:
            return gens
        per = {layer: (np.concatenate([h for h, _ in copies[layer]]),
                       np.concatenate([p for _, p in copies[layer]]).astype(np.int64)) for layer in layers}
        stream = self.copy_stream
        if stream is None:
            for layer in layers:
                hids, phys = (torch.from_numpy(x) for x in per[layer])
                if to_device:
                    self.pools[layer][phys] = self.host[layer][hids]
                else:
                    self.host[layer][hids] = self.pools[layer][phys]
                gens[layer] = self._next_gen(layer, per[layer][1], "load" if to_device else "write_back")
            return gens
        from ucm_trt.kernels.block_copy import copy_blocks

        if after_forward_start and self._forward_start is not None:
            stream.wait_event(self._forward_start)
        else:
            stream.wait_stream(torch.cuda.current_stream(self.layout.device))
        if self._dma is not None:
            return self._dma_layers(layers, per, to_device, stream)
        # every layer's ids in one pinned buffer and one upload
        sizes = [per[layer][0].size for layer in layers]
        total = sum(sizes)
        # a ring of id buffers: the host waits for the upload that read a buffer ID_STAGING_SLOTS batches
        # ago, not for the last one (whose event completes only after the side stream's earlier loads and
        # the compute work they wait for: one buffer made every plan that loads wait for the last loads)
        slot = f"ids{self._ids_turn % ID_STAGING_SLOTS}"
        self._ids_turn += 1
        ids_h = self._pinned(slot, 2 * total, torch.int64)
        off = 0
        for layer, n in zip(layers, sizes, strict=True):
            ids_h[off : off + n] = torch.from_numpy(per[layer][0])
            ids_h[total + off : total + off + n] = torch.from_numpy(per[layer][1])
            off += n
        staged = to_device and self.load_method == "staged"
        with torch.cuda.stream(stream), self._timed("load", stream, self.time_copies and to_device):
            ids = ids_h[: 2 * total].to(self.layout.device, non_blocking=True)
            self._used(slot, stream)
            off = 0
            for layer, n in zip(layers, sizes, strict=True):
                hids, phys = ids[off : off + n], ids[total + off : total + off + n]
                if staged:
                    self._staged_load(layer, torch.from_numpy(per[layer][0]), phys, stream)
                elif to_device:
                    copy_blocks(self.host[layer], self.pools[layer], hids, phys, guard=self.guard)
                else:
                    copy_blocks(self.pools[layer], self.host[layer], phys, hids, guard=self.guard)
                off += n
                gens[layer] = self._next_gen(layer, per[layer][1], "load" if to_device else "write_back")
        return gens

    def _dma_layers(self, layers: list[int], per: dict, to_device: bool, stream) -> list[int]:
        """``load_method="batch_dma"``: one ``cuMemcpyBatchAsync`` per layer (either direction) on
        the side stream (which already waits as :meth:`_copy_layers` says), one generation each. The
        addresses of every layer's blocks are computed in one pass; each layer's call reads its run."""
        gens = [0] * self.layout.num_layers
        if self._bases is None:  # the pools and the host store never move: their base addresses once
            self._bases = (np.array([t.data_ptr() for t in self.host], dtype=np.uint64),
                           np.array([t.data_ptr() for t in self.pools], dtype=np.uint64))
        host_base, pool_base = self._bases
        counts = [per[layer][0].size for layer in layers]
        layer_of = np.repeat(np.asarray(layers, dtype=np.int64), counts)
        bb = np.uint64(self.block_bytes)
        hids = np.concatenate([per[layer][0] for layer in layers]).astype(np.uint64)
        phys = np.concatenate([per[layer][1] for layer in layers]).astype(np.uint64)
        host = host_base[layer_of] + hids * bb
        dev = pool_base[layer_of] + phys * bb
        dst, src = (dev, host) if to_device else (host, dev)
        dst_at, src_at = dst.ctypes.data, src.ctypes.data  # fresh contiguous uint64 arrays, alive below
        with self._timed("load", stream, self.time_copies and to_device):
            off = 0
            for layer, n in zip(layers, counts, strict=True):
                self._dma.enqueue(dst_at + 8 * off, src_at + 8 * off, n, self.block_bytes, stream.cuda_stream)
                off += n
                gens[layer] = self._next_gen(layer, per[layer][1], "load" if to_device else "write_back")
        return gens

    @contextlib.contextmanager
    def _timed(self, kind: str, stream, on: bool):
        """With ``on`` (``time_copies``): GPU events on ``stream`` before and after what the body
        enqueues there, kept for :meth:`collect_timings` as ``kind`` ("load" or "wait")."""
        if not on:
            yield
            return
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record(stream)
        yield
        end.record(stream)
        self._timings.append((kind, start, end))

    def _staged_load(self, layer: int, hids: torch.Tensor, phys: torch.Tensor, stream) -> None:
        """``load_method="staged"``: CPU gather into pinned staging (two slots of at most
        ``STAGING_BLOCKS`` blocks, so gathering one chunk overlaps the DMA of the other), one
        DMA copy per chunk into a device staging slot, one ``index_copy_`` into the pool."""
        host, pool = self.host[layer], self.pools[layer]
        n = hids.numel()
        for k, lo in enumerate(range(0, n, STAGING_BLOCKS)):
            hi = min(n, lo + STAGING_BLOCKS)
            name = f"staging{k % 2}"
            buf = self._pinned(name, STAGING_BLOCKS * host[0].numel(), host.dtype)
            stage = buf[: (hi - lo) * host[0].numel()].view(hi - lo, *host.shape[1:])
            torch.index_select(host, 0, hids[lo:hi], out=stage)
            dev = self._device_staging(k % 2)[: hi - lo]
            dev.copy_(stage, non_blocking=True)
            self._used(name, stream)
            pool.index_copy_(0, phys[lo:hi], dev)

    def _device_staging(self, slot: int) -> torch.Tensor:
        key = f"device{slot}"
        buf = self._staging.get(key, (None, None))[0]
        if buf is None:
            buf = torch.empty(STAGING_BLOCKS, *self.pools[0].shape[1:], dtype=self.layout.dtype,
                              device=self.layout.device)
            self._staging[key] = (buf, None)
        return buf

    def _next_gen(self, layer: int, phys: np.ndarray, kind: str) -> int:
        """A new copy generation for ``phys`` of ``layer`` (recorded on the side stream on CUDA)."""
        self._gen += 1
        self._block_gen[layer][phys] = self._gen
        if self.copy_stream is not None:
            ev = torch.cuda.Event()
            ev.record(self.copy_stream)
            self._gen_events[self._gen] = ev
        if self.copy_log is not None:
            self.copy_log.append((kind, self._gen, layer, phys.copy()))
        return self._gen

    def _load(self, loads: list[list[tuple[np.ndarray, np.ndarray]]], transfer: StepTransfer, *,
              early: bool = False, deferred: bool = False) -> None:
        """Host -> device copies (side stream on CUDA). This step's forward waits for them (per
        layer), except ``early`` ones (a coming selection's) and ``deferred`` ones (the overlapped
        schedule's), which the step that first reads them waits for."""
        t0 = time.perf_counter()
        gens = self._copy_layers(loads, to_device=True, after_forward_start=deferred)
        if not (early or deferred):
            self._layer_wait = [max(w, g) for w, g in zip(self._layer_wait, gens, strict=True)]
        n = sum(h.size for parts in loads for h, _ in parts)
        transfer.load_seconds += time.perf_counter() - t0
        transfer.blocks_loaded += n
        transfer.bytes_h2d += n * self.block_bytes

    def issue_deferred(self, transfer: StepTransfer) -> None:
        """Issue the loads the last :meth:`plan_step` deferred (overlapped schedule, early prefetch):
        call it after the step's forward is enqueued (and after :meth:`mark_forward_start`). They
        wait for the compute work enqueued before that forward, and run beside it."""
        if any(self._deferred):
            self._load(self._deferred, transfer, deferred=True)
        self.drop_deferred()

    def drop_deferred(self) -> None:
        """Forget the loads the last :meth:`plan_step` deferred (after issuing them, or unissued: its
        step will not run, e.g. every request of it stopped and the engine frees them)."""
        self._deferred = [[] for _ in range(self.layout.num_layers)]

    def mark_forward_start(self) -> None:
        """Record (CUDA) where the compute stream stands before this step's forward: deferred loads
        into blocks evicted by this plan wait for it (the last step that could read them)."""
        if self.is_cuda:
            self._forward_start = torch.cuda.Event()
            self._forward_start.record(torch.cuda.current_stream(self.layout.device))

    def layer_waits(self) -> list[torch.cuda.Event | None]:
        """Per layer, the event this step's compute must wait for before the layer reads or writes
        its pool (None = nothing to wait for), and mark those generations waited: the caller must
        wait on every returned event (``StepContext`` does, per layer, or all before a graph
        replay). On the CPU every entry is None (copies are synchronous)."""
        if self._step_waits is not None:
            return self._step_waits  # asked again in the same step (e.g. a second context): same answer
        need = max(self._layer_wait)
        out: list[torch.cuda.Event | None] = [None] * self.layout.num_layers
        if need > self._waited:
            for layer, g in enumerate(self._layer_wait):
                if g > self._waited:
                    out[layer] = self._gen_events.get(g)
            self._set_waited(need)
        if self.copy_log is not None:
            self.copy_log += [("step_wait", 0, layer, g) for layer, g in enumerate(self._layer_wait)]
        self._layer_wait = [0] * self.layout.num_layers
        self._step_waits = out
        return out

    def wait_on(self, event: torch.cuda.Event) -> None:
        """Make the compute stream wait for ``event`` (timed with ``time_copies``)."""
        cur = torch.cuda.current_stream(self.layout.device)
        with self._timed("wait", cur, self.time_copies):
            cur.wait_event(event)

    def collect_timings(self) -> tuple[float, float]:
        """GPU milliseconds of the loads and of the compute stream's waits for them, over the timed
        copies that have finished since the last call (``time_copies``; no host wait)."""
        load = wait = 0.0
        left = []
        for kind, a, b in self._timings:
            if not b.query():
                left.append((kind, a, b))
                continue
            ms = a.elapsed_time(b)
            if kind == "load":
                load += ms
            else:
                wait += ms
        self._timings = left
        return load, wait

    def synchronize(self) -> None:
        """Host wait for every copy issued so far and drop loads a failed step left unissued
        (error paths and teardown only)."""
        self.drop_deferred()
        if self.copy_stream is not None:
            self.copy_stream.synchronize()
        self._waited = self._gen
        self._gen_events.clear()

    def _write_tables(self, rids: list[str]) -> None:
        """Copy the block-table rows that changed since their last upload (or moved to another row)
        into the pinned host mirror (every layer of a row in one copy), check them (one pass) and
        upload them in one copy. The host waits for the previous upload from the mirror before it
        writes into it (normally long finished)."""
        changed, slots = [], []
        for row, rid in enumerate(rids):
            seq = self.seqs[rid]
            key = (seq.serial, seq.version)
            if self._uploaded[row] != key:
                changed.append(row)
                slots.append(seq.slot)
                self._uploaded[row] = key
        if not changed:
            return
        if self._tables_event is not None:
            self._tables_event.synchronize()
        th = self.tables_host.numpy()
        th[:, changed] = self._table[:, slots, : self.max_blocks]  # every changed row in one indexed copy
        lo, hi = changed[0], changed[-1] + 1
        n_dev = self.pools[0].shape[0]
        outside = th[:, lo:hi].view(np.uint32) >= n_dev  # a negative id reads as a large unsigned one
        if outside.any():
            rid = rids[lo + int(np.flatnonzero(outside.any(axis=(0, 2)))[0])]
            raise RuntimeError(f"request {rid!r}: block table holds ids outside the device pool "
                               f"[0, {n_dev}) (internal invariant broken)")
        th = self.tables_host
        self.tables[:, lo:hi].copy_(th[:, lo:hi], non_blocking=self.is_cuda)
        if self.is_cuda:
            self._tables_event = torch.cuda.Event()
            self._tables_event.record(torch.cuda.current_stream(self.layout.device))

    # ------------------------------------------------------------------ writes
    def slots(self, rid: str, layer: int, start: int, count: int) -> tuple[list[int], list[int]]:
        """Physical block and in-block offset of logical positions ``start .. start+count-1``."""
        seq = self._seq(rid)
        bs = self.layout.block_size
        pos = np.arange(start, start + count)
        phys = seq.table[layer][pos // bs]
        if (phys == NULL_BLOCK).any():
            p = int(pos[np.flatnonzero(phys == NULL_BLOCK)[0]])
            raise RuntimeError(f"request {rid!r} layer {layer}: block {p // bs} of position {p} is not resident")
        return phys.tolist(), (pos % bs).tolist()

    def write_back(self, rids: list[str], transfer: StepTransfer) -> None:
        """Copy blocks that filled up during the last step to the host store (offload only).

        The partial last block is never written: the local window keeps it on the device.
        On CUDA the copies run on the side stream after this step's forward; a later user of the
        block (a new token written into it after its eviction) waits for them (module docstring).
        """
        if not self.offload:
            return
        bs = self.layout.block_size
        L = self.layout.num_layers
        copies: list[list[tuple[np.ndarray, np.ndarray]]] = [[] for _ in range(L)]
        for rid in rids:
            seq = self._seq(rid)
            full = seq.seq_len // bs
            if full <= seq.flushed:
                continue
            blocks = np.arange(seq.flushed, full)
            phys = seq.table[:, blocks]  # [L, n]
            if (phys == NULL_BLOCK).any():
                layer, j = (int(x[0]) for x in np.nonzero(phys == NULL_BLOCK))
                raise RuntimeError(
                    f"request {rid!r} layer {layer}: block {int(blocks[j])} filled up but is not resident "
                    "(internal invariant broken)"
                )
            hids = self.host_allocator.allocate_array(blocks.size)
            seq.host_ids[blocks] = hids
            for layer in range(L):
                copies[layer].append((hids, phys[layer]))
            seq.flushed = full
        if not any(copies):
            return
        self._copy_layers(copies, to_device=False)
        n = sum(h.size for parts in copies for h, _ in parts)
        transfer.blocks_written_back += n
        transfer.bytes_d2h += n * self.block_bytes

    # ------------------------------------------------------------------ reads (policies)
    def gather_keys(self, rid: str, layer: int, blocks: list[int] | None = None) -> torch.Tensor:
        """K of resident logical ``blocks`` (default all) as ``[n, Hkv, block_size, D]`` (device)."""
        seq = self._seq(rid)
        if blocks is None:
            blocks = list(range(self.num_blocks(rid)))
        idx = np.asarray(blocks, dtype=np.int64)
        phys = seq.table[layer][idx]
        if (phys == NULL_BLOCK).any():
            missing = idx[phys == NULL_BLOCK].tolist()
            raise RuntimeError(f"request {rid!r} layer {layer}: blocks {missing[:8]} are not resident")
        return self.pools[layer][torch.from_numpy(phys.astype(np.int64)).to(self.layout.device), 0]
