"""Retrieval grid (ucm_trt.eval.grid): prompts, the agreement metric, and one tiny end-to-end run.

The end-to-end run uses the tiny random Llama and the byte-level tokenizer of tests/eval/conftest.py
(seconds); a real-model slice (SmolLM2, 1K tokens) is marked slow."""

from __future__ import annotations

import copy
import json

import pytest

from ucm_trt.config import AdaptiveBudget, DenseLayers, HeadMerge, KVStarConfig, PrefillWindow
from ucm_trt.eval.grid import (
    GRID_TASKS,
    GridConfig,
    build_grid_prompt,
    markdown_grid,
    method_adaptive,
    method_dense_layers,
    method_gsa_on_device_overrides,
    method_kvstar_config,
    method_policy_options,
    method_prefill_window,
    method_schedule,
    parse_method,
    run_grid,
    summarize,
)


@pytest.mark.parametrize("task", GRID_TASKS)
@pytest.mark.parametrize("depth", [0.1, 0.9])
def test_grid_prompts_hold_their_answers_at_the_depth(tiny_tokenizer, filler, task, depth):
    p = build_grid_prompt(tiny_tokenizer, filler, task=task, context_len=1500, depth=depth, sample=1)
    text = tiny_tokenizer.decode(p.input_ids)
    assert abs(len(p.input_ids) - 1500) <= 8
    for a in p.answers:
        assert a in text
    # the answer the question asks about sits near the cell's depth (the first answer's first mention)
    first = text.index(p.answers[0]) / len(text)
    assert abs(first - depth) < 0.2, (task, depth, first)
    assert not p.is_correct("nothing") and p.is_correct(" ".join(p.answers))
    again = build_grid_prompt(tiny_tokenizer, filler, task=task, context_len=1500, depth=depth, sample=1)
    assert again.input_ids == p.input_ids  # deterministic
    other = build_grid_prompt(tiny_tokenizer, filler, task=task, context_len=1500, depth=depth, sample=2)
    assert other.answers != p.answers


def test_multikey_asks_one_of_four_distinct_keys(tiny_tokenizer, filler):
    p = build_grid_prompt(tiny_tokenizer, filler, task="multikey", context_len=1500, depth=0.5, sample=0)
    text = tiny_tokenizer.decode(p.input_ids)
    assert text.count("\nThe pass key for the ") == 4 and len(p.answers) == 1
    asked = text.rsplit("What is the pass key for the ", 1)[1].split(" door")[0]
    assert f"The pass key for the {asked} door is {p.answers[0]}." in text


def _rec(task, method, budget, depth, correct, length=1024):
    return {"task": task, "context_len": length, "depth": depth, "sample": 0, "method": method, "budget": budget,
            "correct": correct}


def test_summarize_agreement_counts_only_prompts_dense_answers():
    recs = [_rec("passkey", "dense", None, d, c) for d, c in [(0.1, True), (0.5, True), (0.9, False)]]
    recs += [_rec("passkey", "esa", 0.125, d, c) for d, c in [(0.1, True), (0.5, False), (0.9, True)]]
    recs += [_rec("passkey", "kvstar", 0.125, d, c) for d, c in [(0.1, True), (0.5, True), (0.9, False)]]
    rows = {r["algorithm"]: r for r in summarize(recs)}
    assert rows["dense"]["dense_correct"] == 2 and rows["dense"]["agree_with_dense"] == 1.0
    assert rows["esa"]["agree_with_dense"] == 0.5 and rows["esa"]["n"] == 3 and rows["esa"]["dense_correct"] == 2
    assert rows["esa"]["accuracy"] == pytest.approx(2 / 3)  # right where dense was wrong: not agreement
    assert rows["kvstar"]["agree_with_dense"] == 1.0
    assert set(rows["esa"]) >= {"task", "algorithm", "budget", "context_len", "n", "dense_correct", "agree_with_dense"}
    none = summarize([_rec("passkey", "dense", None, 0.1, False), _rec("passkey", "esa", 0.125, 0.1, True)])
    assert {r["algorithm"]: r["agree_with_dense"] for r in none} == {"dense": None, "esa": None}
    with pytest.raises(ValueError, match="dense did not answer"):
        summarize([_rec("passkey", "esa", 0.125, 0.1, True)])
    md = markdown_grid(summarize(recs))
    assert "| dense | - | 2/3 |" in md and "| esa | 0.125 | 0.50 |" in md


