"""Retrieval options of the offload policies: selection turnover, the QueryDrift query model and its
calibration, RetrievalConfig (representations on the host or the device), device-side selection."""

from __future__ import annotations

import pytest
import torch

from ucm_trt.config import Budget, SparseConfig
from ucm_trt.sparse.batched import BlockRepStore, _chosen_uniform, batched_dot_scores, select_batched
from ucm_trt.sparse.policies import RetrievalConfig
from ucm_trt.sparse.turnover import QueryDrift, calibrate_persistence, selection_turnover, topk_part


def _random_selection(g, rows, nb, k):
    out = torch.full((rows, k + 2), -1, dtype=torch.int32)
    for r in range(rows):
        n = int(torch.randint(0, k + 1, (1,), generator=g))
        ids = torch.randperm(nb, generator=g)[:n].sort().values
        out[r, :n] = ids.to(torch.int32)
    return out


def test_selection_turnover_matches_set_reference():
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        old = _random_selection(g, 6, 40, 12).view(2, 3, -1)
        new = _random_selection(g, 6, 40, 9).view(2, 3, -1)
        changed, selected = selection_turnover(old, new)
        for i in range(2):
            for j in range(3):
                o = {int(x) for x in old[i, j] if x >= 0}
                n = {int(x) for x in new[i, j] if x >= 0}
                assert int(changed[i, j]) == len(n - o)
                assert int(selected[i, j]) == len(n)


def test_selection_turnover_rejects_mismatched_rows():
    with pytest.raises(ValueError, match="same leading shape"):
        selection_turnover(torch.zeros(2, 3, dtype=torch.int32), torch.zeros(3, 3, dtype=torch.int32))
    with pytest.raises(TypeError):
        selection_turnover(torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.int32))


def test_topk_part_drops_sink_local_and_decode_blocks():
    sp = SparseConfig(sink_blocks=1, local_blocks=2)
    sel = torch.tensor([[0, 3, 5, 8, 9, 10, 12, -1]], dtype=torch.int32)
    assert topk_part(sel, 10, sp).tolist() == [[-1, 3, 5, -1, -1, -1, -1, -1]]


def test_query_drift_validation():
    for bad in (-0.1, 1.5, float("nan"), True, "0.5"):
        with pytest.raises(ValueError, match="persistence"):
            QueryDrift(persistence=bad)
        with pytest.raises(ValueError, match="target_turnover"):
            QueryDrift(target_turnover=bad)
    with pytest.raises(ValueError, match="exactly one"):
        QueryDrift()
    with pytest.raises(ValueError, match="exactly one"):
        QueryDrift(persistence=0.5, target_turnover=0.2)
    with pytest.raises(ValueError, match="persistence="):
        QueryDrift(target_turnover=0.2).start("r", 0, torch.randn(2, 8))  # the calibrated a is needed
    with pytest.raises(ValueError, match="seed"):
        QueryDrift(persistence=0.5, seed=-1)
    dq = QueryDrift(persistence=0.5).start("r", 3, torch.randn(2, 4, 8))
    dq.at(5)
    with pytest.raises(ValueError, match="go back"):
        dq.at(4)


def test_query_drift_frozen_fresh_norm_and_determinism():
    q = torch.randn(4, 6, 32) * 3
    frozen = QueryDrift(persistence=1.0).start("a", 1, q)
    assert torch.allclose(frozen.at(9), q, atol=1e-5)
    d1 = QueryDrift(persistence=0.7, seed=3).start("a", 1, q)
    d2 = QueryDrift(persistence=0.7, seed=3).start("a", 1, q)
    d3 = QueryDrift(persistence=0.7, seed=3).start("b", 1, q)
    x1, x2, x3 = d1.at(4), d2.at(4), d3.at(4)
    assert torch.equal(x1, x2)  # same seed and request: the same queries
    assert not torch.equal(x1, x3)  # another request: other noise
    assert torch.allclose(x1.norm(dim=-1), q.norm(dim=-1), rtol=1e-5)  # norm of the model's query kept


