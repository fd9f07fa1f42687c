"""One retrieval submission per decode step (issue 13): the offload policies batch the step's
retrievals (``OffloadPolicy._submit_batch``: one task per worker thread, scores of equal-size
requests selected in one pass) and must give exactly the selections of the per-request path.

The inputs are random and differ per request (block counts, representations, queries), so a row
swapped between requests inside a batch changes a selection and fails these tests.
"""

from __future__ import annotations

import pytest
import torch

from ucm_trt.config import Budget, KVStarConfig, SparseConfig
from ucm_trt.runtime import Engine, RuntimeConfig, SamplingParams, TorchBackend
from ucm_trt.runtime.algorithms import sparse_config_for
from ucm_trt.runtime.worker import RetrievalWorker
from ucm_trt.sparse.batched import BlockRepStore
from ucm_trt.sparse.policies import ESAPolicy, GSAPolicy, KVStarPolicy
from ucm_trt.sparse.policies._offload import OffloadRequestState, RetrievalConfig
from ucm_trt.sparse.policies.base import ModelShape, PolicyRuntime
from ucm_trt.sparse.policies.kvstar import KVStarRequestState, PreparedVote
from ucm_trt.sparse.representations import block_lens_from_seq_lens, kvstar_subblock
from ucm_trt.sparse.select import candidate_mask

L, HQ, HKV, D = 3, 8, 2, 16


def _shape() -> ModelShape:
    return ModelShape(num_layers=L, num_q_heads=HQ, num_kv_heads=HKV, head_dim=D, rope_theta=1e4, max_positions=8192)


def _bind(policy, sparse: SparseConfig, threads: int):
    worker = RetrievalWorker(threads)
    policy.bind(PolicyRuntime(shape=_shape(), sparse=sparse, kv=None, worker=worker, device=torch.device("cpu")))
    return worker


def _budgets():
    return [Budget.ratio(0.25), Budget.top_k(3)]


@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("budget", _budgets(), ids=str)
@pytest.mark.parametrize("selection", ["shared", "per_head"])
@pytest.mark.parametrize("algorithm", ["esa", "gsa"])
def test_batched_submission_equals_per_request_selections(algorithm, selection, budget, threads):
    """ESA / GSA: 7 requests (block counts 9..20, some equal so their scores are selected together),
    random representations and queries; every request's selection from the batch equals the one its
    own task computes alone, and the per-layer reference."""
    g = torch.Generator().manual_seed(hash((algorithm, selection, str(budget), threads)) % 2**31)
    sparse = SparseConfig(block_size=16, budget=budget, selection=selection, retrieval_stride=4, min_blocks=4)
    pol = ESAPolicy() if algorithm == "esa" else GSAPolicy(prefetch_blocks=1)
    worker = _bind(pol, sparse, threads)
    try:
        jobs, alone, per_layer = [], [], []
        for i, nb in enumerate([12, 9, 12, 20, 12, 9, 15]):
            store = BlockRepStore(num_layers=L, num_kv_heads=HKV, head_dim=D, capacity=nb)
            store.append(torch.randn(L, nb, HKV, D, generator=g))
            q = torch.randn(L, HQ, D, generator=g)
            rid = f"r{i}"
            pol._state[rid] = OffloadRequestState(dense=False, sel_nb=nb, store=store)
            if algorithm == "esa":
                job = pol._job(rid, 6, store, nb, q)
                alone.append(pol._select_all(store.reps(), nb, q))
                reps = [store.layer(layer) for layer in range(L)]
            else:
                job = pol._job(rid, pol._state[rid], nb, q, 6)
                alone.append(pol._select_all(store.reps(), nb, q))
                reps = [store.reps()[layer].permute(2, 0, 1) for layer in range(L)]
            assert job.scores is not None  # the batched path applies
            jobs.append(job)
            per_layer.append([pol._select(reps, nb, list(q), layer) for layer in range(L)])
        pendings = pol._submit_batch(jobs)
        assert len({id(p.ticket) for p in pendings}) == min(threads, len(jobs))  # one task per thread
        for i, p in enumerate(pendings):
            got = p.result()
            assert torch.equal(got, alone[i]), f"request {i}"
            for layer in range(L):
                want = per_layer[i][layer]
                assert torch.equal(got[layer, :, : want.shape[1]], want), (i, layer)
                assert bool((got[layer, :, want.shape[1]:] == -1).all())
        assert worker.tasks == min(threads, len(jobs))
    finally:
        worker.shutdown()