def test_methods_and_config_validation():
    assert parse_method("esa") == ("esa", "default") and parse_method("gsa@ucm") == ("gsa", "ucm")
    assert parse_method("esa+sync") == ("esa", "default") and parse_method("gsa@ucm+sync") == ("gsa", "ucm")
    assert method_schedule("esa") and not method_schedule("esa@ucm+sync")
    with pytest.raises(ValueError, match="suffix must be"):
        parse_method("esa+fast")
    for bad in ("esa+w0", "esa+sync+sync", "esa+w4+w8", "esa+wmax", "esa+w4p", "esa+w4px"):
        with pytest.raises(ValueError, match="suffix must be"):
            parse_method(bad)
    with pytest.raises(ValueError, match="applies to esa and gsa only"):
        parse_method("kvstar+w8")
    assert method_prefill_window("esa") is None
    assert method_prefill_window("gsa@ucm+sync+w16:0.125") == PrefillWindow(tokens=16)
    assert method_prefill_window("esa+w8max") == PrefillWindow(tokens=8, reduce="max")
    assert method_prefill_window("esa+w8maxp0.5") == PrefillWindow(tokens=8, reduce="max", persist=0.5)
    assert method_prefill_window("gsa+w4p2") == PrefillWindow(tokens=4, persist=2.0)
    assert not method_schedule("esa+w8+sync") and method_schedule("esa+w8")
    with pytest.raises(ValueError, match="preset must be one of default, ucm"):
        parse_method("esa@fast")
    with pytest.raises(ValueError, match="algorithm must be one of"):
        parse_method("quest")
    with pytest.raises(ValueError, match="must include 'dense'"):
        GridConfig(methods=("esa",))
    with pytest.raises(ValueError, match="budgets values must be in"):
        GridConfig(budgets=(0.0,))
    assert GridConfig(methods=("dense", "esa"), budgets=(0.1, 0.2)).variants() == [
        ("dense", None), ("esa", 0.1), ("esa", 0.2)]
    assert GridConfig(methods=("dense", "esa", "esa@ucm:0.1", "esa+sync:0.3"), budgets=(0.1, 0.2)).variants() == [
        ("dense", None), ("esa", 0.1), ("esa", 0.2), ("esa@ucm", 0.1), ("esa+sync", 0.3)]
    assert parse_method("esa@ucm+sync:0.125") == ("esa", "ucm") and not method_schedule("esa+sync:0.125")
    for bad in ("esa:0", "esa:x", "esa:1.5"):
        with pytest.raises(ValueError, match="followed by a budget"):
            parse_method(bad)
    # +aX: the adaptive budget (AdaptiveBudget(max_missed=X)), esa and gsa only
    assert method_adaptive("esa") is None
    assert method_adaptive("esa+a0.1:0.125") == AdaptiveBudget(max_missed=0.1)
    assert method_adaptive("gsa@ucm+sync+a.05") == AdaptiveBudget(max_missed=0.05)
    assert parse_method("esa+a0.2+own") == ("esa", "default")
    for bad in ("esa+a0", "esa+a1.5", "esa+a0.1+a0.2", "esa+a", "esa+ax"):
        with pytest.raises(ValueError, match="suffix must be"):
            parse_method(bad)
    for algo in ("kvstar", "gsa-on-device"):
        with pytest.raises(ValueError, match=r"'\+aX' .* applies to esa and gsa only"):
            parse_method(f"{algo}+a0.1")
    # +crX: KVStar's channel ratio
    assert method_kvstar_config("kvstar") is None
    assert method_kvstar_config("kvstar+cr0.5:0.125") == KVStarConfig(channel_ratio=0.5)
    assert method_kvstar_config("kvstar+own+cr1") == KVStarConfig(channel_ratio=1.0)
    for bad in ("kvstar+cr0", "kvstar+cr1.5", "kvstar+cr0.5+cr1", "kvstar+cr"):
        with pytest.raises(ValueError, match="suffix must be"):
            parse_method(bad)
    with pytest.raises(ValueError, match=r"'\+crX' .* applies to kvstar only"):
        parse_method("esa+cr0.5")
    # +hbN: GSA On-Device's hash width (bits per head-dim channel), through the grid's config
    assert method_gsa_on_device_overrides("gsa-on-device") == {}
    assert method_gsa_on_device_overrides("gsa-on-device+hb8:0.125") == {"hash_bits_per_dim": 8}
    for bad in ("gsa-on-device+hb0", "gsa-on-device+hb17", "gsa-on-device+hb2+hb4", "gsa-on-device+hb"):
        with pytest.raises(ValueError, match="suffix must be"):
            parse_method(bad)
    with pytest.raises(ValueError, match=r"'\+hbN' .* applies to gsa-on-device only"):
        parse_method("esa+hb8")
    # +dtX / +dlL: the dense layers (detection threshold; layers always dense), over the preset's rule
    assert method_dense_layers("esa") is None
    assert method_dense_layers("esa+dt0.9") == DenseLayers(auto=True, threshold=0.9)
    assert method_dense_layers("kvstar+dl0_7:0.25") == DenseLayers(layers=(0, 7), auto=True, threshold=0.7)
    assert method_dense_layers("gsa@ucm+dl3") == DenseLayers(layers=(3,))  # upstream's rule: no detection
    assert method_dense_layers("gsa-on-device+dt1+dl0") == DenseLayers(layers=(0,), auto=True, threshold=1.0)
    for bad in ("esa+dt1.5", "esa+dt", "esa+dt0.5+dt0.6", "esa+dl", "esa+dl0_0", "esa+dl0_00", "esa+dl-1", "esa+dlx"):
        with pytest.raises(ValueError, match="suffix must be"):
            parse_method(bad)
    with pytest.raises(ValueError, match="do not apply to dense"):
        parse_method("dense+dt0.9")
    # what the engine's policy gets from the suffixes
    assert method_policy_options("esa:0.125") == {}
    assert method_policy_options("esa+w8max+union+a0.1") == {
        "prefill_window": PrefillWindow(tokens=8, reduce="max"), "head_merge": HeadMerge(mode="union"),
        "adaptive": AdaptiveBudget(max_missed=0.1)}
    assert method_policy_options("kvstar+own+cr0.5") == {"head_merge": HeadMerge(mode="own"),
                                                         "kvstar": KVStarConfig(channel_ratio=0.5)}
    assert method_policy_options("esa+dl0") == {"dense_layers": DenseLayers(layers=(0,), auto=True, threshold=0.7)}


