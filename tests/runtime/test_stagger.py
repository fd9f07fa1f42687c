"""RetrievalConfig.stagger: each request's retrieval schedule shifted by a phase, so that requests that
decode together retrieve on different steps of the stride.

The contract: a request alone keeps upstream's schedule (phase 0); requests that prefill together get
the least-used phases (0, 1, ..., R-1, then 0 again); every request still retrieves once per ``R``
steps, only the steps move; a freed phase is handed out again; ``stagger=False`` gives every request
phase 0. What the engine submits per step is counted from the policy's own submissions.
"""

from __future__ import annotations

import pytest
import torch

from ucm_trt.config import Budget, DenseLayers, KVStarConfig, SparseConfig
from ucm_trt.runtime import Engine, RuntimeConfig, SamplingParams, TorchBackend
from ucm_trt.runtime.algorithms import make_policy, sparse_config_for
from ucm_trt.sparse.policies import RetrievalConfig

STRIDE = 4


def _prompt(n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n,), generator=g).tolist()


def _run(model, algorithm, n_requests, *, stagger, new_tokens=17):
    """(phase per request, {decode step: requests submitting a retrieval after it}, collections per request,
    token ids)."""
    kw = {"dense_layers": DenseLayers(), "retrieval": RetrievalConfig(stagger=stagger)}
    if algorithm == "kvstar":
        kw["kvstar"] = KVStarConfig(retrieval_stride=STRIDE)
    policy = make_policy(algorithm, **kw)
    sparse = sparse_config_for(algorithm, SparseConfig(block_size=16, budget=Budget.ratio(0.25),
                                                       retrieval_stride=STRIDE, min_blocks=4))
    submits: dict[int, list[str]] = {}
    collected: dict[str, int] = {}
    submit_batch, collect = policy._submit_batch, policy._collect

    def logged_submit(jobs):
        for job in jobs:
            if job.step > 0:  # the prefill's first retrieval is step 0
                submits.setdefault(job.step, []).append(job.rid)
        return submit_batch(jobs)

    def logged_collect(st, pending):
        rid = next(r for r, s in policy._state.items() if s is st)
        collected[rid] = collected.get(rid, 0) + 1
        return collect(st, pending)

    policy._submit_batch, policy._collect = logged_submit, logged_collect
    with Engine(TorchBackend(model, attention="reference"), policy, sparse=sparse,
                config=RuntimeConfig(max_batch=n_requests, max_seq_len=1024, prefill_chunk=256)) as eng:
        rids = [eng.add_request(_prompt(200 + 9 * i, i), SamplingParams(max_new_tokens=new_tokens))
                for i in range(n_requests)]
        phases = {}
        while eng.has_work:
            eng.step()
            for rid in rids:
                if rid in policy._state and rid not in phases:
                    phases[rid] = policy._state[rid].phase
        tokens = [eng.result(rid).token_ids for rid in rids]
    return [phases[r] for r in rids], submits, [collected.get(r, 0) for r in rids], tokens


@pytest.mark.parametrize("algorithm", ["esa", "gsa", "kvstar"])
def test_requests_decoding_together_retrieve_on_different_steps(tiny_model, algorithm):
    phases, submits, collected, _ = _run(tiny_model, algorithm, 5, stagger=True)
    assert phases == [0, 1, 2, 3, 0]
    # the 5 requests decode in lockstep: each step carries the submissions of 1 or 2 of them, not 5
    assert max(len(v) for v in submits.values()) == 2
    per_request = {rid: sum(rid in v for v in submits.values()) for rid in {r for v in submits.values() for r in v}}
    assert len(per_request) == 5
    # every request still retrieves once per stride (17 steps: 4 or 5 windows, one fewer where its first falls late)
    assert all(3 <= n <= 5 for n in per_request.values()), per_request
    assert all(n >= 3 for n in collected)

    phases0, submits0, collected0, _ = _run(tiny_model, algorithm, 5, stagger=False)
    assert phases0 == [0] * 5
    assert max(len(v) for v in submits0.values()) == 5  # all of them on one step
    assert len(submits0) < len(submits)


def test_a_request_alone_keeps_upstreams_schedule(tiny_model):
    """Phase 0 for a request alone: the same tokens and submissions with and without staggering."""
    on = _run(tiny_model, "esa", 1, stagger=True)
    off = _run(tiny_model, "esa", 1, stagger=False)
    assert on[0] == off[0] == [0]
    assert on[1] == off[1] and on[3] == off[3]
    assert sorted(on[1]) == [s for s in range(1, 17) if s % STRIDE == 2]


def test_a_freed_phase_is_handed_out_again():
    from ucm_trt.sparse.policies._offload import OffloadRequestState

    policy = make_policy("kvstar", kvstar=KVStarConfig(retrieval_stride=3),  # its stride needs no bound runtime
                         retrieval=RetrievalConfig(stagger=True))

    for rid in "abc":
        policy._state[rid] = OffloadRequestState(dense=False, phase=policy._new_phase())
    policy._state["dense"] = OffloadRequestState(dense=True)  # retrieves nothing: holds no phase
    assert [policy._state[r].phase for r in "abc"] == [0, 1, 2]
    del policy._state["b"]
    assert policy._new_phase() == 1
    policy._state["d"] = OffloadRequestState(dense=False, phase=policy._new_phase())
    assert policy._new_phase() == 0  # all used once: the lowest


def test_stagger_must_be_a_bool():
    with pytest.raises(TypeError, match="RetrievalConfig.stagger must be a bool, got 1"):
        RetrievalConfig(stagger=1)
