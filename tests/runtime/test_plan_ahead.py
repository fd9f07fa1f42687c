"""RuntimeConfig.plan_ahead: the next decode step's plan made during this step's forward.

The contract: the tokens are those of the serial order (plan, forward, wait, retrieval hand-off),
whatever joins, finishes by length, stops on a stop token or samples; a row that stops on a stop
token rides along in the step planned ahead without emitting and is freed after it; a plan whose
rows all stopped is dropped; nothing leaks. The serial engine (``plan_ahead=False``) is the
reference. The copy/read/wait discipline with plans made ahead is replayed in
``test_overlap.py``; on CUDA (asynchronous forward) in ``test_gpu.py``.
"""

from __future__ import annotations

import pytest
import torch

from ucm_trt.config import BlendConfig, Budget, DenseLayers, GSAOnDeviceConfig, KVStarConfig, SparseConfig
from ucm_trt.runtime import Engine, RuntimeConfig, SamplingParams, TorchBackend
from ucm_trt.runtime.algorithms import make_policy, sparse_config_for
from ucm_trt.runtime.blend import BlendRunner

from .conftest import tiny_llama

BS = 16
ALGORITHMS = ["dense", "esa", "gsa", "kvstar", "gsa-on-device"]


@pytest.fixture(scope="module")
def model():
    return tiny_llama()


def _prompt(n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n,), generator=g).tolist()


def _engine(model, algorithm, *, plan_ahead, stride=3, max_batch=3, **rt):
    # every layer sparse (the default's automatic dense-layer detection runs a random model's diffuse
    # layers dense, which would leave nothing to select)
    kw = {} if algorithm == "dense" else {"dense_layers": DenseLayers()}
    if algorithm == "kvstar":
        kw["kvstar"] = KVStarConfig(retrieval_stride=stride)
    if algorithm == "gsa-on-device":
        kw["gsa_on_device"] = GSAOnDeviceConfig(top_k_tokens=64, seq_len_threshold=0)
    sparse = sparse_config_for(algorithm, SparseConfig(block_size=BS, budget=Budget.ratio(0.25),
                                                       retrieval_stride=stride, min_blocks=4, local_blocks=2,
                                                       sink_blocks=1))
    config = RuntimeConfig(max_batch=max_batch, max_seq_len=1024, prefill_chunk=128, plan_ahead=plan_ahead, **rt)
    return Engine(TorchBackend(model, attention="reference"), make_policy(algorithm, **kw), sparse=sparse,
                  config=config)


def _run(model, algorithm, prompts, params, *, plan_ahead, **kw):
    """(token ids per request, finish reasons, streamed (rid, token) pairs, step records, stats,
    what is held after, the policy's selections by (request, decode step))."""
    streamed = []
    with _engine(model, algorithm, plan_ahead=plan_ahead, **kw) as eng:
        plans = {}
        plan = eng.policy.plan

        def recording_plan(views):  # what each (request, step) attends, whenever the plan is made
            sels = plan(views)
            for row, v in enumerate(views):
                plans[(v.rid, v.step)] = [None if per_row[row] is None else per_row[row].tolist() for per_row in sels]
            return sels

        eng.policy.plan = recording_plan
        res = eng.generate(prompts, params, on_token=lambda rid, tok: streamed.append((rid, tok)))
        held = (eng.kv.device_blocks_held(), eng.kv.host_bytes_held(), eng.has_work)
        return ([r.token_ids for r in res], [r.finish_reason for r in res], streamed, list(eng.metrics.steps),
                eng.stats(), held, plans)


PROMPTS = [(300, 1), (200, 2), (260, 3), (150, 4), (220, 5)]


@pytest.mark.parametrize("defer", [False, True])
@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_tokens_equal_the_serial_order(model, algorithm, defer):
    """Five requests through three rows (requests join as others finish by length), one sampled:
    the same tokens, finish reasons and stream as the serial engine, and plans were made ahead."""
    prompts = [_prompt(n, s) for n, s in PROMPTS]
    params = [SamplingParams(max_new_tokens=m) for m in (14, 9, 17, 6, 11)]
    params[2] = SamplingParams(max_new_tokens=17, temperature=0.8, seed=7)
    serial = _run(model, algorithm, prompts, params, plan_ahead=False)
    ahead = _run(model, algorithm, prompts, params, plan_ahead=True, defer_after_step=defer)
    assert ahead[0] == serial[0] and ahead[1] == serial[1]
    assert ahead[2] == serial[2]  # the stream: same tokens in the same order
    assert ahead[6] == serial[6]  # every retrieval became visible at the same step
    assert ahead[5] == (0, 0, False) and serial[5] == (0, 0, False)
    planned = [r for r in ahead[3] if r.kind == "decode" and r.plan_ahead_seconds > 0]
    assert len(planned) >= 5, "no decode step was planned ahead"
    # a step planned ahead has no serial plan of its own
    decodes = [r for r in ahead[3] if r.kind == "decode"]
    for before, step in zip(decodes, decodes[1:], strict=False):
        if before.plan_ahead_seconds > 0:
            assert step.plan_seconds == 0
    assert all(r.plan_ahead_seconds == 0 for r in serial[3])
    assert ahead[4]["decode_plan_ahead_ms_mean"] > 0