def test_tiny_grid_runs_every_method_through_the_runtime(tiny_model, tiny_tokenizer, filler, tmp_path):
    from transformers import LlamaForCausalLM

    # own copy, config included: the runtime switches the attention implementation on the model's config
    # object, which the session fixture's model would otherwise share (and then run 'ucm_paged')
    model = LlamaForCausalLM(copy.deepcopy(tiny_model.config)).eval()
    model.load_state_dict(tiny_model.state_dict())
    cfg = GridConfig(tasks=("passkey", "multikey"), methods=("dense", "esa", "gsa", "gsa-on-device", "kvstar",
                                                             "esa@ucm", "esa+a0.05", "kvstar+cr0.5",
                                                             "gsa-on-device+hb2", "gsa+dl1+dt0"),
                     budgets=(0.25,), lengths=(1024,), depths=(0.5,), samples=1, block_size=32, batch=2,
                     prefill_chunk=256)
    seen = []
    records = run_grid(model, tiny_tokenizer, filler, cfg, on_records=lambda r: seen.append(len(r)), log=None)
    assert len(records) == 2 * 10 and seen[-1] == len(records) and len(seen) == 10
    rows = summarize(records)
    assert {(r["task"], r["algorithm"]) for r in rows} == {(t, m) for t in cfg.tasks for m in cfg.methods}
    for r in rows:
        assert r["n"] == 1 and r["context_len"] == 1024
    for rec in records:
        assert rec["prompt_tokens"] == pytest.approx(1024, abs=8)
        assert rec["run"]["seconds"] > 0
        # dense prefills the round's prompts, every other method replays them (runtime.prefill_cache)
        assert rec["run"]["prefills_replayed"] == (0 if rec["method"] == "dense" else 2)
        if rec["method"] not in ("dense", "esa@ucm"):  # default preset: dense layers detected and reported
            assert set(rec["run"]["dense_layer_counts"]) <= {0, 1}
        if rec["method"] == "gsa+dl1+dt0":  # layer 1 always dense; threshold 0 detects no other layer
            assert rec["run"]["dense_layer_counts"] == {1: 2}
        # the adaptive budget's counters reach the record (its retrievals counted), and only its
        assert ("adaptive" in rec["run"]) == (rec["method"] == "esa+a0.05")
        if rec["method"] == "esa+a0.05":
            assert rec["run"]["adaptive"]["layer_retrievals"] > 0
    json.dumps(records)  # the benchmark writes them as JSON