@pytest.mark.parametrize("a,dt", [(0.0, 1), (0.5, 1), (0.9, 1), (0.9, 4), (0.97, 10)])
def test_query_drift_correlation_is_a_to_the_steps(a, dt):
    """Mean cosine between the query at s and at s + dt is a**dt (many heads, D = 256)."""
    q = torch.randn(64, 32, 256)
    dq = QueryDrift(persistence=a, seed=1).start("r", 0, q)
    x0 = dq.at(5)
    x1 = dq.at(5 + dt)
    cos = torch.nn.functional.cosine_similarity(x0, x1, dim=-1).mean().item()
    assert abs(cos - a**dt) < 0.02, (cos, a**dt)
    assert QueryDrift(persistence=a).per_retrieval(dt) == pytest.approx(a**dt)


def _reps_and_query(seed=0, L=4, hkv=2, hq=4, d=32, nb=96):
    g = torch.Generator().manual_seed(seed)
    store = BlockRepStore(num_layers=L, num_kv_heads=hkv, head_dim=d, capacity=nb)
    store.append(torch.randn(L, nb, hkv, d, generator=g))
    return store.reps(), torch.randn(L, hq, d, generator=g)


def test_calibrate_persistence_hits_target_and_is_monotone():
    reps, q0 = _reps_and_query()
    sp = SparseConfig(block_size=32, budget=Budget.ratio(0.25), retrieval_stride=4)
    a_hi, t_hi = calibrate_persistence(0.1, reps, q0, sp, retrievals=12, tol=0.02)
    a_lo, t_lo = calibrate_persistence(0.4, reps, q0, sp, retrievals=12, tol=0.02)
    assert abs(t_hi - 0.1) <= 0.02 and abs(t_lo - 0.4) <= 0.02
    assert 0 < a_lo < a_hi < 1
    assert calibrate_persistence(0.0, reps, q0, sp) == (1.0, 0.0)  # frozen query: nothing changes
    a0, t0 = calibrate_persistence(1.0, reps, q0, sp, retrievals=12)  # unreachable: the random case
    assert a0 == 0.0 and 0.6 < t0 < 0.9  # random queries replace about 1 - ratio of the top-k


def test_retrieval_config_validation():
    with pytest.raises(ValueError, match="representations"):
        RetrievalConfig(representations="gpu")
    with pytest.raises(ValueError, match="rep_dtype"):
        RetrievalConfig(rep_dtype=torch.float64)
    with pytest.raises(TypeError, match="query_drift"):
        RetrievalConfig(query_drift=0.9)
    from ucm_trt.runtime.algorithms import make_policy

    with pytest.raises(ValueError, match="cannot be combined with retrieval=: a RetrievalConfig"):
        make_policy("dense", retrieval=RetrievalConfig())
    with pytest.raises(TypeError, match="RetrievalConfig"):
        make_policy("esa", retrieval="device")
    with pytest.raises(ValueError, match="float16"):
        make_policy("kvstar", retrieval=RetrievalConfig(rep_dtype=torch.bfloat16))


def test_block_rep_store_device_and_dtype():
    st = BlockRepStore(num_layers=2, num_kv_heads=2, head_dim=8, capacity=2, dtype=torch.bfloat16)
    x = torch.randn(2, 5, 2, 8)
    st.append(x)  # grows past the capacity, keeps its dtype
    assert st.dtype == torch.bfloat16 and st.device.type == "cpu" and st.num_blocks == 5
    assert torch.equal(st.reps(), x.permute(0, 2, 3, 1).bfloat16())
    assert st.nbytes == 5 * 2 * 2 * 8 * 2
    with pytest.raises(ValueError, match="dtype"):
        BlockRepStore(num_layers=1, num_kv_heads=1, head_dim=1, dtype=torch.int8)


def test_block_rep_store_grows_by_an_eighth_and_keeps_old_views():
    st = BlockRepStore(num_layers=1, num_kv_heads=1, head_dim=2, capacity=200)
    st.append(torch.arange(400.0).view(1, 200, 1, 2))
    view = st.reps()
    st.append(torch.ones(1, 1, 1, 2))
    assert st.capacity == 225  # 200 + 200 // 8, not 400
    st.append(torch.ones(1, 30, 1, 2))
    assert st.capacity == 253 and st.num_blocks == 231  # 225 + 28
    assert torch.equal(view, torch.arange(400.0).view(1, 200, 1, 2).permute(0, 2, 3, 1))  # unchanged
    assert torch.equal(st.reps()[..., :200], view)