@pytest.mark.parametrize("defer", [False, True])
@pytest.mark.parametrize("algorithm", ["esa", "gsa", "kvstar"])
def test_a_row_that_stops_rides_along_and_is_freed(model, algorithm, defer):
    """Request 1 stops on a stop token (its first token from the 5th on that it had not produced
    before, in the serial run) while the next step was planned ahead with it: that step runs it
    without emitting (a record with fewer tokens than rows), then frees it; tokens and stream equal
    the serial engine's."""
    prompts = [_prompt(n, s) for n, s in PROMPTS[:3]]
    free = _run(model, algorithm, prompts, SamplingParams(max_new_tokens=12), plan_ahead=False)
    toks = free[0][1]
    k = next(i for i in range(4, len(toks) - 1) if toks[i] not in toks[:i])
    params = [SamplingParams(max_new_tokens=12), SamplingParams(max_new_tokens=12, stop_token_ids=(toks[k],)),
              SamplingParams(max_new_tokens=12)]
    serial = _run(model, algorithm, prompts, params, plan_ahead=False)
    ahead = _run(model, algorithm, prompts, params, plan_ahead=True, defer_after_step=defer)
    assert serial[1][1] == "stop" and serial[0][1] == toks[: k + 1]
    assert ahead[0] == serial[0] and ahead[1] == serial[1] and ahead[2] == serial[2]
    # the stopped row's last (ridden) step was planned ahead: its selections are the serial ones elsewhere
    assert {k: v for k, v in ahead[6].items() if k in serial[6]} == serial[6]
    rode = [r for r in ahead[3] if r.kind == "decode" and r.tokens < r.rows]
    assert len(rode) == 1 and (rode[0].rows, rode[0].tokens) == (3, 2)
    assert ahead[5] == (0, 0, False)


def test_a_plan_whose_rows_all_stopped_is_dropped(model):
    """One request, stopping on a stop token mid-run: the plan made ahead for the step after holds
    only it, so it is dropped (no decode step without tokens), and everything is freed at once."""
    prompt = _prompt(300, 1)
    free = _run(model, "esa", [prompt], SamplingParams(max_new_tokens=12), plan_ahead=False)
    toks = free[0][0]
    k = next(i for i in range(3, len(toks)) if toks[i] not in toks[:i])
    params = SamplingParams(max_new_tokens=12, stop_token_ids=(toks[k],))
    serial = _run(model, "esa", [prompt], params, plan_ahead=False)
    ahead = _run(model, "esa", [prompt], params, plan_ahead=True)
    assert ahead[0] == serial[0] == [toks[: k + 1]]
    assert all(r.tokens == r.rows for r in ahead[3] if r.kind == "decode")
    assert ahead[5] == (0, 0, False)
    decodes = [r for r in ahead[3] if r.kind == "decode"]
    assert decodes[-1].plan_ahead_seconds > 0  # the last step did plan ahead (then dropped it)


def test_esa_at_stride_two_plans_serially(model):
    """ESA at stride 1-2 collects the retrieval its after_step just submitted: collects_ahead() is
    False, so no plan is made ahead (and the tokens are the serial ones)."""
    prompts = [_prompt(n, s) for n, s in PROMPTS[:2]]
    serial = _run(model, "esa", prompts, SamplingParams(max_new_tokens=8), plan_ahead=False, stride=2)
    ahead = _run(model, "esa", prompts, SamplingParams(max_new_tokens=8), plan_ahead=True, stride=2)
    assert ahead[0] == serial[0]
    assert all(r.plan_ahead_seconds == 0 for r in ahead[3])


def test_abort_frees_a_row_that_rode_along(model):
    """abort_all while a stopped row waits to be freed after the step planned ahead: every block
    and host block comes back."""
    prompts = [_prompt(n, s) for n, s in PROMPTS[:2]]
    free = _run(model, "esa", prompts, SamplingParams(max_new_tokens=10), plan_ahead=False)
    stop = free[0][0][3]
    with _engine(model, "esa", plan_ahead=True) as eng:
        eng.add_request(prompts[0], SamplingParams(max_new_tokens=10, stop_token_ids=(stop,)))
        eng.add_request(prompts[1], SamplingParams(max_new_tokens=10))
        while not eng._unreleased and eng.has_work:
            eng.step()
        assert eng._unreleased, "the stopped row never waited for the step planned ahead"
        eng.abort_all()
        assert eng.kv.device_blocks_held() == 0 and eng.kv.host_bytes_held() == 0 and not eng.has_work


