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
* Working set, per (request, layer): the resident logical blocks, held as a numpy block-table
  row plus last-use stamps (LRU order). Each step the policy names the blocks a layer needs
  (sink + local + selected); :meth:`KVManager.plan_step` computes with vector operations which
  blocks to evict (unneeded ones beyond ``cache_blocks`` of LRU cache) and which to copy in (delta
  prefetch, host -> device: one :func:`ucm_trt.kernels.copy_blocks` launch per layer on a side
  CUDA stream on GPU, reading the pinned store directly; an indexed copy on the CPU).

Without offload every block of every request stays resident and the host store is not built.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass

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
    ``allocate_array`` / ``free_array`` do the same on numpy arrays (the offload planner's path).
    """

    def __init__(self, num_blocks: int, *, first: int = 0, name: str = "pool") -> None:
        check_positive_int("num_blocks", num_blocks)
        check_non_negative_int("first", first)
        if first >= num_blocks:
            raise ValueError(f"first ({first}) must be < num_blocks ({num_blocks})")
        self.name = name
        self.num_blocks = num_blocks
        self.first = first
        # free stack: the top (end) is handed out first; starts with `first` on top
        self._stack = np.arange(num_blocks - 1, first - 1, -1, dtype=np.int64)
        self._top = num_blocks - first
        self._used = np.zeros(num_blocks, dtype=bool)
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
        inside = (ids >= 0) & (ids < self.num_blocks)
        ok = inside.copy()
        ok[inside] = self._used[ids[inside]]
        if ok.all() and np.unique(ids).size != ids.size:
            _, first = np.unique(ids, return_index=True)
            dup = np.setdiff1d(np.arange(ids.size), first)[0]
            ok[dup] = False  # the second free of the same id in one call
        if not ok.all():
            bad = int(ids[np.flatnonzero(~ok)[0]])
            raise ValueError(f"{self.name}: block {bad} is not allocated (double free or foreign id)")
        self._used[ids] = False
        self._stack[self._top : self._top + ids.size] = ids
        self._top += ids.size
        self._num_used -= ids.size

    def free(self, ids) -> None:
        self.free_array(np.fromiter((int(i) for i in ids), dtype=np.int64))


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


def _as_ids(blocks, limit: int) -> np.ndarray:
    """Logical block ids (a set, sequence or int64 array) below ``limit`` as an int64 array."""
    ids = blocks if isinstance(blocks, np.ndarray) else np.fromiter(blocks, dtype=np.int64, count=len(blocks))
    return ids[(ids >= 0) & (ids < limit)]


class _Seq:
    """KV state of one request: per layer a block table row (logical -> physical, ``NULL_BLOCK``
    where not resident) and the last-use stamps of the resident blocks (LRU order), plus the host
    store id of every written-back logical block. Arrays, so a plan updates a working set with a
    few vector operations instead of a Python loop over its blocks."""

    __slots__ = ("rid", "seq_len", "host_ids", "table", "lru", "flushed", "last_want", "last_src", "last_geom",
                 "last_counts")

    def __init__(self, rid: str, num_layers: int, max_blocks: int) -> None:
        self.rid = rid
        self.seq_len = 0
        self.host_ids = np.full(max_blocks, -1, dtype=np.int64)  # -1: not written back yet
        self.table = np.zeros((num_layers, max_blocks), dtype=np.int32)
        # per layer: stamp of each resident block's last use (larger = more recent)
        self.lru = np.zeros((num_layers, max_blocks), dtype=np.int64)
        self.flushed = 0  # completed blocks written back to the host store
        # per layer: the want mask of the previous plan (offload), to skip unchanged steps
        self.last_want: list[np.ndarray | None] = [None] * num_layers
        self.last_src: list[object] = [None] * num_layers  # the ``needed`` object that produced it
        self.last_geom: list[tuple[int, int, int] | None] = [None] * num_layers
        self.last_counts: list[tuple[int, int]] = [(0, 0)] * num_layers  # (working set, needed existing)

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
        self._early_event = None  # early-prefetch copies of the last plan (side stream)
        self._step_want: dict[tuple[str, int], np.ndarray] = {}  # this plan: want mask per (request, layer)
        self._stamp = 0  # LRU clock of the working sets
        self.seqs: dict[str, _Seq] = {}

    # ------------------------------------------------------------------ requests
    def add_request(self, rid: str) -> None:
        if rid in self.seqs:
            raise ValueError(f"request id {rid!r} is already active")
        self.seqs[rid] = _Seq(rid, self.layout.num_layers, self.max_blocks)

    def free_request(self, rid: str) -> None:
        """Return every device and host block of ``rid``."""
        self._sync_copies()
        self._sync_early()  # a block being filled by an early prefetch must not be handed out again
        seq = self._seq(rid)
        for layer in range(self.layout.num_layers):
            tbl = seq.table[layer]
            self.allocators[layer].free_array(tbl[tbl != NULL_BLOCK])
        seq.table.fill(NULL_BLOCK)
        if self.host_allocator is not None:
            self.host_allocator.free_array(seq.host_ids[seq.host_ids >= 0])
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
    ) -> None:
        """Make room for the new tokens and bring every needed block into each layer's working set.

        ``needed[layer][row]`` is the set (or int64 numpy array) of *existing* logical blocks the
        row's attention reads in that layer (``None`` = all blocks). The blocks that will receive the new tokens are
        always made resident. Writes the block tables (host mirror, then device) for rows
        ``0..len(rids)-1`` in this order.

        ``prefetch[layer][row]`` (offload only; optional): blocks a coming selection will need
        (``Policy.prefetch``). They are loaded too, on the side stream, but this step's forward
        does not wait for them (the next plan's does), and only into free pool blocks; they stay
        resident while named here. Attention still reads only ``needed``.
        """
        if len(rids) > self.max_batch:
            raise ValueError(f"batch of {len(rids)} requests exceeds max_batch = {self.max_batch}")
        bs = self.layout.block_size
        L = self.layout.num_layers
        self._sync_copies()  # write-backs must land before a block may be evicted
        if self._early_event is not None:
            # the last step's early prefetch must land before anything reads or reuses those blocks
            torch.cuda.current_stream(self.layout.device).wait_event(self._early_event)
            self._early_event = None
        loads: list[list[tuple[np.ndarray, np.ndarray]]] = [[] for _ in range(L)]  # per layer (host ids, phys)
        early: list[list[tuple[np.ndarray, np.ndarray]]] = [[] for _ in range(L)]
        self._step_want = {}
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
                if new_nb > old_nb:
                    for layer in range(L):
                        seq.table[layer, old_nb:new_nb] = self.allocators[layer].allocate_array(new_nb - old_nb)
                transfer.working_set_blocks += new_nb * L
                seq.seq_len = new_len
                continue
            geom = (old_nb, first_written, new_nb)
            for layer in range(L):
                extra = None if prefetch is None else prefetch[layer][row]
                self._plan_layer(seq, layer, needed[layer][row], geom, loads[layer], transfer, extra, early[layer])
            seq.seq_len = new_len
        if any(loads):
            self._load(loads, transfer)
        if any(early):
            self._load(early, transfer, early=True)
        self._write_tables(rids)

    def _plan_layer(self, seq: _Seq, layer: int, want, geom: tuple[int, int, int],
                    loads: list[tuple[np.ndarray, np.ndarray]], transfer: StepTransfer, extra=None,
                    early: list[tuple[np.ndarray, np.ndarray]] | None = None) -> None:
        """Working set of one (request, layer) for this step: evict spare blocks beyond the LRU
        cache, allocate and schedule loads of the missing wanted blocks, stamp the wanted blocks
        most recently used (in block order, as an LRU list would append them).

        ``extra``: blocks a coming selection will need (early prefetch); made resident too, from
        free pool blocks only, with their loads in ``early`` (this step does not wait for them)."""
        old_nb, first_written, new_nb = geom
        tbl, lru = seq.table[layer], seq.lru[layer]
        last = seq.last_want[layer]
        src = (want, extra)
        if (want is not None and last is not None and seq.last_src[layer] is not None
                and src[0] is seq.last_src[layer][0] and src[1] is seq.last_src[layer][1]
                and geom == seq.last_geom[layer] and (tbl[: last.size][last] != NULL_BLOCK).all()):
            # the very objects of the last plan (the engine reuses them while the policy's
            # selections are unchanged) at the same block geometry: the same working set, resident
            self._step_want[(seq.rid, layer)] = last
            n_work, n_need = seq.last_counts[layer]
            transfer.working_set_blocks += n_work
            transfer.blocks_needed += n_need
            return
        seq.last_src[layer], seq.last_geom[layer] = src, geom
        need = np.zeros(new_nb, dtype=bool)
        if want is None:
            need[:old_nb] = True
        else:
            need[_as_ids(want, old_nb)] = True
        need[first_written:new_nb] = True
        mask = need.copy()
        resident = tbl[:new_nb] != NULL_BLOCK
        early_blocks = np.zeros(0, dtype=np.int64)
        if extra is not None:
            ex = np.zeros(new_nb, dtype=bool)
            ex[_as_ids(extra, old_nb)] = True
            ex &= ~need
            early_blocks = np.flatnonzero(ex & ~resident)
            # early prefetch uses free blocks only (never evicts for it); otherwise it waits its turn
            room = self.allocators[layer].num_free - int((need & ~resident).sum())
            if early_blocks.size > room:
                transfer.prefetch_skipped += early_blocks.size
                early_blocks = early_blocks[:0]
                ex &= resident
            mask |= ex
        self._step_want[(seq.rid, layer)] = mask
        wanted = np.flatnonzero(mask)
        n_need = int(need[:old_nb].sum())
        seq.last_counts[layer] = (wanted.size, n_need)
        transfer.working_set_blocks += wanted.size
        transfer.blocks_needed += n_need
        if last is not None and last.size == mask.size and np.array_equal(last, mask) and resident[mask].all():
            # the working set of this layer's previous step (between retrievals), all still
            # resident and already last in LRU order: nothing to evict, load or reorder
            return
        seq.last_want[layer] = mask
        # evict spare blocks (resident, not wanted) beyond the cache, least recently used first
        spare = np.flatnonzero(resident & ~mask)
        n_evict = spare.size - self.cache_blocks
        if n_evict > 0:
            victims = spare[np.argsort(lru[spare], kind="stable")[:n_evict]]
            self._drop(seq, layer, victims)
            transfer.blocks_evicted += n_evict
        missing = wanted[tbl[wanted] == NULL_BLOCK]
        if missing.size:
            now = missing[~np.isin(missing, early_blocks)] if early_blocks.size else missing
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
            transfer.blocks_prefetched += int(early_blocks.size)
        self._stamp += 1
        lru[wanted] = self._stamp * self.max_blocks + np.arange(wanted.size)

    def _allocate(self, layer: int, n: int) -> np.ndarray:
        alloc = self.allocators[layer]
        if alloc.num_free < n and self.offload:
            self._evict_under_pressure(layer, n - alloc.num_free)
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

    def _copy_layers(self, copies: list[list[tuple[np.ndarray, np.ndarray]]], *, to_device: bool) -> int:
        """Copy blocks of every layer between the host store and the device pool: ``copies[layer]``
        holds (host ids, physical ids) arrays. On CUDA: one ``copy_blocks`` launch per layer on the
        side stream, reading / writing the pinned store over the bus; on the CPU: one indexed copy.
        Returns the number of blocks copied (all layers)."""
        total = 0
        stream = self.copy_stream
        if stream is not None:
            from ucm_trt.kernels.block_copy import copy_blocks

            stream.wait_stream(torch.cuda.current_stream(self.layout.device))
        for layer, parts in enumerate(copies):
            if not parts:
                continue
            ids = torch.from_numpy(np.stack([np.concatenate([h for h, _ in parts]),
                                             np.concatenate([p for _, p in parts]).astype(np.int64)]))
            hids, phys = ids[0], ids[1]
            total += hids.numel()
            if stream is None:
                if to_device:
                    self.pools[layer][phys] = self.host[layer][hids]
                else:
                    self.host[layer][hids] = self.pools[layer][phys]
                continue
            with torch.cuda.stream(stream):
                ids = ids.pin_memory().to(self.layout.device, non_blocking=True)
                if to_device:
                    copy_blocks(self.host[layer], self.pools[layer], ids[0], ids[1])
                else:
                    copy_blocks(self.pools[layer], self.host[layer], ids[1], ids[0])
        return total

    def _load(self, loads: list[list[tuple[np.ndarray, np.ndarray]]], transfer: StepTransfer, *,
              early: bool = False) -> None:
        """Host -> device copies on the side stream. This step's forward waits for them, except
        ``early`` ones (a coming selection's), which the next plan waits for."""
        t0 = time.perf_counter()
        n = self._copy_layers(loads, to_device=True)
        if self.copy_stream is not None:
            ev = torch.cuda.Event()
            ev.record(self.copy_stream)
            if early:
                self._early_event = ev
            else:
                torch.cuda.current_stream(self.layout.device).wait_event(ev)
        transfer.load_seconds += time.perf_counter() - t0
        transfer.blocks_loaded += n
        transfer.bytes_h2d += n * self.block_bytes

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
        pos = np.arange(start, start + count)
        phys = seq.table[layer][pos // bs]
        if (phys == NULL_BLOCK).any():
            p = int(pos[np.flatnonzero(phys == NULL_BLOCK)[0]])
            raise RuntimeError(f"request {rid!r} layer {layer}: block {p // bs} of position {p} is not resident")
        return phys.tolist(), (pos % bs).tolist()

    def write_back(self, rids: list[str], transfer: StepTransfer) -> None:
        """Copy blocks that filled up during the last step to the host store (offload only).

        The partial last block is never written: the local window keeps it on the device.
        On CUDA the copies run on the side stream; the next plan waits for them before evicting.
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
        n = self._copy_layers(copies, to_device=False)
        if self.copy_stream is not None:
            self._pending_event = torch.cuda.Event()
            self._pending_event.record(self.copy_stream)
        transfer.blocks_written_back += n
        transfer.bytes_d2h += n * self.block_bytes

    def _sync_copies(self) -> None:
        if self._pending_event is not None:
            self._pending_event.synchronize()
            self._pending_event = None

    def _sync_early(self) -> None:
        if self._early_event is not None:
            self._early_event.synchronize()
            self._early_event = None

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