@pytest.mark.slow
def test_smollm2_passkey_slice_dense_and_esa_agree():
    from ucm_trt.models import haystack_text, load_smollm2

    model, tok = load_smollm2()
    cfg = GridConfig(tasks=("passkey",), methods=("dense", "esa"), budgets=(0.25,), lengths=(1024,),
                     depths=(0.5,), samples=1, batch=1)
    rows = summarize(run_grid(model, tok, haystack_text(source="essays"), cfg, log=None))
    dense = next(r for r in rows if r["algorithm"] == "dense")
    esa = next(r for r in rows if r["algorithm"] == "esa")
    assert dense["dense_correct"] == 1 and esa["agree_with_dense"] == 1.0


def test_vote_method_of_the_eval_scores_like_the_policies():
    import torch

    from ucm_trt.eval.methods import MethodContext, block_scores, make_selector
    from ucm_trt.sparse.policies._reps import host_layer_vote_scores
    from ucm_trt.sparse.representations import block_mean, tokens_to_blocks

    g = torch.Generator().manual_seed(0)
    q = torch.randn(3, 4, 8, generator=g)  # 3 queries, 4 heads
    k = torch.randn(2, 70, 8, generator=g)  # 2 KV heads, 70 tokens
    kb, lens = tokens_to_blocks(k, 16)
    got = block_scores("vote", q, kb, lens, MethodContext())
    for i in range(3):
        torch.testing.assert_close(got[i], host_layer_vote_scores(q[i], block_mean(kb, lens)), rtol=1e-5, atol=1e-6)
    sel = make_selector("vote", ratio=0.5, context=lambda layer: MethodContext())
    out = sel(0, q.transpose(0, 1)[None], k[None], 16)
    assert out.shape[:2] == (1, 2)


def test_grid_runs_in_rounds_and_stops_at_the_deadline(tiny_model, tiny_tokenizer, filler):
    import time

    from transformers import LlamaForCausalLM

    from ucm_trt.eval.grid import format_matrix

    model = LlamaForCausalLM(copy.deepcopy(tiny_model.config)).eval()
    model.load_state_dict(tiny_model.state_dict())
    cfg = GridConfig(tasks=("passkey",), methods=("dense", "esa", "esa+sync"), budgets=(0.25,), lengths=(512, 1024),
                     depths=(0.5,), samples=2, block_size=32, batch=2, prefill_chunk=256)
    order = []
    records = run_grid(model, tiny_tokenizer, filler, cfg, log=None,
                       on_records=lambda r: order.append((r[-1]["sample"], r[-1]["context_len"], r[-1]["method"])))
    # round 0 covers every length and method before round 1 starts; dense first in each (round, length)
    assert order == [(s, n, m) for s in (0, 1) for n in (512, 1024) for m in ("dense", "esa", "esa+sync")]
    assert len(records) == 12
    text = format_matrix(summarize(records))
    assert text.splitlines()[0].split() == ["passkey", "0.5K", "1K"]
    assert any(line.strip().startswith("esa @0.25") for line in text.splitlines())
    # a deadline already past: nothing starts; the records so far are returned, not an error
    assert run_grid(model, tiny_tokenizer, filler, cfg, log=None, deadline=time.perf_counter() - 1) == []
    # resumed: the finished engines are taken, not run (a past deadline would stop any engine that runs);
    # an engine with a missing answer runs again
    again = run_grid(model, tiny_tokenizer, filler, cfg, log=None, deadline=time.perf_counter() - 1, reuse=records)
    assert [{k: v for k, v in r.items() if k != "reused"} for r in again] == records
    assert all(r["reused"] for r in again)
    partial = run_grid(model, tiny_tokenizer, filler, cfg, log=None, deadline=time.perf_counter() - 1,
                       reuse=[r for r in records if r["method"] != "esa+sync" or r["sample"] == 0])
    assert len(partial) == 6 + 2  # round 0 all reused, round 1: dense and esa, then the deadline stops esa+sync