def test_blend_refuses_while_a_step_is_planned_ahead(model):
    """A Blend request prefills directly into the pools; with the next decode step already planned
    (its loads pending) it must wait: a clear error names the way out (engine.step())."""
    with _engine(model, "dense", plan_ahead=True, max_batch=2) as eng:
        blend = BlendRunner(eng, BlendConfig(recompute_layer=1, recompute_ratio=0.0))
        eng.add_request(_prompt(200, 1), SamplingParams(max_new_tokens=8))
        while eng._ahead is None:
            eng.step()
        with pytest.raises(RuntimeError, match="planned ahead"):
            blend.add_request([_prompt(64, 2)], _prompt(20, 3))


def test_after_step_of_a_step_planned_ahead_runs_beside_the_next_forward(model):
    """``defer_after_step``: the retrieval submissions of step N (``after_step``) run after step N+1's
    forward is enqueued (the GPU computes meanwhile), only for the rows that go on; in the serial order
    right after step N."""
    prompts = [_prompt(n, s) for n, s in PROMPTS[:2]]
    for plan_ahead in (False, True):
        log = []
        with _engine(model, "esa", plan_ahead=plan_ahead, defer_after_step=True) as eng:
            after, forward = eng.policy.after_step, eng._decode_forward

            def logged_after(views, queries, after=after, log=log):
                log.append(("after", tuple((v.rid, v.step) for v in views)))
                return after(views, queries)

            def logged_forward(b, widths, ctx, forward=forward, log=log):
                log.append(("forward", b))
                return forward(b, widths, ctx)

            eng.policy.after_step, eng._decode_forward = logged_after, logged_forward
            eng.generate(prompts, [SamplingParams(max_new_tokens=9), SamplingParams(max_new_tokens=6)])
        steps = [x for x in log if x[0] == "after"]
        # request 1 (6 tokens: decode steps 1-5) finishes by length at its step 5
        got = {rv for _, rvs in steps for rv in rvs}
        if plan_ahead:
            assert ("req-1", 5) not in got  # it finished at that step: no retrieval submitted for it
        else:
            assert ("req-1", 5) in got
        # the k-th after_step (of decode step k, both requests decode together) comes after forward k+1
        # when planned ahead (the last step, planned serially, excepted), right after forward k serially
        lag = 1 if plan_ahead else 0
        for k, i in enumerate(i for i, x in enumerate(log) if x[0] == "after"):
            forwards_before = sum(1 for x in log[:i] if x[0] == "forward")
            assert forwards_before in ({k + 1 + lag, k + 1} if plan_ahead else {k + 1}), (k, forwards_before)
        first = next(i for i, x in enumerate(log) if x[0] == "after")
        assert sum(1 for x in log[:first] if x[0] == "forward") == 1 + lag


@pytest.mark.parametrize("plan_ahead", [False, True])
def test_the_host_parts_of_a_decode_step_add_up_to_it(model, plan_ahead):
    """``StepRecord``'s host parts (plan, launch, forward, enqueue, after_step, plan made ahead, sync, emit)
    cover the decode step's wall time: what a benchmark reports as the step's breakdown leaves nothing
    untimed but a few lines between the timers. A part dropped from the record (or timed twice) fails it."""
    prompts = [_prompt(n, s) for n, s in PROMPTS[:3]]
    _, _, _, steps, stats, _, _ = _run(model, "esa", prompts, SamplingParams(max_new_tokens=12),
                                       plan_ahead=plan_ahead)
    dec = [s for s in steps if s.kind == "decode"]
    parts = ("plan", "launch", "forward", "enqueue", "after_step", "plan_ahead", "sync", "emit")
    total = sum(s.seconds for s in dec)
    covered = sum(getattr(s, f"{p}_seconds") for s in dec for p in parts)
    assert all(getattr(s, f"{p}_seconds") >= 0 for s in dec for p in parts)
    assert 0.9 * total <= covered <= total, (covered, total)
    assert stats["decode_launch_ms_mean"] is not None and stats["decode_emit_ms_mean"] is not None
    if plan_ahead:
        assert sum(s.plan_ahead_seconds for s in dec) > 0 and sum(s.enqueue_seconds for s in dec) > 0
