"""Overlapped (stale-by-one) loads, CPU tier: the schedule against an independent model of it, the
event discipline replayed from the KV manager's copy log, and the host-side checks of the plan."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ucm_trt.config import Budget, KVStarConfig, SparseConfig
from ucm_trt.runtime import Engine, RuntimeConfig, SamplingParams, TorchBackend
from ucm_trt.runtime.algorithms import make_policy, sparse_config_for
from ucm_trt.sparse.policies import ESAPolicy, GSAPolicy, KVStarPolicy

from .conftest import tiny_llama

BS = 16


def _prompt(n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n,), generator=g).tolist()


@pytest.fixture(scope="module")
def model():
    return tiny_llama()


def _sparse(algorithm, stride=3, ratio=0.25):
    return sparse_config_for(algorithm, SparseConfig(block_size=BS, budget=Budget.ratio(ratio), retrieval_stride=stride,
                                                     min_blocks=4, local_blocks=2, sink_blocks=1))


def _extend(sel: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """Test-local: append blocks start..stop-1 to every row of a sorted, -1 padded [Hkv, S] selection."""
    rows = [[b for b in r.tolist() if b >= 0] + list(range(start, stop)) for r in sel]
    out = torch.full((len(rows), max(len(r) for r in rows)), -1, dtype=torch.int32)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.tensor(r, dtype=torch.int32)
    return out


def _stale_by_one(base: type):
    """The overlapped schedule modelled on the *synchronous* engine, independently of the KV
    manager: it tracks which blocks the overlapped KV would hold (cache_blocks=0, no pool pressure:
    the visible blocks, plus for one step the new selection's) and, where a layer's new selection
    needs a block that is not held, hands attention the previous step's selection extended with the
    blocks opened since."""

    class StaleByOne(base):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            self.held: dict[tuple[str, int], set[int]] = {}
            self.prev: dict[tuple[str, int], tuple[torch.Tensor, int]] = {}
            self.stale_steps = 0

        def plan(self, reqs):
            sels = super().plan(reqs)
            out = []
            for layer, per_row in enumerate(sels):
                row_out = []
                for req, sel in zip(reqs, per_row, strict=True):
                    key = (req.rid, layer)
                    old_nb, new_nb = -(-req.seq_len // BS), -(-req.new_len // BS)
                    opened = set(range(req.seq_len // BS, new_nb))
                    if sel is None:
                        self.held[key] = set(range(new_nb))
                        self.prev.pop(key, None)
                        row_out.append(None)
                        continue
                    want = {b for b in sel.flatten().tolist() if 0 <= b < old_nb}
                    held = self.held.get(key, set(range(old_nb)))  # after prefill: every block
                    if key in self.prev and not want <= held:
                        old, old_new_nb = self.prev[key]
                        chosen = _extend(old, old_new_nb, new_nb) if new_nb > old_new_nb else old
                        seen = {b for b in chosen.flatten().tolist() if b >= 0}
                        self.held[key] = seen | want | opened
                        self.stale_steps += 1
                    else:
                        chosen = sel
                        self.held[key] = want | opened
                    self.prev[key] = (chosen, new_nb)
                    row_out.append(chosen)
                out.append(row_out)
            return out

    return StaleByOne


@pytest.mark.parametrize("algorithm", ["esa", "gsa", "kvstar"])
def test_overlapped_schedule_equals_its_stale_by_one_model(algorithm, model):
    """Overlapped loads on the real policy == the synchronous engine on the stale-by-one model of
    it, token for token, with stale steps really happening (and the synchronous schedule on the
    plain policy differing from neither in the number of retrievals)."""
    args = {"config": KVStarConfig(retrieval_stride=3)} if algorithm == "kvstar" else {}
    base = {"esa": ESAPolicy, "gsa": GSAPolicy, "kvstar": KVStarPolicy}[algorithm]
    prompts = [_prompt(300, 1), _prompt(230, 2)]
    rt = dict(max_batch=2, max_seq_len=1024, prefill_chunk=128, cache_blocks=0)
    sparse = _sparse(algorithm)
    # the policy and its model are built alike (same class, same arguments): only the schedule differs
    with Engine(TorchBackend(model, attention="reference"), base(**args), sparse=sparse,
                config=RuntimeConfig(**rt, overlap_loads=True)) as eng:
        got = [r.token_ids for r in eng.generate(prompts, SamplingParams(max_new_tokens=24))]
        st = eng.stats()
        assert eng.kv.device_blocks_held() == 0
    ref_policy = _stale_by_one(base)(**args)
    with Engine(TorchBackend(model, attention="reference"), ref_policy, sparse=sparse,
                config=RuntimeConfig(**rt, overlap_loads=False)) as eng:
        want = [r.token_ids for r in eng.generate(prompts, SamplingParams(max_new_tokens=24))]
        st_ref = eng.stats()
    assert got == want
    assert st["load_method"] == "kernel"  # "auto" on the CPU: the stats name the method used
    assert st["decode_stale_layers"] == ref_policy.stale_steps > 0
    assert st["decode_blocks_deferred"] > 0 and st["decode_sync_switches"] == 0
    assert st_ref["decode_stale_layers"] == 0  # the reference engine ran synchronously
    assert st["policy"]["retrievals"] == st_ref["policy"]["retrievals"]


def test_overlap_with_select_all_equals_synchronous_and_loads_nothing(model):
    """Select-all: no retrieval changes the working set, so both schedules attend the same blocks."""
    prompts = [_prompt(300, 1), _prompt(170, 3)]
    out = {}
    for overlap in (False, True):
        with Engine(TorchBackend(model, attention="reference"), ESAPolicy(), sparse=_sparse("esa", ratio=1.0),
                    config=RuntimeConfig(max_batch=2, max_seq_len=1024, prefill_chunk=128, cache_blocks=0,
                                         overlap_loads=overlap)) as eng:
            out[overlap] = [r.token_ids for r in eng.generate(prompts, SamplingParams(max_new_tokens=16))]
            st = eng.stats()
            assert st["decode_stale_layers"] == 0 and st["decode_blocks_deferred"] == 0
    assert out[True] == out[False]


def _replay(log, num_layers):
    """Check the event discipline on a copy log (see KVManager.copy_log). Returns counters."""
    gen_of: list[dict[int, int]] = [{} for _ in range(num_layers)]
    waited = 0
    reads: list[list[np.ndarray]] = [[] for _ in range(num_layers)]
    read_last: list[set[int]] | None = None  # blocks the last checked step read, per layer
    stats = {"steps": 0, "needed_waits": 0, "deferred": 0}
    i = 0
    while i < len(log):
        kind, gen, layer, what = log[i]
        if kind in ("load", "write_back"):
            assert gen > max((max(g.values(), default=0) for g in gen_of), default=0)  # generations increase
            if kind == "load" and read_last is not None:
                # issued after the step's waits (deferred / early): never into a block that step reads
                hit = set(what.tolist()) & read_last[layer]
                assert not hit, f"load gen {gen} writes layer {layer} blocks {sorted(hit)} the running step reads"
                stats["deferred"] += len(what)
            for p in what.tolist():
                gen_of[layer][p] = gen
        elif kind == "read":
            read_last = None  # a new plan started
            reads[layer].append(what)
        elif kind == "wait":
            waited = max(waited, what)
        elif kind == "step_wait":
            step_waits = [e[3] for e in log[i : i + num_layers]]
            assert [e[0] for e in log[i : i + num_layers]] == ["step_wait"] * num_layers
            for lay in range(num_layers):
                ok = max(waited, step_waits[lay])
                for phys in reads[lay]:
                    for p in phys.tolist():
                        g = gen_of[lay].get(p, 0)
                        assert g <= ok, f"layer {lay} reads block {p} (copy gen {g}) but waits only for {ok}"
                        if g > waited:
                            stats["needed_waits"] += 1
            waited = max([waited, *step_waits])
            read_last = [{p for phys in reads[lay] for p in phys.tolist()} for lay in range(num_layers)]
            reads = [[] for _ in range(num_layers)]
            stats["steps"] += 1
            i += num_layers
            continue
        i += 1
    return stats


@pytest.mark.parametrize("plan_ahead", [False, True])
@pytest.mark.parametrize("early", [False, True])
@pytest.mark.parametrize("policy_cls", [ESAPolicy, GSAPolicy])
def test_no_step_reads_a_block_before_the_copy_that_brought_it_is_waited_for(policy_cls, early, plan_ahead, model):
    """Replays every copy, read and wait of a run with three requests, a pool small enough for
    pressure evictions and sync switches (26 blocks per layer: a 300-token prompt takes 19), LRU
    cache and early prefetch, with the plan made serially or ahead (during the last step's forward):
    every block a step reads was
    last copied by a generation the step's layer waits for (or an earlier one), loads issued beside a
    step never write a block that step reads, and generations increase."""
    algorithm = policy_cls.name
    prompts = [_prompt(300, 1), _prompt(260, 2), _prompt(200, 4)]
    rt = RuntimeConfig(max_batch=3, max_seq_len=1024, prefill_chunk=128, cache_blocks=1, overlap_loads=True,
                       early_prefetch=early, num_device_blocks=26, plan_ahead=plan_ahead)

    class Settled(policy_cls):
        """Early prefetch only sees retrievals that finished by the plan (a race with the worker
        threads); waiting for them first makes the run, and its early loads, deterministic."""

        def prefetch(self, reqs):
            for st in self._state.values():
                if st.pending is not None:
                    st.pending.ticket.future.exception()  # waits; a failure surfaces at collect
            return super().prefetch(reqs)

    with Engine(TorchBackend(model, attention="reference"), Settled(), sparse=_sparse(algorithm, stride=4),
                config=rt) as eng:
        eng.kv.copy_log = []
        eng.generate(prompts, SamplingParams(max_new_tokens=20))
        st = eng.stats()
        counts = _replay(eng.kv.copy_log, eng.shape.num_layers)
        assert eng.kv.device_blocks_held() == 0
    assert counts["steps"] == st["prefill_steps"] + st["decode_steps"]
    assert counts["deferred"] > 0 and counts["needed_waits"] > 0  # the discipline was exercised
    if early and plan_ahead and algorithm == "gsa":
        # GSA collects one step after it submits; planned ahead, the plan between the two is made
        # before the submission, so no finished-but-uncollected retrieval is ever there to prefetch
        assert st["decode_blocks_prefetched"] == 0
    elif early:
        assert st["decode_blocks_prefetched"] > 0
    else:  # overlapped switches, and switches made synchronous by pool pressure
        assert st["decode_stale_layers"] > 0 and st["decode_sync_switches"] > 0


def test_replay_catches_a_read_that_does_not_wait():
    """The checker itself: a read of a block whose copy is newer than the step's wait fails."""
    log = [("load", 1, 0, np.array([5])), ("read", 0, 0, np.array([5])), ("step_wait", 0, 0, 0)]
    with pytest.raises(AssertionError, match="reads block 5"):
        _replay(log, 1)
    log = [("read", 0, 0, np.array([5])), ("step_wait", 0, 0, 0), ("load", 1, 0, np.array([5]))]
    with pytest.raises(AssertionError, match="the running step reads"):
        _replay(log, 1)


class _BadSelection(ESAPolicy):
    """ESA whose selection of layer 1, row 0 is corrupted at the first decode step."""

    def __init__(self, corrupt):
        super().__init__()
        self.corrupt = corrupt

    def plan(self, reqs):
        out = super().plan(reqs)
        sel = out[1][0].clone()
        self.corrupt(sel, -(-reqs[0].new_len // BS))
        out[1][0] = sel
        return out


def _swap(sel, nb):
    sel[0, 0], sel[0, 1] = sel[0, 1].item(), sel[0, 0].item()


def _past_end(sel, nb):
    sel[1, int((sel[1] >= 0).sum()) - 1] = nb


def _hole(sel, nb):
    sel[0, 1] = -1


@pytest.mark.parametrize(("corrupt", "rule"), [(_swap, "sorted strictly ascending"), (_past_end, r"in \[0, 19\)"),
                                               (_hole, "then -1 padding")])
def test_bad_selections_are_refused_on_the_host_before_any_launch(corrupt, rule, model):
    """The per-launch index checks now run once per plan on the host mirrors: a policy's selection
    that is unsorted, past the sequence's blocks or has a hole is a ValueError naming policy, layer,
    row, head and the rule (the kernels would otherwise read it without a check)."""
    with Engine(TorchBackend(model, attention="reference"), _BadSelection(corrupt), sparse=_sparse("esa"),
                config=RuntimeConfig(max_batch=1, max_seq_len=1024, prefill_chunk=128)) as eng:
        with pytest.raises(ValueError, match=rf"policy 'esa': layer 1 row 0 \(req-0\) head \d selection .*{rule}"):
            eng.generate(_prompt(300, 1), SamplingParams(max_new_tokens=4))
        assert eng.kv.device_blocks_held() == 0


def test_load_method_and_batch_dma_errors_are_clear():
    """The load method is validated by name; the batched-DMA wrapper's argument struct has the
    driver's layout (CUmemcpyAttributes: enum, two CUmemLocation, unsigned flags = 24 bytes), and
    without a CUDA driver it says what is missing instead of failing later."""
    import ctypes

    from ucm_trt.runtime.batch_copy import BatchMemcpy, _MemcpyAttributes

    with pytest.raises(ValueError, match="load_method must be 'auto', 'kernel', 'staged' or 'batch_dma', got 'dma'"):
        RuntimeConfig(load_method="dma")
    with pytest.raises(TypeError, match="overlap_loads must be a bool"):
        RuntimeConfig(overlap_loads=1)
    assert ctypes.sizeof(_MemcpyAttributes) == 24
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="libcuda.so.1|cuMemcpyBatchAsync"):
            BatchMemcpy()


def test_queries_reach_the_host_only_for_policies_that_read_them(model):
    """Dense (no after_step) gets no per-step query copy; ESA gets its queries, which equal the
    device capture of the step (copied through the pinned buffer)."""
    seen = []

    class Recording(ESAPolicy):
        def after_step(self, reqs, queries):
            seen.append([q.clone() for q in queries])
            super().after_step(reqs, queries)

    with Engine(TorchBackend(model, attention="reference"), make_policy("dense"), sparse=SparseConfig(block_size=BS),
                config=RuntimeConfig(max_batch=1, max_seq_len=512)) as eng:
        assert eng._capture_h is None
    with Engine(TorchBackend(model, attention="reference"), Recording(), sparse=_sparse("esa"),
                config=RuntimeConfig(max_batch=2, max_seq_len=1024, prefill_chunk=128)) as eng:
        eng.generate([_prompt(300, 1), _prompt(200, 2)], SamplingParams(max_new_tokens=3))
        last = eng._capture[:, :1, :, 0]  # the last decode step's capture, row 0
    assert len(seen) == 2 and all(len(s) == eng.shape.num_layers for s in seen)
    assert all(q.shape == (2, 4, 16) for q in seen[0])
    assert torch.equal(torch.stack(seen[-1])[:, :1], last)


def test_index_guard_flag_is_read_at_the_steps_sync_and_stops_generation(model):
    """The kernels' IndexGuard flag (set on the device without a sync when a launch meets an
    out-of-range id) is read with the decode step's token copy: a set flag raises
    IndexOutOfRangeError with the op's words, generation stops and every block is returned. (On
    CUDA the engine owns the guard and passes it to copy_blocks and the attention launchers; here a
    CPU guard stands in to test the read at the sync.)"""
    from ucm_trt.kernels.attention import ATTENTION_GUARD_CODES, GUARD_BAD_BLOCK_TABLE
    from ucm_trt.kernels.guard import IndexGuard, IndexOutOfRangeError

    eng = Engine(TorchBackend(model, attention="reference"), ESAPolicy(), sparse=_sparse("esa"),
                 config=RuntimeConfig(max_batch=1, max_seq_len=1024, prefill_chunk=128))
    assert eng.guard is None  # CPU: no Triton launches to guard
    eng.guard = IndexGuard("cpu", codes=ATTENTION_GUARD_CODES)
    rid = eng.add_request(_prompt(300, 1), SamplingParams(max_new_tokens=8))
    while eng._prefilling or eng._waiting:
        eng.step()
    eng.step()  # a clean decode step
    eng.guard.flag.fill_(GUARD_BAD_BLOCK_TABLE)
    with pytest.raises(IndexOutOfRangeError, match=r"decode step: .*block_table entry in use lies outside"):
        eng.step()
    assert eng.guard.value() == 0  # reset once reported
    eng.abort_all()
    assert eng.kv.device_blocks_held() == 0 and eng.result(rid).finish_reason == "aborted"
    eng.close()


def test_auto_load_method_resolves_to_a_named_method_and_is_reported():
    """``"auto"`` (the default) becomes ``"kernel"`` off CUDA or without offload; the manager and the
    engine's stats name the method used, never ``"auto"``; unknown names are refused by name."""
    from ucm_trt.runtime.kv import resolve_load_method

    cpu = torch.device("cpu")
    assert RuntimeConfig().load_method == "auto"
    assert resolve_load_method("auto", cpu, True) == "kernel"
    assert resolve_load_method("auto", torch.device("cuda", 0), False) == "kernel"
    for name in ("kernel", "staged", "batch_dma"):
        assert resolve_load_method(name, cpu, True) == name
    with pytest.raises(ValueError, match="load_method must be one of .* got 'dma'"):
        resolve_load_method("dma", cpu, True)


def test_batch_memcpy_refuses_the_legacy_default_stream():
    """cuMemcpyBatchAsync answers CUresult 1 for stream 0 (the benchmark's first run hit it): the
    wrapper refuses it by name before calling the driver."""
    from ucm_trt.runtime.batch_copy import BatchMemcpy

    dma = BatchMemcpy.__new__(BatchMemcpy)  # no driver here: the check runs before any driver call
    one = np.zeros(1, dtype=np.uint64)
    with pytest.raises(ValueError, match="stream must be a created CUDA stream"):
        dma.copy(one, one, 64, 0)


def test_batch_dma_issues_one_driver_call_per_layer_with_each_blocks_addresses():
    """``KVManager._dma_layers`` (load_method='batch_dma'): every layer's addresses are computed in one
    pass and each layer's driver call must read exactly that layer's run: host store / pool base of the
    layer + block id x block bytes, in both directions, one size per copy, each layer its own generation.
    The driver is replaced by a recorder that reads the address arrays at the pointers it is given (what
    cuMemcpyBatchAsync does during the call), so this runs without a GPU."""
    import ctypes

    from ucm_trt.runtime.batch_copy import BatchMemcpy, _MemcpyAttributes
    from ucm_trt.runtime.kv import KVLayout, KVManager

    calls = []

    def driver(dst, src, sizes, n, attr, attr_idx, num_attrs, stream):
        k = n.value

        def read(p):
            return np.ctypeslib.as_array((ctypes.c_uint64 * k).from_address(p.value)).copy()

        calls.append((read(dst), read(src), read(sizes), stream.value))
        return 0

    dma = BatchMemcpy.__new__(BatchMemcpy)
    dma._fn, dma.with_fail_index, dma.name = driver, False, "recorder"
    dma._attr = _MemcpyAttributes()
    dma._attr_ref, dma._attr_index, dma._one, dma._sizes = ctypes.byref(dma._attr), (ctypes.c_size_t * 1)(0), \
        ctypes.c_size_t(1), None
    layout = KVLayout(num_layers=4, num_kv_heads=2, head_dim=8, block_size=4, dtype=torch.float16,
                      device=torch.device("cpu"))
    kv = KVManager(layout, max_batch=2, max_blocks=8, num_device_blocks=12, offload=True, num_host_blocks=20)
    kv._dma = dma
    rng = np.random.default_rng(0)
    per = {layer: (rng.permutation(20)[: 3 + layer], rng.permutation(np.arange(1, 12))[: 3 + layer])
           for layer in (0, 2, 3)}

    class Stream:
        cuda_stream = 77

    for to_device in (True, False):
        calls.clear()
        gens = kv._dma_layers([0, 2, 3], per, to_device, Stream())
        assert len(calls) == 3
        for (dst, src, sizes, stream), layer in zip(calls, (0, 2, 3), strict=True):
            hids, phys = per[layer]
            host = kv.host[layer].data_ptr() + hids.astype(np.uint64) * kv.block_bytes
            dev = kv.pools[layer].data_ptr() + phys.astype(np.uint64) * kv.block_bytes
            want_dst, want_src = (dev, host) if to_device else (host, dev)
            assert (dst == want_dst).all() and (src == want_src).all(), (to_device, layer)
            assert (sizes == kv.block_bytes).all() and stream == 77
        assert gens[1] == 0 and gens[0] < gens[2] < gens[3]
        assert all((kv._block_gen[layer][per[layer][1]] == gens[layer]).all() for layer in (0, 2, 3))