def test_report_reads_grid_and_rerope_rows_alone(tmp_path):
    """`quality_grid.py --report` builds the docs block from the JSON rows issue 15 asks for (no meta)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "quality_grid.py"
    spec = importlib.util.spec_from_file_location("quality_grid_under_test", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    grid = [{"task": "passkey", "algorithm": "dense", "budget": None, "context_len": 1024, "n": 4, "dense_correct": 3,
             "agree_with_dense": 1.0},
            {"task": "passkey", "algorithm": "esa", "budget": 0.125, "context_len": 1024, "n": 4, "dense_correct": 3,
             "agree_with_dense": 2 / 3}]
    rerope = [{"task": "passkey_rerope", "context_len": 16384, "n": 20, "accuracy": 0.95}]
    (tmp_path / "grid_x.json").write_text(json.dumps({"rows": grid}))
    (tmp_path / "rerope_grid_x.json").write_text(json.dumps({"rows": rerope}))
    docs = tmp_path / "q.md"
    docs.write_text(f"head\n{mod.DOC_BEGIN}\nold\n{mod.DOC_END}\ntail\n")
    assert mod.report([tmp_path / "grid_x.json", tmp_path / "rerope_grid_x.json"], docs) == 0
    text = docs.read_text()
    assert "old" not in text and text.startswith("head\n") and text.endswith("tail\n")
    assert "| dense | - | 3/4 |" in text and "| esa | 0.125 | 0.67 |" in text
    assert "| 16K | rerope | - | 20 | 0.95 |" in text
    assert (tmp_path / "grid_x.png").exists()
    (tmp_path / "other.json").write_text(json.dumps({"rows": [{"task": "chat"}]}))
    with pytest.raises(SystemExit, match="no grid rows"):
        mod.report([tmp_path / "other.json"], None)


def test_a_length_without_room_for_the_answer_is_refused_before_any_engine(tiny_model, tiny_tokenizer, filler):
    """The tiny model has 4096 positions: a 4096-token prompt leaves none for the answer (the H100 grid of
    2026-12-07 failed this way at 8192 on SmolLM2, at its first engine); the refusal names the length and
    the longest that fits, before anything runs."""
    from transformers import LlamaForCausalLM

    # own copy, config included: the runtime's backend switches the attention implementation on the model's
    # config, which the session fixture's model (shared with the sparse-LM tests) must keep
    model = LlamaForCausalLM(copy.deepcopy(tiny_model.config)).eval()
    model.load_state_dict(tiny_model.state_dict())
    cfg = GridConfig(tasks=("passkey",), methods=("dense",), budgets=(0.25,), lengths=(4096,), depths=(0.5,),
                     samples=1, block_size=32, batch=1, prefill_chunk=256)
    seen = []
    with pytest.raises(ValueError, match=r"GridConfig.lengths: 4096 leaves no room for the answer within the "
                                         r"model's 4096 positions.*use a length <= 40\d\d"):
        run_grid(model, tiny_tokenizer, filler, cfg, on_records=seen.append, log=None)
    assert seen == []
    assert tiny_model.config._attn_implementation == "sdpa"  # the shared fixture is untouched