@pytest.mark.parametrize("ties", [False, True])
def test_topk_kth_equals_numpy_partition_path(ties):
    """The device path's ``torch.topk`` k-th best gives the same ids as the CPU's numpy partition."""
    g = torch.Generator().manual_seed(2)
    for k in (1, 5, 31, 63):
        sc = torch.randn(8, 3, 64, generator=g)
        if ties:
            sc = sc.round()  # many equal scores: lower ids must win at the edge
        a = _chosen_uniform(sc, k, use_topk=False)
        b = _chosen_uniform(sc, k, use_topk=True)
        assert torch.equal(a, b), k


# -- engine level (tiny random Llama) ------------------------------------------------------------

def _tiny():
    from tests.runtime.conftest import tiny_llama

    return tiny_llama()


def _recording(policy_cls, eager_fills=False):
    """``policy_cls`` that also keeps a copy of every selection it collects (``eager_fills``: and draws
    its QueryDrift queries on the main thread at submission, not on the worker)."""

    class Recording(policy_cls):
        def _collect(self, st, pending):
            super()._collect(st, pending)
            self.collected.append(st.sel.clone())

        def _batch_queries(self, queries, rows, reqs, *, fills=None):
            # eager: every query drawn on the main thread at its own step (no buffers, no draws left to jobs)
            return super()._batch_queries(queries, rows, reqs, fills=None if eager_fills else fills)

    return Recording


def _run(model, algorithm, retrieval, *, stride=2, steps=24, prompt_len=300, vote=False, eager_fills=False):
    """Greedy tokens, every collected selection (one per retrieval, in order) and the policy stats."""
    from ucm_trt.config import KVStarConfig
    from ucm_trt.runtime import Engine, RuntimeConfig, SamplingParams, TorchBackend
    from ucm_trt.runtime.algorithms import sparse_config_for
    from ucm_trt.sparse.policies import ESAPolicy, GSAPolicy, KVStarPolicy

    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, 256, (prompt_len,), generator=g).tolist()
    sparse = sparse_config_for(algorithm, SparseConfig(block_size=16, budget=Budget.ratio(0.25),
                                                       retrieval_stride=stride, min_blocks=4))
    if algorithm == "kvstar":
        policy = _recording(KVStarPolicy, eager_fills)(KVStarConfig(retrieval_stride=stride), retrieval=retrieval)
    else:
        policy = _recording({"esa": ESAPolicy, "gsa": GSAPolicy}[algorithm], eager_fills)(retrieval=retrieval,
                                                                                          vote=vote)
    policy.collected = []
    with Engine(TorchBackend(model, attention="reference"), policy, sparse=sparse,
                # the synchronous schedule: these tests compare representation paths retrieval by retrieval; under
                # the overlapped schedule one rounding difference at a switch step changes a token, and from there
                # the random model's queries (and so every later retrieval) diverge for reasons not under test
                config=RuntimeConfig(max_batch=1, max_seq_len=1024, prefill_chunk=128, cache_blocks=0,
                                     overlap_loads=False)) as eng:
        [res] = eng.generate(prompt, SamplingParams(max_new_tokens=steps))
        return res.token_ids, policy.collected, eng.stats()["policy"]


@pytest.fixture(scope="module")
def tiny_model_for_retrieval():
    torch.set_num_threads(1)
    return _tiny()


@pytest.mark.parametrize("vote", [False, True])
@pytest.mark.parametrize("algorithm", ["esa", "gsa"])
def test_device_representations_select_like_host_on_cpu(algorithm, vote, tiny_model_for_retrieval):
    """representations='device' (here the device is the CPU: the same code path without CUDA)
    gives the host path's selections at every step and the same tokens (dot scores and the
    per-head vote, make_policy's default)."""
    host = _run(tiny_model_for_retrieval, algorithm, RetrievalConfig(), vote=vote)
    dev = _run(tiny_model_for_retrieval, algorithm, RetrievalConfig(representations="device"), vote=vote)
    assert host[0] == dev[0]
    assert len(host[1]) == len(dev[1]) > 0
    for a, b in zip(host[1], dev[1], strict=True):
        assert torch.equal(a, b)
    assert dev[2]["representations"] == "device" and host[2]["retrievals"] == dev[2]["retrievals"]
    # ESA: the 19 prompt blocks (300 tokens / 16); GSA: every full block, 20 after 24 decode steps
    blocks = {"esa": 19, "gsa": 20}[algorithm]
    assert dev[2]["representation_bytes_peak"] == host[2]["representation_bytes_peak"] == 2 * 2 * 16 * blocks * 4