@pytest.mark.parametrize("threads", [1, 2])
def test_kvstar_batched_submission_equals_per_request_selections(threads):
    g = torch.Generator().manual_seed(7 + threads)
    r, bs = 3, 16
    cfg = KVStarConfig(retrieval_stride=r, token_merge=4, channel_ratio=0.5)
    sparse = SparseConfig(block_size=bs, scoring="kvstar_vote", representation="subblock", retrieval_stride=r,
                          budget=Budget.ratio(0.25), min_blocks=4)
    pol = KVStarPolicy(cfg)
    worker = _bind(pol, sparse, threads)
    try:
        jobs, alone = [], []
        for i, nb in enumerate([10, 13, 10, 10, 17]):
            lens = block_lens_from_seq_lens(torch.tensor(nb * bs - 3), nb, bs)
            cand = candidate_mask(torch.tensor([nb], dtype=torch.int32), nb, sink_blocks=1, local_blocks=2,
                                  min_blocks=4)[0]
            votes = [PreparedVote(kvstar_subblock(torch.randn(nb, HKV, bs, D, generator=g), lens, cfg), cand)
                     for _ in range(L)]
            st = KVStarRequestState(dense=False, sel_nb=nb, votes=votes)
            pol._state[f"k{i}"] = st
            group = list(torch.randn(L, HQ, r, D, generator=g))
            jobs.append(pol._job(f"k{i}", 3, st, group))
            alone.append(pol._select_all(st, group))
        for i, p in enumerate(pol._submit_batch(jobs)):
            assert torch.equal(p.result(), alone[i]), f"request {i}"
    finally:
        worker.shutdown()


def test_a_failed_request_in_a_shared_task_names_it():
    sparse = SparseConfig(block_size=16, budget=Budget.ratio(0.25), retrieval_stride=4, min_blocks=4)
    pol = ESAPolicy()
    worker = _bind(pol, sparse, 1)
    try:
        store = BlockRepStore(num_layers=L, num_kv_heads=HKV, head_dim=D, capacity=8)
        store.append(torch.randn(L, 8, HKV, D))
        pol._state["ok"] = OffloadRequestState(dense=False, sel_nb=8, store=store)
        pol._state["bad"] = OffloadRequestState(dense=False, sel_nb=8, store=store)
        good = pol._job("ok", 2, store, 8, torch.randn(L, HQ, D))
        bad = pol._job("bad", 2, store, 8, torch.full((L, HQ, D), float("nan")))
        pendings = pol._submit_batch([good, bad])
        from ucm_trt.runtime import RetrievalError

        for p in pendings:
            with pytest.raises(RetrievalError, match=r"esa requests 'ok' \(step 2\), 'bad' \(step 2\).*"
                                                     r"request 'bad' step 2: ValueError: scores must be finite"):
                p.result()
    finally:
        worker.shutdown()


# -- engine level ------------------------------------------------------------------------------

def _per_request(base: type):
    """``base`` with the pre-batching submission: one task per request, computed by the request's
    own task function (its selection alone), in the step's order."""

    class PerRequest(base):
        def _submit_batch(self, jobs):
            out = []
            for job in jobs:
                out += super()._submit_batch([type(job)(rid=job.rid, step=job.step, num_blocks=job.num_blocks,
                                                        task=job.task)])
            return out

    return PerRequest


def _recording(base: type):
    class Recording(base):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            self.collected = []

        def _collect(self, st, pending):
            super()._collect(st, pending)
            self.collected.append(st.sel.clone())

    return Recording


