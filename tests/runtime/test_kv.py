"""Block allocator, KV manager working sets, delta prefetch accounting, leak checks."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from ucm_trt.runtime.kv import (
    NULL_BLOCK,
    BlockAllocator,
    KVLayout,
    KVManager,
    PoolExhaustedError,
    StepTransfer,
)

L, H, BS, D = 2, 2, 4, 8


def _layout():
    return KVLayout(num_layers=L, num_kv_heads=H, head_dim=D, block_size=BS, dtype=torch.float32,
                    device=torch.device("cpu"))


def _value(layer: int, pos: int) -> float:
    return 1000.0 * layer + pos + 1.0


def _fill(kv: KVManager, rid: str, start: int, count: int) -> None:
    """Write a recognisable K/V for positions start..start+count-1 (what the backend does)."""
    for layer in range(L):
        blocks, offs = kv.slots(rid, layer, start, count)
        for p, b, o in zip(range(start, start + count), blocks, offs, strict=True):
            kv.pools[layer][b, 0, :, o] = _value(layer, p)
            kv.pools[layer][b, 1, :, o] = -_value(layer, p)


def _check_block_contents(kv: KVManager, rid: str, layer: int, blk: int) -> None:
    phys = int(kv.tables_host[layer, 0, blk])
    assert phys != NULL_BLOCK
    n = min(BS, kv.seq_len(rid) - blk * BS)
    want = torch.tensor([_value(layer, blk * BS + o) for o in range(n)])
    assert torch.equal(kv.pools[layer][phys, 0, 0, :n, 0], want)
    assert torch.equal(kv.pools[layer][phys, 1, 1, :n, D - 1], -want)


def test_allocator_basics_and_errors():
    a = BlockAllocator(5, first=1, name="test pool")
    got = a.allocate(4)
    assert sorted(got) == [1, 2, 3, 4] and a.num_free == 0
    with pytest.raises(PoolExhaustedError, match="test pool: cannot allocate 1 block"):
        a.allocate(1)
    a.free([2])
    with pytest.raises(ValueError, match="block 2 is not allocated"):
        a.free([2])
    with pytest.raises(ValueError, match="block 0 is not allocated"):
        a.free([0])  # the reserved null block is never handed out
    for foreign in (5, -1):  # outside the pool: refused, nothing freed
        with pytest.raises(ValueError, match=f"block {foreign} is not allocated"):
            a.free([1, foreign])
    assert a.num_used == 3
    a.free([1, 3, 4])
    assert a.num_free == 4 and a.num_used == 0
    with pytest.raises(ValueError, match="first"):
        BlockAllocator(3, first=3)


def test_allocator_no_leak_over_10k_random_steps():
    rng = random.Random(0)
    a = BlockAllocator(64, first=1)
    held: list[int] = []
    for _ in range(10_000):
        if held and (rng.random() < 0.5 or a.num_free == 0):
            k = rng.randint(1, len(held))
            rng.shuffle(held)
            a.free(held[:k])
            held = held[k:]
        else:
            held += a.allocate(rng.randint(1, min(4, a.num_free)))
        assert a.num_used == len(held) == len(set(held))
        assert a.num_used + a.num_free == 63
    a.free(held)
    assert a.num_free == 63


def test_dense_manager_keeps_every_block_and_frees_all():
    kv = KVManager(_layout(), max_batch=2, max_blocks=8, num_device_blocks=20, offload=False)
    kv.add_request("a")
    tr = StepTransfer()
    kv.plan_step(["a"], [10], [[None]] * L, tr)
    _fill(kv, "a", 0, 10)
    for step in range(5):
        kv.plan_step(["a"], [1], [[{0}]] * L, tr)  # a selection is ignored without offload
        _check_tables_match_residency(kv, ["a"])
        _fill(kv, "a", 10 + step, 1)
    assert kv.resident_blocks("a", 0) == [0, 1, 2, 3]
    for blk in range(4):
        _check_block_contents(kv, "a", 1, blk)
    assert tr.bytes_h2d == 0 and tr.bytes_d2h == 0
    kv.free_request("a")
    assert kv.device_blocks_held() == 0


def _prefill(kv: KVManager, rid: str, n: int, tr: StepTransfer) -> None:
    kv.add_request(rid)
    kv.plan_step([rid], [n], [[None]] * L, tr)
    _fill(kv, rid, 0, n)
    kv.write_back([rid], tr)


@pytest.mark.parametrize("cache_blocks", [0, 2])
def test_offload_delta_prefetch_accounting_and_contents(cache_blocks):
    """bytes moved == blocks that had to be loaded x block bytes, where the loaded blocks are exactly
    the needed ones that were not resident (tracked independently here, LRU included)."""
    rng = random.Random(1 + cache_blocks)
    kv = KVManager(_layout(), max_batch=1, max_blocks=32, num_device_blocks=64, offload=True,
                   num_host_blocks=64, cache_blocks=cache_blocks)
    tr = StepTransfer()
    _prefill(kv, "r", 50, tr)  # 12 full blocks + a partial one
    assert tr.blocks_written_back == 12 * L and tr.bytes_d2h == 12 * L * kv.block_bytes
    # model of the working set: per layer an LRU list
    model = [list(range(13)) for _ in range(L)]
    n = 50
    total_loaded = 0
    need = None
    for _ in range(60):
        nb = -(-n // BS)
        if need is None or rng.random() < 0.5:  # else: the previous step's selection (between retrievals)
            need = [set(rng.sample(range(nb), k=min(nb, 5))) | {nb - 1} for _ in range(L)]
        tr = StepTransfer()
        kv.plan_step(["r"], [1], [[need[layer]] for layer in range(L)], tr)
        new_nb = -(-(n + 1) // BS)
        expected_loads = expected_needed = 0
        for layer in range(L):
            want = set(need[layer]) | set(range(n // BS, new_nb))
            expected_needed += sum(1 for b in want if b < nb)
            lru = model[layer]
            spare = [b for b in lru if b not in want]
            evict = spare[: max(0, len(spare) - cache_blocks)]
            lru = [b for b in lru if b not in evict]
            for b in sorted(want):
                if b in lru:
                    lru.remove(b)
                elif b < nb:
                    expected_loads += 1
                lru.append(b)
            model[layer] = lru
            assert kv.resident_blocks("r", layer) == sorted(lru)
        assert tr.blocks_loaded == expected_loads
        assert tr.blocks_needed == expected_needed
        assert tr.bytes_h2d == expected_loads * kv.block_bytes
        total_loaded += tr.blocks_loaded
        _fill(kv, "r", n, 1)
        n += 1
        kv.write_back(["r"], tr)
        for layer in range(L):
            for b in need[layer]:
                if b < nb:
                    _check_block_contents(kv, "r", layer, b)  # loaded bytes are the right bytes
    assert total_loaded > 0
    kv.free_request("r")
    assert kv.device_blocks_held() == 0 and kv.host_bytes_held() == 0


def test_offload_pool_pressure_evicts_cached_blocks_and_errors_when_full():
    kv = KVManager(_layout(), max_batch=2, max_blocks=16, num_device_blocks=1 + 8, offload=True,
                   num_host_blocks=64, cache_blocks=8)
    tr = StepTransfer()
    _prefill(kv, "a", 16, tr)  # 4 full blocks resident
    kv.plan_step(["a"], [1], [[{0}]] * L, tr)  # blocks 1..3 become cache, block 4 takes the new token
    _fill(kv, "a", 16, 1)
    assert kv.resident_blocks("a", 0) == [0, 1, 2, 3, 4]
    _prefill(kv, "b", 16, tr)  # needs 4 blocks, 3 free: the LRU cached block of "a" is evicted
    assert kv.resident_blocks("b", 0) == [0, 1, 2, 3]
    assert kv.resident_blocks("a", 0) == [0, 2, 3, 4]
    # every block of both sequences at once: 5 + 5 > 8
    with pytest.raises(PoolExhaustedError, match="device pool of layer 0"):
        kv.plan_step(["a", "b"], [1, 1], [[{0, 1, 2, 3}, {0, 1, 2, 3}]] * L, StepTransfer())


def _check_tables_match_residency(kv: KVManager, rows: list[str]) -> None:
    """The block tables written by the plan map exactly the resident blocks of each row, built
    here independently from the working sets (every other entry is the null block)."""
    for row, rid in enumerate(rows):
        for layer in range(L):
            want = torch.full((kv.max_blocks,), NULL_BLOCK, dtype=torch.int32)
            for blk, phys in kv.seqs[rid].resident[layer].items():
                want[blk] = phys
            assert torch.equal(kv.tables_host[layer, row], want), (rid, layer)
            assert torch.equal(kv.tables[layer, row], want), (rid, layer)


def test_manager_no_leak_over_10k_steps_with_request_churn():
    rng = random.Random(7)
    kv = KVManager(_layout(), max_batch=3, max_blocks=16, num_device_blocks=1 + 3 * 16, offload=True,
                   num_host_blocks=3 * 16, cache_blocks=1)
    live: dict[str, int] = {}
    ids = 0
    for _ in range(10_000):
        if len(live) < 3 and rng.random() < 0.2:
            rid = f"r{ids}"
            ids += 1
            n = rng.randint(1, 20)
            _prefill(kv, rid, n, StepTransfer())
            live[rid] = n
            continue
        if not live:
            continue
        rows = list(live)
        needed = []
        for _layer in range(L):
            per = []
            for rid in rows:
                nb = -(-live[rid] // BS)
                per.append(set(rng.sample(range(nb), k=min(nb, 2))))
            needed.append(per)
        tr = StepTransfer()
        kv.plan_step(rows, [1] * len(rows), needed, tr)
        _check_tables_match_residency(kv, rows)
        kv.write_back(rows, tr)
        for rid in rows:
            live[rid] += 1
            if live[rid] >= 60 or rng.random() < 0.02:
                kv.free_request(rid)
                del live[rid]
    for rid in list(live):
        kv.free_request(rid)
    assert kv.device_blocks_held() == 0
    assert all(a.num_free == a.capacity for a in kv.allocators)
    assert kv.host_allocator.num_free == kv.host_allocator.capacity


def test_manager_rejects_bad_arguments():
    with pytest.raises(ValueError, match="num_device_blocks must be >= 2"):
        KVManager(_layout(), max_batch=1, max_blocks=4, num_device_blocks=1, offload=False)
    with pytest.raises(ValueError, match="num_host_blocks must be >= 1 with offload=True"):
        KVManager(_layout(), max_batch=1, max_blocks=4, num_device_blocks=8, offload=True)
    kv = KVManager(_layout(), max_batch=1, max_blocks=4, num_device_blocks=8, offload=False)
    kv.add_request("x")
    with pytest.raises(ValueError, match="already active"):
        kv.add_request("x")
    with pytest.raises(ValueError, match="exceeds the planned maximum 16"):
        kv.plan_step(["x"], [17], [[None]] * L, StepTransfer())
    with pytest.raises(ValueError, match="exceeds max_batch"):
        kv.plan_step(["x", "x"], [1, 1], [[None, None]] * L, StepTransfer())


def test_early_prefetch_makes_coming_blocks_resident_from_free_blocks_only():
    kv = KVManager(_layout(), max_batch=1, max_blocks=16, num_device_blocks=1 + 6, offload=True,
                   num_host_blocks=16, cache_blocks=0)
    tr = StepTransfer()
    _prefill(kv, "r", 24, tr)  # 6 full blocks, written back
    kv.plan_step(["r"], [1], [[{0}]] * L, StepTransfer())  # working set: 0 + block 6 (new token)
    _fill(kv, "r", 24, 1)
    assert kv.resident_blocks("r", 0) == [0, 6]
    # a coming selection {2, 3}: loaded early (not needed by this step), contents right
    tr = StepTransfer()
    kv.plan_step(["r"], [1], [[{0}]] * L, tr, prefetch=[[{2, 3}]] * L)
    _fill(kv, "r", 25, 1)
    assert kv.resident_blocks("r", 0) == [0, 2, 3, 6]
    assert tr.blocks_prefetched == 2 * L and tr.blocks_loaded == 2 * L and tr.blocks_needed == 2 * L  # 0 and 6
    for layer in range(L):
        for blk in (2, 3):
            phys = int(kv.seqs["r"].table[layer, blk])
            want = torch.tensor([_value(layer, blk * BS + o) for o in range(BS)])
            assert torch.equal(kv.pools[layer][phys, 0, 0, :, 0], want)
    # the step that switches to {2, 3} loads nothing; block 0 leaves (no cache)
    tr = StepTransfer()
    kv.plan_step(["r"], [1], [[{2, 3}]] * L, tr)
    assert tr.blocks_loaded == 0 and tr.blocks_evicted == 1 * L
    assert kv.resident_blocks("r", 0) == [2, 3, 6]
    _fill(kv, "r", 26, 1)
    # not enough free blocks (3 of 6 free) for a coming selection of 4 blocks: it is left for later
    tr = StepTransfer()
    kv.plan_step(["r"], [1], [[{2}]] * L, tr, prefetch=[[{0, 1, 4, 5, 7}]] * L)  # 7: not a block yet
    assert tr.prefetch_skipped == 4 * L and tr.blocks_prefetched == 0 and tr.blocks_loaded == 0
    assert kv.resident_blocks("r", 0) == [2, 6]
    kv.free_request("r")
    assert kv.device_blocks_held() == 0


class _LRUModel:
    """Reference working-set model (lists and dicts, block by block), written from the documented
    rules: per (request, layer) an LRU list; a plan evicts spare blocks beyond ``cache`` (least
    recent first), then walks the wanted blocks in order, moving hits to the end and appending
    misses; a miss that finds the pool empty first drops the least recent written-back block not
    wanted this step, scanning requests in insertion order."""

    def __init__(self, capacity: int, cache: int) -> None:
        self.capacity, self.cache = capacity, cache
        self.lru: dict[tuple[str, int], list[int]] = {}
        self.flushed: dict[str, int] = {}
        self.want: dict[tuple[str, int], set[int]] = {}

    def used(self, layer: int) -> int:
        return sum(len(v) for (r, lay), v in self.lru.items() if lay == layer)

    def add(self, rid: str) -> None:
        self.flushed[rid] = 0
        for layer in range(L):
            self.lru[(rid, layer)] = []

    def free(self, rid: str) -> None:
        del self.flushed[rid]
        for layer in range(L):
            del self.lru[(rid, layer)]

    def plan(self, rows: list[tuple[str, int, int]], needed) -> tuple[int, int]:
        """rows: (rid, seq_len before, new tokens); returns (loaded, evicted)."""
        loaded = evicted = 0
        self.want = {}
        for row, (rid, n, t) in enumerate(rows):
            old_nb, new_nb, first = -(-n // BS), -(-(n + t) // BS), n // BS
            for layer in range(L):
                w = needed[layer][row]
                want = set(range(old_nb)) if w is None else {b for b in w if 0 <= b < old_nb}
                want |= set(range(first, new_nb))
                self.want[(rid, layer)] = want
                lru = self.lru[(rid, layer)]
                spare = [b for b in lru if b not in want]
                for b in spare[: max(0, len(spare) - self.cache)]:
                    lru.remove(b)
                    evicted += 1
                for b in sorted(want):
                    if b in lru:
                        lru.remove(b)
                        lru.append(b)
                        continue
                    if self.used(layer) == self.capacity:
                        self._pressure(layer)
                    lru.append(b)
                    loaded += b < old_nb
        return loaded, evicted

    def _pressure(self, layer: int) -> None:
        for (rid, lay), lru in self.lru.items():
            if lay != layer:
                continue
            want = self.want.get((rid, layer), set())
            for b in lru:
                if b not in want and b < self.flushed[rid]:
                    lru.remove(b)
                    return
        raise PoolExhaustedError("model: pool full")


def test_array_working_sets_follow_the_reference_lru_model_under_pool_pressure():
    """Three requests, a pool too small for their working sets plus caches (pressure evictions
    across requests), repeated and changing selections: after every plan the resident blocks of
    every (request, layer) and the blocks loaded equal the reference model's."""
    rng = random.Random(11)
    cap, cache = 11, 2  # about 100 pressure evictions across requests over the run
    kv = KVManager(_layout(), max_batch=3, max_blocks=16, num_device_blocks=1 + cap, offload=True,
                   num_host_blocks=3 * 16, cache_blocks=cache)
    model = _LRUModel(cap, cache)
    lens: dict[str, int] = {}
    prev = None
    for i, n in enumerate((14, 9, 11)):
        rid = f"r{i}"
        kv.add_request(rid)
        model.add(rid)
        tr = StepTransfer()
        kv.plan_step([rid], [n], [[None]] * L, tr)
        model.plan([(rid, 0, n)], [[None]] * L)
        _fill(kv, rid, 0, n)
        kv.write_back([rid], tr)
        model.flushed[rid] = n // BS
        lens[rid] = n
    for step in range(120):
        rows = list(lens)
        if prev is not None and rng.random() < 0.4:
            needed = prev
        else:
            needed = [[set(rng.sample(range(-(-lens[r] // BS)), k=min(2, -(-lens[r] // BS)))) for r in rows]
                      for _ in range(L)]
        prev = needed
        tr = StepTransfer()
        try:
            kv.plan_step(rows, [1] * len(rows), needed, tr)
            kv_error = None
        except PoolExhaustedError as exc:
            kv_error = exc
        try:
            loaded, evicted = model.plan([(r, lens[r], 1) for r in rows], needed)
            model_error = None
        except PoolExhaustedError as exc:
            model_error = exc
        assert (kv_error is None) == (model_error is None), (step, kv_error, model_error)
        if kv_error is not None:
            break
        assert tr.blocks_loaded == loaded and tr.blocks_evicted == evicted, step
        for r in rows:
            for layer in range(L):
                assert kv.resident_blocks(r, layer) == sorted(model.lru[(r, layer)]), (step, r, layer)
                assert list(kv.seqs[r].resident[layer]) == model.lru[(r, layer)], (step, r, layer)  # LRU order
        _check_tables_match_residency(kv, rows)
        for r in rows:
            _fill(kv, r, lens[r], 1)
            lens[r] += 1
        kv.write_back(rows, tr)
        for r in rows:
            model.flushed[r] = lens[r] // BS
            for layer in range(L):
                for b in model.lru[(r, layer)]:  # every resident block holds its own tokens
                    phys = int(kv.seqs[r].table[layer, b])
                    n = min(BS, lens[r] - b * BS)
                    want = torch.tensor([_value(layer, b * BS + o) for o in range(n)])
                    assert torch.equal(kv.pools[layer][phys, 0, 0, :n, 0], want), (step, r, layer, b)
        if lens[rows[0]] > 50:  # the longest request finishes; a new one would not fit: stop
            break
    for r in list(lens):
        kv.free_request(r)
    assert kv.device_blocks_held() == 0 and kv.host_bytes_held() == 0


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_overlapped_plans_keep_what_each_step_attends_resident_and_right_under_pressure(seed):
    """KV level, overlapped schedule, three requests, a pool small enough for pressure evictions,
    selections that change at random (as new objects) or stay (the same object): after every plan
    the blocks the step attends — the new selection, or where the plan says stale the previous
    step's attended blocks plus the blocks opened since — are resident and hold their K/V (so a
    stale step never reads a block that a deferred load or an eviction is reusing), deferred loads
    land by the next step (contents checked when that step attends them), and nothing leaks."""
    rng = random.Random(seed)
    kv = KVManager(_layout(), max_batch=3, max_blocks=40, num_device_blocks=24, offload=True,
                   num_host_blocks=120, cache_blocks=1, overlap=True)
    rids = ["a", "b", "c"]
    lens = {}
    for i, rid in enumerate(rids):
        tr = StepTransfer()
        _prefill(kv, rid, 60 + 7 * i, tr)
        lens[rid] = 60 + 7 * i
    attended: dict[tuple[str, int], set[int]] = {}
    sels: dict[tuple[str, int], np.ndarray] = {}
    stale_seen = sync_seen = 0
    for _ in range(80):
        needed = [[None] * 3 for _ in range(L)]
        for row, rid in enumerate(rids):
            nb = -(-lens[rid] // BS)
            for layer in range(L):
                key = (rid, layer)
                if key not in sels or rng.random() < 0.3:  # a retrieval: a new selection object
                    sels[key] = np.array(sorted({0, nb - 1, *rng.sample(range(nb), k=min(nb, 4))}), dtype=np.int64)
                needed[layer][row] = sels[key]
        tr = StepTransfer()
        stale = kv.plan_step(rids, [1] * 3, needed, tr)
        stale_seen += tr.stale_layers
        sync_seen += tr.sync_switches
        for row, rid in enumerate(rids):
            n = lens[rid]
            opened = set(range(n // BS, -(-(n + 1) // BS)))
            for layer in range(L):
                key = (rid, layer)
                if stale[layer][row]:
                    seen = attended[key] | opened
                else:
                    seen = {int(b) for b in needed[layer][row] if b < -(-n // BS)} | opened
                attended[key] = seen
                tbl = kv.tables_host[layer, row]
                assert all(int(tbl[b]) != NULL_BLOCK for b in seen), (rid, layer, sorted(seen))
                for blk in seen:
                    if blk * BS < n:  # blocks holding tokens before this step's
                        phys = int(kv.tables_host[layer, row, blk])
                        k = min(BS, n - blk * BS)
                        want = torch.tensor([_value(layer, blk * BS + o) for o in range(k)])
                        assert torch.equal(kv.pools[layer][phys, 0, 0, :k, 0], want), (rid, layer, blk)
        for rid in rids:
            _fill(kv, rid, lens[rid], 1)  # the forward writes the new token
            lens[rid] += 1
        kv.issue_deferred(tr)
        kv.write_back(rids, tr)
    assert stale_seen > 0 and sync_seen > 0  # both kinds of switch happened
    for rid in rids:
        kv.free_request(rid)
    assert kv.device_blocks_held() == 0 and kv.host_bytes_held() == 0


def test_standing_pairs_wait_for_the_newest_copy_of_a_block_they_read():
    """``_note_standing`` (all layers in one pass) gives each layer the wait of the per-layer rule: the
    newest copy generation among the visible, resident blocks of its standing pairs, where the layer's
    pool saw a copy newer than the last wait and the layer's wait so far; on random tables, visibility,
    copy generations and earlier waits (the per-layer rule is restated here as the reference)."""
    n_layers, slots, width, pool = 5, 4, 12, 40
    layout = KVLayout(num_layers=n_layers, num_kv_heads=H, head_dim=D, block_size=BS, dtype=torch.float32,
                      device=torch.device("cpu"))
    raised = skipped = 0
    for seed in range(20):
        rng = np.random.default_rng(seed)
        kv = KVManager(layout, max_batch=slots, max_blocks=width, num_device_blocks=pool, offload=True,
                       num_host_blocks=64)
        kv._table[...] = rng.integers(0, pool, kv._table.shape) * (rng.random(kv._table.shape) < 0.7)
        kv._vis[...] = rng.random(kv._vis.shape) < 0.5
        kv._block_gen[...] = rng.integers(0, 30, kv._block_gen.shape) * (rng.random(kv._block_gen.shape) < 0.3)
        kv._gen, kv._waited = 30, int(rng.integers(0, 12))
        kv._block_gen[int(rng.integers(n_layers))] = 0  # a layer whose pool saw no copy
        kv._layer_wait = [int(x) for x in rng.integers(0, 25, n_layers)]
        # a layer whose copies are all waited for already (none newer than the last wait): no wait, even
        # where its own wait so far is lower
        low = int(rng.integers(n_layers))
        kv._block_gen[low] = np.minimum(kv._block_gen[low], kv._waited)
        kv._layer_wait[low] = 0
        before = list(kv._layer_wait)
        layers, slot_ids = np.nonzero(rng.random((n_layers, slots)) < 0.6)
        want = list(before)
        for layer in np.unique(layers).tolist():  # the per-layer rule
            if kv._block_gen[layer].max() <= max(kv._waited, want[layer]):
                skipped += 1
                continue
            tbl = kv._table[layer, slot_ids[layers == layer]]
            read = tbl[kv._vis[layer, slot_ids[layers == layer]] & (tbl != NULL_BLOCK)]
            if read.size:
                want[layer] = max(want[layer], int(kv._block_gen[layer][read].max()))
        kv._note_standing(layers, slot_ids)
        assert kv._layer_wait == want, seed
        raised += want != before
    assert raised >= 5 and skipped >= 5  # both branches of the rule were exercised


def test_mark_spans_sets_each_rows_range_and_nothing_else():
    """``_mark_spans`` (the batched planner's "blocks the new tokens open") against a plain loop: spans of
    0, 1, a few and more than 8 blocks (the wide path), on rows that already hold marks."""
    from ucm_trt.runtime.kv import _mark_spans

    rng = np.random.default_rng(0)
    for longest in (0, 1, 3, 8, 20):
        rows, width = 17, 40
        mask = rng.random((rows, width)) < 0.2
        start = rng.integers(0, width - longest, rows) if longest < width else np.zeros(rows, dtype=np.int64)
        stop = start + rng.integers(0, longest + 1, rows)
        want = mask.copy()
        for i in range(rows):
            want[i, start[i] : stop[i]] = True
        _mark_spans(mask, start, stop)
        assert (mask == want).all(), longest


def test_row_counts_equal_count_nonzero():
    """``_row_counts`` (eight mask bytes per multiply) against ``np.count_nonzero(axis=1)``: full and empty
    rows, widths that are and are not multiples of 8, a non-contiguous view (the fallback)."""
    from ucm_trt.runtime.kv import _row_counts

    rng = np.random.default_rng(1)
    for width in (8, 64, 2048, 13):
        mask = rng.random((9, width)) < 0.3
        mask[0], mask[1] = True, False
        assert (_row_counts(mask) == np.count_nonzero(mask, axis=1)).all(), width
    wide = rng.random((5, 32)) < 0.5
    assert (_row_counts(wide[:, ::2]) == np.count_nonzero(wide[:, ::2], axis=1)).all()


def test_layer_allocators_free_and_allocate_many_as_the_per_layer_calls_would():
    """``LayerAllocators.free_many`` / ``allocate_many`` (every layer in one pass) against per-layer
    ``BlockAllocator`` twins over random rounds: the same ids handed out in the same order, the same free
    counts; a refused call (an id out of the pool, one not in use, one freed twice, a pool too small)
    names the pool and id like the per-layer call and changes nothing."""
    from ucm_trt.runtime.kv import LayerAllocators

    rng = np.random.default_rng(3)
    n_layers, n = 4, 30
    many = LayerAllocators(n_layers, n, first=1, name="pool {layer}")
    twins = [BlockAllocator(n, first=1, name=f"pool {i}") for i in range(n_layers)]
    held = [[] for _ in range(n_layers)]
    for _ in range(200):
        counts = np.array([rng.integers(0, min(6, t.num_free) + 1) for t in twins])
        got = many.allocate_many(counts)
        want = [t.allocate_array(int(c)) for t, c in zip(twins, counts, strict=True)]
        assert got.tolist() == np.concatenate(want).tolist()
        for i, w in enumerate(want):
            held[i] += w.tolist()
        frees = [rng.permutation(h)[: rng.integers(0, len(h) + 1)] for h in held]
        layer_of = np.repeat(np.arange(n_layers), [f.size for f in frees])
        many.free_many(layer_of, np.concatenate(frees).astype(np.int64))
        for i, f in enumerate(frees):
            twins[i].free_array(f)
            held[i] = [x for x in held[i] if x not in set(f.tolist())]
        assert [a.num_free for a in many] == [t.num_free for t in twins]
    state = (many._stack.copy(), many._used.copy(), [a.num_free for a in many])
    some = int(held[2][0]) if held[2] else None
    cases = [(np.array([0, 2]), np.array([held[0][0] if held[0] else 1, n]), f"pool 2: block {n} "),
             (np.array([1]), np.array([0]), "pool 1: block 0 ")]
    if some is not None:
        cases.append((np.array([2, 2]), np.array([some, some]), f"pool 2: block {some} "))
    for layer_of, ids, msg in cases:
        with pytest.raises(ValueError, match=msg + "is not allocated"):
            many.free_many(layer_of, ids)
        assert (many._stack == state[0]).all() and (many._used == state[1]).all()
        assert [a.num_free for a in many] == state[2]
    with pytest.raises(PoolExhaustedError, match="pool 3: cannot allocate"):
        many.allocate_many(np.array([0, 0, 0, n]))
    assert (many._used == state[1]).all() and [a.num_free for a in many] == state[2]
