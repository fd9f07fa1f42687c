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
  host memory (pinned when the device is CUDA). Every *completed* block of every layer is written
  back to it once (device -> host, when it fills); the partial last block is always resident
  because the local window holds it. One host id per logical block, shared by all layers.
* Working set, per (request, layer): the resident logical blocks, in LRU order. Each step the
  policy names the blocks a layer needs (sink + local + selected); :meth:`KVManager.plan_step`
  copies in only the missing ones (delta prefetch, host -> device, on a side CUDA stream when
  on GPU) and evicts unneeded blocks beyond ``cache_blocks`` of LRU cache.

Without offload every block of every request stays resident and the host store is not built.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np
import torch

from ucm_trt._validation import check_non_negative_int, check_positive_int

__all__ = [
    "NULL_BLOCK",
    "BlockAllocator",
    "KVLayout",
    "KVManager",
    "PoolExhaustedError",
    "StepTransfer",
]

NULL_BLOCK = 0


class PoolExhaustedError(RuntimeError):
    """A block pool has no free block left; the message names the pool and the sizes."""


class BlockAllocator:
    """Free-list allocator of block ids ``[first, num_blocks)``.

    ``allocate`` pops from the free list (LIFO, so recently freed blocks are reused first),
    ``free`` returns blocks; freeing a block that is not allocated raises ``ValueError``
    (double free or foreign id), so leaks and double frees are caught where they happen.
    """

    def __init__(self, num_blocks: int, *, first: int = 0, name: str = "pool") -> None:
        check_positive_int("num_blocks", num_blocks)
        check_non_negative_int("first", first)
        if first >= num_blocks:
            raise ValueError(f"first ({first}) must be < num_blocks ({num_blocks})")
        self.name = name
        self.num_blocks = num_blocks
        self.first = first
        self._free: list[int] = list(range(num_blocks - 1, first - 1, -1))
        self._used: set[int] = set()

    @property
    def capacity(self) -> int:
        return self.num_blocks - self.first

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return len(self._used)

    def allocate(self, n: int = 1) -> list[int]:
        check_non_negative_int("n", n)
        if n > len(self._free):
            raise PoolExhaustedError(
                f"{self.name}: cannot allocate {n} block(s), {len(self._free)} free of {self.capacity}; "
                "raise the pool size (RuntimeConfig.num_device_blocks / num_host_blocks) or lower "
                "max_batch / max_seq_len"
            )
        out = [self._free.pop() for _ in range(n)]
        self._used.update(out)
        return out

    def free(self, ids) -> None:
        for i in ids:
            i = int(i)
            if i not in self._used:
                raise ValueError(f"{self.name}: block {i} is not allocated (double free or foreign id)")
            self._used.remove(i)
            self._free.append(i)


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
    loaded: list[tuple[str, int, int]] = field(default_factory=list)  # (request, layer, logical)


