"""The batched planner (``KVManager._plan_batched``: every request and layer of a step in one pass
of array operations) against the sequential one (``sequential_plans=True``: request by request,
the rules of the module docstring) and, without overlap, against the independent LRU reference
model of ``test_kv``: randomised steps with requests joining and leaving mid-batch, partial last
blocks, selections reused (the same object) or replaced, dense layers (``None``), roomy pools and
pools under pressure (there the batched planner hands the layer to the sequential path)."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from ucm_trt.runtime.kv import KVLayout, KVManager, PoolExhaustedError, StepTransfer

from .test_kv import _LRUModel

L, H, BS, D = 2, 1, 4, 2


def _layout() -> KVLayout:
    return KVLayout(num_layers=L, num_kv_heads=H, head_dim=D, block_size=BS, dtype=torch.float32,
                    device=torch.device("cpu"))


def _value(rid: str, layer: int, pos: int) -> float:
    return 1e5 * int(rid[1:]) + 1e3 * layer + pos + 1.0


def _fill(kv: KVManager, rid: str, start: int, count: int) -> None:
    for layer in range(L):
        blocks, offs = kv.slots(rid, layer, start, count)
        vals = torch.tensor([_value(rid, layer, p) for p in range(start, start + count)])
        kv.pools[layer][torch.tensor(blocks), 0, 0, torch.tensor(offs), 0] = vals


def _state(kv: KVManager, rid: str) -> list[list[int]]:
    """Per layer the resident logical blocks, least recently used first."""
    return [list(r) for r in kv.seqs[rid].resident]


def _check_contents(kv: KVManager, rid: str) -> None:
    seq = kv.seqs[rid]
    for layer in range(L):
        for blk in np.flatnonzero(seq.table[layer]).tolist():
            n = min(BS, seq.seq_len - blk * BS)
            got = kv.pools[layer][int(seq.table[layer, blk]), 0, 0, :n, 0]
            want = torch.tensor([_value(rid, layer, blk * BS + o) for o in range(n)])
            assert torch.equal(got, want), (rid, layer, blk)


def _counters(tr: StepTransfer) -> dict:
    return {k: v for k, v in vars(tr).items() if k != "load_seconds"}


class _Pair:
    """The same steps on a batched and a sequential manager (and, without overlap, the model)."""

    def __init__(self, *, cap: int, cache: int, overlap: bool, max_blocks: int = 24, max_batch: int = 6) -> None:
        kw = dict(max_batch=max_batch, max_blocks=max_blocks, num_device_blocks=1 + cap, offload=True,
                  num_host_blocks=4 * max_batch * max_blocks, cache_blocks=cache, overlap=overlap)
        self.fast = KVManager(_layout(), **kw)
        self.slow = KVManager(_layout(), **kw)
        self.slow.sequential_plans = True
        # the batched planner once more, logging every copy and read: its compute waits take the
        # per-layer path (one _note_wait per layer), which the unlogged one must match
        self.logged = KVManager(_layout(), **kw)
        self.logged.copy_log = []
        self.model = None if overlap else _LRUModel(cap, cache)
        self.lens: dict[str, int] = {}
        self.batched_layers = 0
        orig = self.fast._plan_batched

        def counted(seqs, geoms, needed, transfer, loads, stale):
            left = orig(seqs, geoms, needed, transfer, loads, stale)
            self.batched_layers += L - len(left)
            return left

        self.fast._plan_batched = counted

    def plan(self, rows: list[str], tokens: list[int], needed) -> bool:
        """One step on both; False when both ran out of pool (the run stops), else asserts equality."""
        out, errors = [], []
        for kv in (self.fast, self.slow):
            tr = StepTransfer()
            try:
                stale = kv.plan_step(rows, tokens, needed, tr)
                if kv is self.fast:
                    fast_waits = _effective_waits(kv)
                kv.issue_deferred(tr)
                errors.append(None)
            except PoolExhaustedError as exc:
                stale, errors = None, [*errors, exc]
            out.append((stale, tr))
        if self.model is not None:
            try:
                loaded, evicted = self.model.plan([(r, self.lens[r], t) for r, t in zip(rows, tokens, strict=True)],
                                                  needed)
                model_error = None
            except PoolExhaustedError as exc:
                model_error = exc
            assert (model_error is None) == (errors[1] is None), (model_error, errors)
        assert (errors[0] is None) == (errors[1] is None), errors
        if errors[0] is not None:
            return False
        (s_fast, t_fast), (s_slow, t_slow) = out
        assert s_fast == s_slow
        assert self.logged.plan_step(rows, tokens, needed, StepTransfer()) == s_fast
        assert _effective_waits(self.logged) == fast_waits
        self.logged.issue_deferred(StepTransfer())
        assert _counters(t_fast) == _counters(t_slow)
        if self.model is not None:
            assert t_fast.blocks_loaded == loaded and t_fast.blocks_evicted == evicted
        for r in rows:
            assert _state(self.fast, r) == _state(self.slow, r), r
            if self.model is not None:
                assert _state(self.fast, r) == [self.model.lru[(r, layer)] for layer in range(L)], r
            assert np.array_equal(self.fast.seqs[r].host_ids, self.slow.seqs[r].host_ids)
        for layer in range(L):
            assert self.fast.allocators[layer].num_used == self.slow.allocators[layer].num_used
        for r, t in zip(rows, tokens, strict=True):
            for kv in (self.fast, self.slow, self.logged):
                _fill(kv, r, self.lens[r], t)
            self.lens[r] += t
        for kv in (self.fast, self.slow, self.logged):
            kv.write_back(rows, StepTransfer())
            for r in rows:
                _check_contents(kv, r)
            rows_th = kv.tables_host[:, : len(rows)].numpy()
            for i, r in enumerate(rows):  # the uploaded tables are the plan's
                assert np.array_equal(rows_th[:, i], kv.seqs[r].table)
                assert torch.equal(kv.tables[:, i], kv.tables_host[:, i])
        if self.model is not None:
            for r in rows:
                self.model.flushed[r] = self.lens[r] // BS
        return True

    def join(self, rid: str, n: int) -> bool:
        for kv in (self.fast, self.slow, self.logged):
            kv.add_request(rid)
        if self.model is not None:
            self.model.add(rid)
        self.lens[rid] = 0
        return self.plan([rid], [n], [[None]] * L)

    def leave(self, rid: str) -> None:
        for kv in (self.fast, self.slow, self.logged):
            kv.free_request(rid)
        if self.model is not None:
            self.model.free(rid)
        del self.lens[rid]


def _effective_waits(kv: KVManager) -> list[int]:
    """The generation each layer's compute must wait for at this step (0: none; a wait at or below the
    last one already made is none)."""
    return [g if g > kv._waited else 0 for g in kv._layer_wait]


def _run(seed: int, *, cap: int, cache: int, overlap: bool, steps: int = 60) -> _Pair:
    rng = random.Random(seed)
    pair = _Pair(cap=cap, cache=cache, overlap=overlap)
    serial = 0
    prev: dict[tuple[str, int], np.ndarray] = {}
    for _ in range(3):
        if not pair.join(f"r{serial}", rng.randint(5, 40)):
            return pair
        serial += 1
    for _ in range(steps):
        if rng.random() < 0.1 and len(pair.lens) > 1:
            pair.leave(rng.choice(sorted(pair.lens)))
        if rng.random() < 0.15 and len(pair.lens) < 6:
            if not pair.join(f"r{serial}", rng.randint(3, 40)):
                return pair
            serial += 1
        rows = list(pair.lens)
        rng.shuffle(rows)
        rows = [r for r in rows if pair.lens[r] + 1 <= 24 * BS]
        if not rows:
            break
        needed = []
        for layer in range(L):
            per = []
            for r in rows:
                nb = -(-pair.lens[r] // BS)
                key = (r, layer)
                u = rng.random()
                if u < 0.08:
                    per.append(None)  # a dense layer / every block
                elif u < 0.55 and key in prev:
                    per.append(prev[key])  # the same object: the selection did not change
                else:
                    k = rng.randint(0, min(nb, 6))
                    ids = np.array(sorted(rng.sample(range(nb), k)) + ([nb + 3] if rng.random() < 0.1 else []),
                                   dtype=np.int64)  # an id past the sequence is ignored
                    prev[key] = ids
                    per.append(ids)
            needed.append(per)
        if not pair.plan(rows, [1] * len(rows), needed):
            break
    return pair


@pytest.mark.parametrize("overlap", [False, True])
@pytest.mark.parametrize("seed", range(6))
def test_batched_plan_equals_sequential_plan_with_room(seed, overlap):
    """A pool large enough that no layer is ever short: every layer of every step is planned by the
    batched planner, and its result equals the sequential one's (and the model's without overlap)."""
    pair = _run(seed, cap=400, cache=seed % 3, overlap=overlap)
    assert pair.batched_layers > 0
    assert pair.fast.allocators[0].num_used > 0


@pytest.mark.parametrize("overlap", [False, True])
@pytest.mark.parametrize("seed", range(6))
def test_batched_plan_equals_sequential_plan_under_pool_pressure(seed, overlap):
    """Small pools: some layers of some steps go to the sequential path (pressure evictions across
    requests, stale switches made synchronous), the rest stay batched; the results still agree."""
    pair = _run(100 + seed, cap=28 + 4 * (seed % 3), cache=1 + seed % 2, overlap=overlap)
    assert pair.batched_layers > 0


def test_request_slots_grow_and_are_reused():
    """More active requests than max_batch (slots grow, state kept), and a freed slot starts clean."""
    kv = KVManager(_layout(), max_batch=2, max_blocks=8, num_device_blocks=200, offload=True,
                   num_host_blocks=100, cache_blocks=1, overlap=True)
    tr = StepTransfer()
    for i in range(5):
        kv.add_request(f"r{i}")
        kv.plan_step([f"r{i}"], [5 + i], [[None]] * L, tr)
        _fill(kv, f"r{i}", 0, 5 + i)
        kv.write_back([f"r{i}"], tr)
    for i in range(5):
        _check_contents(kv, f"r{i}")
    kv.free_request("r1")
    kv.add_request("r9")
    assert kv.seqs["r9"].slot == kv.seqs["r9"].slot and not kv.seqs["r9"].table.any()
    assert (kv.seqs["r9"].host_ids == -1).all()


def test_free_array_rejects_a_duplicate_and_leaves_the_allocator_as_it_was():
    from ucm_trt.runtime.kv import BlockAllocator

    a = BlockAllocator(8, first=1, name="p")
    got = a.allocate_array(5)
    with pytest.raises(ValueError, match=f"p: block {int(got[1])} is not allocated"):
        a.free_array(np.array([got[0], got[1], got[1]]))
    assert a.num_used == 5 and a.num_free == 2
    a.free_array(got)  # every id still in use: the failed call changed nothing
    assert a.num_used == 0 and sorted(a.allocate(7)) == list(range(1, 8))


def test_table_upload_checks_ids_against_the_pool():
    kv = KVManager(_layout(), max_batch=2, max_blocks=8, num_device_blocks=20, offload=True,
                   num_host_blocks=16, cache_blocks=0)
    kv.add_request("r0")
    kv.plan_step(["r0"], [5], [[None]] * L, StepTransfer())
    kv.seqs["r0"].table[1, 0] = 20  # corrupt (outside the pool) and mark changed
    kv.seqs["r0"].version += 1
    with pytest.raises(RuntimeError, match=r"request 'r0': block table holds ids outside the device pool \[0, 20\)"):
        kv._write_tables(["r0"])