@pytest.mark.parametrize("algorithm", ["esa", "gsa", "kvstar"])
def test_engine_batched_retrieval_equals_per_request_path(algorithm, tiny_model):
    """Four requests of different prompt lengths joining at different steps (different block
    counts and schedule phases in one batch), two retrieval threads: the batched submission
    generates the tokens and collects the selections of the one-task-per-request path."""
    stride = 3
    sparse = sparse_config_for(algorithm, SparseConfig(block_size=16, budget=Budget.ratio(0.25),
                                                       retrieval_stride=stride, min_blocks=4))
    g = torch.Generator().manual_seed(11)
    prompts = [torch.randint(0, 256, (n,), generator=g).tolist() for n in (200, 263, 200, 341)]
    params = [SamplingParams(max_new_tokens=n) for n in (22, 17, 25, 20)]

    def run(cls):
        kw = {"config": KVStarConfig(retrieval_stride=stride)} if algorithm == "kvstar" else {}
        # one schedule phase for all (no staggering), so that requests retrieve at the same steps and share tasks
        policy = _recording(cls)(retrieval=RetrievalConfig(stagger=False), **kw)
        with Engine(TorchBackend(tiny_model, attention="torch"), policy, sparse=sparse,
                    config=RuntimeConfig(max_batch=4, max_seq_len=512, prefill_chunk=128, retrieval_threads=2)) as eng:
            res = eng.generate(prompts, params)
            return [r.token_ids for r in res], policy.collected, eng.worker.tasks

    base = {"esa": ESAPolicy, "gsa": GSAPolicy, "kvstar": KVStarPolicy}[algorithm]
    tokens, sels, tasks = run(base)
    ref_tokens, ref_sels, ref_tasks = run(_per_request(base))
    assert tokens == ref_tokens
    assert len(sels) == len(ref_sels) > 8
    for a, b in zip(sels, ref_sels, strict=True):
        assert torch.equal(a, b)
    assert tasks < ref_tasks  # fewer tasks: the step's requests share them


def test_decode_steps_record_their_host_time_split(tiny_model):
    """StepRecord splits a decode step's host time: plan, the forward's call, the token copy, the
    policy's after_step; together at most the step's time, each measured (> 0)."""
    sparse = sparse_config_for("esa", SparseConfig(block_size=16, budget=Budget.ratio(0.25), retrieval_stride=2,
                                                   min_blocks=4))
    with Engine(TorchBackend(tiny_model, attention="torch"), ESAPolicy(), sparse=sparse,
                config=RuntimeConfig(max_batch=2, max_seq_len=512, prefill_chunk=128)) as eng:
        eng.generate([list(range(100)), list(range(5, 130))], SamplingParams(max_new_tokens=6))
        dec = [r for r in eng.metrics.steps if r.kind == "decode"]
        assert len(dec) == 5
        for r in dec:
            parts = (r.plan_seconds, r.forward_seconds, r.sync_seconds, r.after_step_seconds)
            assert all(p > 0 for p in parts) and sum(parts) <= r.seconds
        stats = eng.stats()
        assert stats["decode_forward_ms_mean"] > 0 and stats["decode_after_step_ms_mean"] > 0


def test_plan_extends_every_request_as_alone():
    """``plan`` extends the selections of the requests whose blocks grew together (one call per
    shape): each request gets exactly ``extend_selections`` of its own selection (values and width),
    and the selected-block count of the per-request path."""
    from ucm_trt.sparse.batched import extend_selections
    from ucm_trt.sparse.policies.base import RequestView

    g = torch.Generator().manual_seed(5)
    sparse = SparseConfig(block_size=16, budget=Budget.ratio(0.25), retrieval_stride=4, min_blocks=4)
    pol = ESAPolicy()
    worker = _bind(pol, sparse, 1)
    try:
        views, want = [], []
        for i, (nb, width) in enumerate([(10, 5), (10, 5), (10, 5), (12, 5), (10, 7)]):
            sel = torch.full((L, HKV, width), -1, dtype=torch.int32)
            for layer in range(L):
                for head in range(HKV):
                    k = int(torch.randint(1, width + 1, (1,), generator=g))
                    ids = torch.randperm(nb, generator=g)[:k].sort().values
                    sel[layer, head, :k] = ids.to(torch.int32)
            pol._state[f"p{i}"] = OffloadRequestState(dense=False, sel=sel, sel_nb=nb)
            new_len = nb * 16 + 1 + 16 * i % 32  # 1 or 2 blocks past the prompt
            views.append(RequestView(rid=f"p{i}", prompt_len=nb * 16, seq_len=new_len - 1, new_len=new_len, step=3))
            want.append(extend_selections(sel, nb, -(-new_len // 16)))
        out = pol.plan(views)
        for i, w in enumerate(want):
            for layer in range(L):
                assert torch.equal(out[layer][i], w[layer]), (i, layer)
        assert pol.selected_blocks == sum(int((w >= 0).sum()) for w in want)
        again = pol.plan(views)  # nothing changed: the same tensors come back
        assert all(again[layer][i] is out[layer][i] for layer in range(L) for i in range(len(views)))
    finally:
        worker.shutdown()