class _Seq:
    """KV state of one request."""

    __slots__ = ("rid", "seq_len", "host_ids", "resident", "table", "flushed", "last_want", "last_src", "last_geom")

    def __init__(self, rid: str, num_layers: int, max_blocks: int) -> None:
        self.rid = rid
        self.seq_len = 0
        self.host_ids: list[int] = []  # logical block -> host block id (-1: not written back yet)
        # per layer: logical -> physical, in LRU order (most recently used last)
        self.resident: list[OrderedDict[int, int]] = [OrderedDict() for _ in range(num_layers)]
        # the same mapping as a block table [L, max_blocks] (NULL_BLOCK where not resident), kept
        # in step with ``resident`` so a plan copies one row per request instead of rebuilding it
        self.table = np.zeros((num_layers, max_blocks), dtype=np.int32)
        self.flushed = 0  # completed blocks written back to the host store
        # per layer: the blocks the previous plan made resident (offload), to skip unchanged steps
        self.last_want: list[set[int] | None] = [None] * num_layers
        self.last_src: list[object] = [None] * num_layers  # the ``needed`` object that produced it
        self.last_geom: list[tuple[int, int, int] | None] = [None] * num_layers

    def set_resident(self, layer: int, blk: int, phys: int) -> None:
        self.resident[layer][blk] = phys
        self.table[layer, blk] = phys

    def drop_resident(self, layer: int, blk: int) -> int:
        phys = self.resident[layer].pop(blk)
        self.table[layer, blk] = NULL_BLOCK
        return phys


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
        self.allocators = [BlockAllocator(num_device_blocks, first=1, name=f"device pool of layer {i}") for i in range(L)]
        # block tables: device buffer + host mirror (pinned on CUDA)
        self.tables = torch.zeros(L, max_batch, max_blocks, dtype=torch.int32, device=dev)
        self.tables_host = torch.zeros(L, max_batch, max_blocks, dtype=torch.int32, pin_memory=self.is_cuda)
        # host block store
        if offload:
            self.host = [
                torch.zeros(num_host_blocks, 2, H, bs, D, dtype=layout.dtype, pin_memory=self.is_cuda)
                for _ in range(L)
            ]
            self.host_allocator = BlockAllocator(num_host_blocks, name="host block store")
        else:
            self.host = []
            self.host_allocator = None
        self.copy_stream = torch.cuda.Stream(device=dev) if self.is_cuda else None
        self._pending_event = None
        self._step_want: dict[tuple[str, int], set[int]] = {}
        self.seqs: dict[str, _Seq] = {}

    # ------------------------------------------------------------------ requests
    def add_request(self, rid: str) -> None:
        if rid in self.seqs:
            raise ValueError(f"request id {rid!r} is already active")
        self.seqs[rid] = _Seq(rid, self.layout.num_layers, self.max_blocks)

    def free_request(self, rid: str) -> None:
        """Return every device and host block of ``rid``."""
        self._sync_copies()
        seq = self._seq(rid)
        for layer, res in enumerate(seq.resident):
            self.allocators[layer].free(res.values())
            res.clear()
        seq.table.fill(NULL_BLOCK)
        if self.host_allocator is not None:
            self.host_allocator.free([h for h in seq.host_ids if h >= 0])
        del self.seqs[rid]

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
        return sorted(self._seq(rid).resident[layer])

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
    ) -> None:
        """Make room for the new tokens and bring every needed block into each layer's working set.

        ``needed[layer][row]`` is the set of *existing* logical blocks the row's attention reads
        in that layer (``None`` = all blocks). The blocks that will receive the new tokens are
        always made resident. Writes the block tables (host mirror, then device) for rows
        ``0..len(rids)-1`` in this order.
        """
        if len(rids) > self.max_batch:
            raise ValueError(f"batch of {len(rids)} requests exceeds max_batch = {self.max_batch}")
        bs = self.layout.block_size
        self._sync_copies()  # write-backs must land before a block may be evicted
        loads: list[tuple[int, int, int]] = []  # (layer, host id, physical)
        self._step_want: dict[tuple[str, int], set[int]] = {}
        for row, (rid, t) in enumerate(zip(rids, num_new_tokens, strict=True)):
            seq = self._seq(rid)
            old_nb = (seq.seq_len + bs - 1) // bs
            new_len = seq.seq_len + t
            if new_len > self.max_blocks * bs:
                raise ValueError(
                    f"request {rid!r}: sequence length {new_len} exceeds the planned maximum "
                    f"{self.max_blocks * bs} (RuntimeConfig.max_seq_len)"
                )
            new_nb = (new_len + bs - 1) // bs
            first_written = seq.seq_len // bs  # block that receives the first new token
            if not self.offload:
                # every block stays resident: only the blocks the new tokens open are allocated
                for layer in range(self.layout.num_layers):
                    for blk in range(old_nb, new_nb):
                        seq.set_resident(layer, blk, self._allocate(layer))
                transfer.working_set_blocks += new_nb * self.layout.num_layers
                seq.seq_len = new_len
                while len(seq.host_ids) < new_nb:
                    seq.host_ids.append(-1)
                continue
            for layer in range(self.layout.num_layers):
                res = seq.resident[layer]
                want = needed[layer][row]
                geom = (old_nb, first_written, new_nb)
                last = seq.last_want[layer]
                if (want is not None and last is not None and want is seq.last_src[layer] and geom == seq.last_geom[layer]
                        and res.keys() >= last):
                    # the very set object of the last plan (the engine reuses it while the policy's
                    # selection is unchanged) at the same block geometry: the same working set
                    transfer.working_set_blocks += len(last)
                    self._step_want[(rid, layer)] = last
                    transfer.blocks_needed += len(last) - max(0, new_nb - old_nb)
                    continue
                seq.last_src[layer], seq.last_geom[layer] = want, geom
                if want is None:
                    want_set = set(range(old_nb))
                else:
                    want_set = {b for b in want if 0 <= b < old_nb}
                want_set.update(range(first_written, new_nb))
                transfer.working_set_blocks += len(want_set)
                self._step_want[(rid, layer)] = want_set
                if seq.last_want[layer] == want_set and res.keys() >= want_set:
                    # the working set of this layer's previous step (between retrievals), all still
                    # resident and already last in LRU order: nothing to evict, load or reorder
                    transfer.blocks_needed += len(want_set) - max(0, new_nb - old_nb)
                    continue
                seq.last_want[layer] = want_set
                # evict first (frees room), then load the misses
                self._evict(seq, layer, want_set, transfer)
                for blk in sorted(want_set):
                    existing = blk < old_nb
                    if existing:
                        transfer.blocks_needed += 1
                    if blk in res:
                        res.move_to_end(blk)
                        continue
                    phys = self._allocate(layer)
                    seq.set_resident(layer, blk, phys)
                    if existing:
                        # an existing block that was offloaded: fetch it from the host store
                        host_id = seq.host_ids[blk]
                        if host_id < 0:
                            raise RuntimeError(
                                f"request {rid!r} layer {layer}: logical block {blk} is neither resident "
                                "nor in the host store (internal invariant broken)"
                            )
                        loads.append((layer, host_id, phys))
                        transfer.loaded.append((rid, layer, blk))
            seq.seq_len = new_len
            while len(seq.host_ids) < new_nb:
                seq.host_ids.append(-1)
        if loads:
            self._load(loads, transfer)
        self._write_tables(rids)

    def _allocate(self, layer: int) -> int:
        alloc = self.allocators[layer]
        if alloc.num_free == 0 and self.offload:
            self._evict_under_pressure(layer)
        return alloc.allocate(1)[0]

    def _evict(self, seq: _Seq, layer: int, want: set[int], transfer: StepTransfer) -> None:
        if not self.offload:
            return
        res = seq.resident[layer]
        spare = [b for b in res if b not in want]  # LRU order
        for blk in spare[: max(0, len(spare) - self.cache_blocks)]:
            self._drop(seq, layer, blk)
            transfer.blocks_evicted += 1

    def _drop(self, seq: _Seq, layer: int, blk: int) -> None:
        if seq.host_ids[blk] < 0:
            raise RuntimeError(
                f"request {seq.rid!r} layer {layer}: evicting logical block {blk} that is not in the "
                "host store (only completed, written-back blocks may leave the device)"
            )
        phys = seq.drop_resident(layer, blk)
        self.allocators[layer].free([phys])

    def _evict_under_pressure(self, layer: int) -> None:
        # Drop one cached block (written back, not needed by any row of this step) of any request.
        for seq in self.seqs.values():
            want = self._step_want.get((seq.rid, layer), set())
            for blk in seq.resident[layer]:  # LRU order
                if blk not in want and seq.host_ids[blk] >= 0:
                    self._drop(seq, layer, blk)
                    return

    def _load(self, loads: list[tuple[int, int, int]], transfer: StepTransfer) -> None:
        t0 = time.perf_counter()
        stream = self.copy_stream
        if stream is not None:
            stream.wait_stream(torch.cuda.current_stream(self.layout.device))
            with torch.cuda.stream(stream):
                for layer, hid, phys in loads:
                    self.pools[layer][phys].copy_(self.host[layer][hid], non_blocking=True)
            ev = torch.cuda.Event()
            ev.record(stream)
            torch.cuda.current_stream(self.layout.device).wait_event(ev)
        else:
            for layer, hid, phys in loads:
                self.pools[layer][phys].copy_(self.host[layer][hid])
        transfer.load_seconds += time.perf_counter() - t0
        transfer.blocks_loaded += len(loads)
        transfer.bytes_h2d += len(loads) * self.block_bytes

    def _write_tables(self, rids: list[str]) -> None:
        th = self.tables_host
        for row, rid in enumerate(rids):
            th[:, row] = torch.from_numpy(self.seqs[rid].table)
        b = len(rids)
        self.tables[:, :b].copy_(th[:, :b], non_blocking=self.is_cuda)

    # ------------------------------------------------------------------ writes
    def slots(self, rid: str, layer: int, start: int, count: int) -> tuple[list[int], list[int]]:
        """Physical block and in-block offset of logical positions ``start .. start+count-1``."""
        seq = self._seq(rid)
        bs = self.layout.block_size
        res = seq.resident[layer]
        blocks, offs = [], []
        for p in range(start, start + count):
            blk = p // bs
            if blk not in res:
                raise RuntimeError(f"request {rid!r} layer {layer}: block {blk} of position {p} is not resident")
            blocks.append(res[blk])
            offs.append(p % bs)
        return blocks, offs

    def write_back(self, rids: list[str], transfer: StepTransfer) -> None:
        """Copy blocks that filled up during the last step to the host store (offload only).

        The partial last block is never written: the local window keeps it on the device.
        On CUDA the copies run on the side stream; the next plan waits for them before evicting.
        """
        if not self.offload:
            return
        bs = self.layout.block_size
        copies: list[tuple[int, int, int]] = []  # (layer, phys, host)
        for rid in rids:
            seq = self._seq(rid)
            full = seq.seq_len // bs
            if full <= seq.flushed:
                continue
            hids = self.host_allocator.allocate(full - seq.flushed)
            for blk, hid in zip(range(seq.flushed, full), hids, strict=True):
                seq.host_ids[blk] = hid
                for layer in range(self.layout.num_layers):
                    copies.append((layer, seq.resident[layer][blk], hid))
            seq.flushed = full
        if not copies:
            return
        stream = self.copy_stream
        if stream is not None:
            stream.wait_stream(torch.cuda.current_stream(self.layout.device))
            with torch.cuda.stream(stream):
                for layer, phys, hid in copies:
                    self.host[layer][hid].copy_(self.pools[layer][phys], non_blocking=True)
            self._pending_event = torch.cuda.Event()
            self._pending_event.record(stream)
        else:
            for layer, phys, hid in copies:
                self.host[layer][hid].copy_(self.pools[layer][phys])
        transfer.blocks_written_back += len(copies)
        transfer.bytes_d2h += len(copies) * self.block_bytes

    def _sync_copies(self) -> None:
        if self._pending_event is not None:
            self._pending_event.synchronize()
            self._pending_event = None

    # ------------------------------------------------------------------ reads (policies)
    def gather_keys(self, rid: str, layer: int, blocks: list[int] | None = None) -> torch.Tensor:
        """K of resident logical ``blocks`` (default all) as ``[n, Hkv, block_size, D]`` (device)."""
        seq = self._seq(rid)
        res = seq.resident[layer]
        if blocks is None:
            blocks = list(range(self.num_blocks(rid)))
        missing = [b for b in blocks if b not in res]
        if missing:
            raise RuntimeError(f"request {rid!r} layer {layer}: blocks {missing[:8]} are not resident")
        phys = torch.tensor([res[b] for b in blocks], dtype=torch.long, device=self.layout.device)
        return self.pools[layer][phys, 0]