def test_kvstar_device_representations_select_like_host_on_cpu(tiny_model_for_retrieval):
    """KVStar with representations='device' (the compact float16 vote layout; the device is the CPU here):
    the host path's selections at every retrieval and its tokens, with fewer representation bytes
    (float16 tiles instead of float32) that stats() reports."""
    host = _run(tiny_model_for_retrieval, "kvstar", RetrievalConfig(), vote=False)
    dev = _run(tiny_model_for_retrieval, "kvstar", RetrievalConfig(representations="device"), vote=False)
    assert host[0] == dev[0]
    assert len(host[1]) == len(dev[1]) > 0
    for a, b in zip(host[1], dev[1], strict=True):
        assert torch.equal(a, b)
    assert dev[2]["representations"] == "device" and host[2]["retrievals"] == dev[2]["retrievals"]
    assert 0 < dev[2]["representation_bytes_peak"] < host[2]["representation_bytes_peak"]


def test_half_precision_representations_halve_the_store(tiny_model_for_retrieval):
    """bf16 storage runs end to end with half the representation bytes; its selections are those of
    the rounded representations (checked exactly at the function level in
    test_batched_dot_scores_half_store_upcasts), so no equality with float32 is asked here."""
    host = _run(tiny_model_for_retrieval, "esa", RetrievalConfig())
    half = _run(tiny_model_for_retrieval, "esa", RetrievalConfig(rep_dtype=torch.bfloat16))
    assert len(half[0]) == len(host[0]) and half[2]["retrievals"] == host[2]["retrievals"]
    assert 2 * half[2]["representation_bytes_peak"] == host[2]["representation_bytes_peak"] > 0
    for sel in half[1]:
        assert sel.dtype == torch.int32 and bool((sel[sel >= 0] < 19).all())  # prompt blocks only


@pytest.mark.parametrize("algorithm", ["esa", "gsa", "kvstar"])
def test_query_drift_controls_turnover(algorithm, tiny_model_for_retrieval):
    """Frozen drift queries (a = 1) make later retrievals repeat; a = 0 replaces most of the top-k;
    the model's own queries sit in between or anywhere, but the stats report the turnover."""
    frozen = _run(tiny_model_for_retrieval, algorithm, RetrievalConfig(query_drift=QueryDrift(persistence=1.0)),
                  stride=2, steps=30)
    fresh = _run(tiny_model_for_retrieval, algorithm, RetrievalConfig(query_drift=QueryDrift(persistence=0.0)),
                 stride=2, steps=30)
    model = _run(tiny_model_for_retrieval, algorithm, RetrievalConfig(), stride=2, steps=30)
    for stats in (frozen[2], fresh[2], model[2]):
        assert stats["retrievals"] >= 8 and 0.0 <= stats["topk_turnover"] <= 1.0
    # frozen: the drift starts at the prefill retrieval's query, so ESA never changes a block; GSA's
    # decode blocks fill and become candidates, KVStar's prefill vote used a window of prompt queries
    if algorithm == "esa":
        assert frozen[2]["topk_turnover"] == 0.0 and frozen[2]["selection_turnover"] == 0.0, frozen[2]
    assert frozen[2]["topk_turnover"] < 0.15, frozen[2]
    assert fresh[2]["topk_turnover"] > 0.4, fresh[2]
    assert frozen[2]["query_drift_persistence"] == 1.0 and model[2]["query_drift_persistence"] is None


@pytest.mark.parametrize("algorithm", ["esa", "gsa", "kvstar"])
def test_query_drift_drawn_on_the_worker_selects_as_drawn_at_submission(algorithm, tiny_model_for_retrieval):
    """ESA / GSA / KVStar hand a QueryDrift query (KVStar: its voting group of R steps' queries) to
    their retrieval task as empty buffers plus their draws (RetrievalJob.prepare, run on the worker
    thread): the same selections, retrieval for retrieval, and the same tokens as drawing them on
    the main thread when submitting."""
    drift = RetrievalConfig(query_drift=QueryDrift(persistence=0.6, seed=5))
    worker = _run(tiny_model_for_retrieval, algorithm, drift, stride=2, steps=20)
    eager = _run(tiny_model_for_retrieval, algorithm, drift, stride=2, steps=20, eager_fills=True)
    assert worker[0] == eager[0]
    assert len(worker[1]) == len(eager[1]) >= 8
    for a, b in zip(worker[1], eager[1], strict=True):
        assert torch.equal(a, b)
    assert 0.0 < worker[2]["topk_turnover"] < 1.0  # the drift moved the selections


def test_drifting_query_fill_equals_at():
    q0 = torch.randn(2, 4, 8)
    a = QueryDrift(persistence=0.6, seed=2).start("r", 0, q0)
    b = QueryDrift(persistence=0.6, seed=2).start("r", 0, q0)
    buf = torch.empty(a.shape)
    a.fill(buf, 3)
    assert torch.equal(buf, b.at(3)) and a.step == 3


def test_query_drift_target_turnover_is_calibrated_once_and_reached(tiny_model_for_retrieval):
    """QueryDrift(target_turnover=t): the policy calibrates a on its first request and the run's
    top-k turnover lands near t (19 prompt blocks, 4 chosen of 16 candidates: coarse steps)."""
    _, _, stats = _run(tiny_model_for_retrieval, "esa",
                       RetrievalConfig(query_drift=QueryDrift(target_turnover=0.3)), stride=2, steps=40)
    assert 0.0 < stats["query_drift_persistence"] < 1.0
    assert abs(stats["query_drift_calibrated_turnover"] - 0.3) <= 0.05
    assert abs(stats["topk_turnover"] - 0.3) <= 0.15, stats


def test_query_drift_target_needs_mean_representations(tiny_model_for_retrieval):
    with pytest.raises(Exception, match="persistence=") as info:
        _run(tiny_model_for_retrieval, "kvstar", RetrievalConfig(query_drift=QueryDrift(target_turnover=0.3)),
             stride=2, steps=8)
    assert "ESA, GSA" in str(info.value)


def test_runtime_turnover_stat_matches_recorded_selections(tiny_model_for_retrieval):
    """stats' selection_turnover equals changed / selected recomputed with sets from the collected
    selections (shared selection: every KV-head row is the same)."""
    _, sels, stats = _run(tiny_model_for_retrieval, "esa", RetrievalConfig(), stride=1, steps=20)
    assert len(sels) >= 10
    changed = selected = 0
    for a, b in zip(sels[:-1], sels[1:], strict=True):
        for layer in range(a.shape[0]):
            for head in range(a.shape[1]):
                o = {int(x) for x in a[layer, head] if x >= 0}
                n = {int(x) for x in b[layer, head] if x >= 0}
                changed += len(n - o)
                selected += len(n)
    assert changed > 0
    assert stats["selection_turnover"] == pytest.approx(changed / selected)


# -- GPU ------------------------------------------------------------------------------------------

@pytest.mark.gpu
def test_device_selection_on_cuda_equals_cpu_selection():
    """select_batched on CUDA scores returns exactly the CPU selection of the same scores."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    g = torch.Generator().manual_seed(0)
    for budget in (Budget.ratio(0.125), Budget.ratio(0.25), Budget.top_k(7), Budget.threshold(0.5)):
        sp = SparseConfig(block_size=64, budget=budget)
        for ties in (False, True):
            s = torch.randn(32, 8, 1024, generator=g)
            if ties:
                s = s.round()
            for shared in ("shared", "per_head"):
                spx = SparseConfig(block_size=64, budget=budget, selection=shared)
                a = select_batched(s, 1000, spx, "dot", 8)
                b = select_batched(s.cuda(), 1000, spx, "dot", 8)
                assert b.device.type == "cuda" and torch.equal(a, b.cpu()), (budget, ties, shared)
    del sp


@pytest.mark.gpu
@pytest.mark.parametrize("algorithm", ["esa", "gsa", "kvstar"])
def test_device_representations_on_cuda_match_host(algorithm):
    """On CUDA, representations='device' (GPU store, scoring + top-k on a side stream) selects what
    the host path selects. GPU and CPU matmuls may round a score differently, which can move a block
    at the budget's edge: at least 90 % of the retrievals must be identical, and when all are, the
    generated tokens must be too."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    from tests.runtime.conftest import tiny_llama
    from ucm_trt.config import KVStarConfig
    from ucm_trt.runtime import Engine, RuntimeConfig, SamplingParams, TorchBackend
    from ucm_trt.runtime.algorithms import sparse_config_for
    from ucm_trt.sparse.policies import ESAPolicy, GSAPolicy, KVStarPolicy

    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, 256, (600,), generator=g).tolist()
    out = {}
    for where in ("host", "device"):
        model = tiny_llama().cuda()
        sparse = sparse_config_for(algorithm, SparseConfig(block_size=16, budget=Budget.ratio(0.25),
                                                           retrieval_stride=2))
        if algorithm == "kvstar":
            policy = _recording(KVStarPolicy)(KVStarConfig(retrieval_stride=2),
                                              retrieval=RetrievalConfig(representations=where))
        else:
            policy = _recording({"esa": ESAPolicy, "gsa": GSAPolicy}[algorithm])(
                retrieval=RetrievalConfig(representations=where))
        policy.collected = []
        with Engine(TorchBackend(model, attention="triton"), policy, sparse=sparse,
                    config=RuntimeConfig(max_batch=1, max_seq_len=1024, prefill_chunk=256)) as eng:
            [res] = eng.generate(prompt, SamplingParams(max_new_tokens=24))
            out[where] = (res.token_ids, policy.collected, eng.stats()["policy"])
    host, dev = out["host"], out["device"]
    assert dev[2]["representations"] == "device" and dev[2]["representation_bytes_peak"] > 0
    assert len(host[1]) == len(dev[1]) >= 10
    same = sum(torch.equal(a, b) for a, b in zip(host[1], dev[1], strict=True))
    assert same >= 0.9 * len(host[1]), (same, len(host[1]))
    if same == len(host[1]):
        assert host[0] == dev[0]


def test_batched_dot_scores_half_store_upcasts():
    reps, q = _reps_and_query()
    half = reps.to(torch.bfloat16)
    s = batched_dot_scores(q, half)
    assert s.dtype == torch.float32
    assert torch.allclose(s, batched_dot_scores(q, half.float()))


def test_turnover_counts_equal_the_set_based_reference():
    """The vectorised counts the policies use equal selection_turnover of the selections and of
    their top-k parts, also when the block count grows (GSA), new rows are unsorted, rows empty."""
    from ucm_trt.sparse.turnover import turnover_counts

    g = torch.Generator().manual_seed(5)
    sp = SparseConfig(sink_blocks=1, local_blocks=2)
    for trial in range(30):
        old = _random_selection(g, 8, 40, 12)
        new = _random_selection(g, 8, 44, 10)
        if trial % 3 == 0:  # unsorted new rows (old must be in the runtime's sorted format)
            new = new[:, torch.randperm(new.shape[1], generator=g)]
        old_nb, new_nb = 40, 40 + trial % 5
        c, n = selection_turnover(old, new)
        kc, kn = selection_turnover(topk_part(old, old_nb, sp), topk_part(new, new_nb, sp))
        got = turnover_counts(old.view(2, 4, -1), old_nb, new.view(2, 4, -1), new_nb, sp)
        assert got == (int(c.sum()), int(n.sum()), int(kc.sum()), int(kn.sum())), trial
    empty = torch.zeros(3, 0, dtype=torch.int32)
    sel = torch.tensor([[0, 5, 9], [1, 2, -1], [-1, -1, -1]], dtype=torch.int32)
    assert turnover_counts(empty, 12, sel, 12, sp) == (5, 5, 4, 4)  # top-k part: ids in [1, 10)


def test_calibration_turnover_matches_a_plain_resimulation():
    """The turnover calibrate_persistence reports at its a equals re-running its streams with the
    public pieces (QueryDrift, batched_dot_scores, select_batched) one stream at a time."""
    reps, q0 = _reps_and_query(seed=4)
    sp = SparseConfig(block_size=32, budget=Budget.ratio(0.25), retrieval_stride=3)
    a, t = calibrate_persistence(0.2, reps, q0, sp, retrievals=10, streams=3, seed=7, tol=0.01)
    nb, hkv = reps.shape[-1], reps.shape[1]
    changed = selected = 0
    for k in range(3):
        dq = QueryDrift(persistence=a, seed=7).start(f"calibration-{k}", 0, q0)
        prev = None
        for i in range(11):
            sel = topk_part(select_batched(batched_dot_scores(dq.at(3 * i), reps), nb, sp, "dot", hkv), nb, sp)
            if prev is not None:
                c, n = selection_turnover(prev, sel)
                changed, selected = changed + int(c.sum()), selected + int(n.sum())
            prev = sel
    assert changed / selected == pytest.approx(t, abs=0.01)
    assert abs(t - 0.2) <= 0.01
