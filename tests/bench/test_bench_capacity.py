"""benchmarks/bench_capacity.py: the capacity arithmetic, the filled prefill, and a tiny-shape run of
the whole benchmark on the CPU (JSON schema, ratios, table). These check what is computed and
measured, never a speed."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from ucm_trt.config import Budget, SparseConfig
from ucm_trt.runtime import Engine, RuntimeConfig, SamplingParams, TorchBackend
from ucm_trt.runtime.algorithms import make_policy, sparse_config_for

_PATH = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_capacity.py"
_spec = importlib.util.spec_from_file_location("bench_capacity", _PATH)
bc = importlib.util.module_from_spec(_spec)
sys.modules["bench_capacity"] = bc  # as an import would (dataclasses look their module up there)
_spec.loader.exec_module(bc)

GIB = 2**30


def _sparse(bs: int = 64) -> SparseConfig:
    return sparse_config_for("esa", SparseConfig(block_size=bs, budget=Budget.ratio(0.125), retrieval_stride=4))


# ------------------------------------------------------------------ arithmetic
@pytest.mark.parametrize("shape,kib_per_token", [("llama1b", 32), ("llama8b", 128)])
def test_bytes_per_token_from_first_principles(shape, kib_per_token):
    spec = bc.SHAPES[shape]
    plan = bc.plan_capacity(spec, sequence_len=131072, decode_steps=40, kv_budget_gib=40.0, host_gib=108,
                            sparse=_sparse(), cache_blocks=2, dtype_bytes=2)
    # K and V, kv_heads x head_dim bf16 values each, per layer
    assert plan.bytes_per_token_per_layer == 2 * spec.kv_heads * spec.head_dim * 2
    assert plan.bytes_per_token == kib_per_token * 1024
    assert plan.sequence_gib == pytest.approx(131072 * kib_per_token / 2**20)
    assert plan.context_len == 131072 - 64 and plan.sequence_blocks == 2048


@pytest.mark.parametrize("shape", ["llama1b", "llama8b"])
@pytest.mark.parametrize("ctx", [32768, 131072])
def test_default_budget_stops_dense_at_two_at_the_longest_context(shape, ctx):
    spec = bc.SHAPES[shape]
    budget = bc.default_kv_budget_gib(spec, 131072, block_size=64, dtype_bytes=2, dense_batch=2)
    plan = bc.plan_capacity(spec, sequence_len=ctx, decode_steps=40, kv_budget_gib=budget, host_gib=108,
                            sparse=_sparse(), cache_blocks=2, dtype_bytes=2)
    bb = 2 * spec.kv_heads * 64 * spec.head_dim * 2
    per_layer = budget * GIB / spec.layers
    assert plan.dense_pool_blocks == int(per_layer // bb)
    n = plan.max_batch["dense"]
    # n full sequences (+ the null block) fit, n + 1 do not
    assert n * plan.sequence_blocks + 1 <= plan.dense_pool_blocks < (n + 1) * plan.sequence_blocks + 1
    if ctx == 131072:
        assert n == 2
    # GSA On-Device's hash codes (head_dim bits per token and kv head) share the budget
    codes = spec.kv_heads * 64 * spec.head_dim // 8
    assert plan.gsa_on_device_pool_blocks == int(per_layer // (bb + codes))
    assert plan.max_batch["gsa-on-device"] == (plan.gsa_on_device_pool_blocks - 1) // plan.sequence_blocks == n


# the arithmetic table of docs/runtime.md ("Throughput at the capacity wall"): budget GiB, host-store
# sequences and largest batches (dense, GSA On-Device, ESA, GSA, KVStar, ESA with GPU representations)
_DOC_TABLE = {
    ("llama1b", 32768): (8.5, 108, (8, 8, 56, 55, 56, 50)),
    ("llama1b", 131072): (8.5, 27, (2, 2, 9, 9, 9, 8)),
    ("llama8b", 32768): (34.0, 27, (8, 8, 27, 27, 27, 27)),
    ("llama8b", 131072): (34.0, 6, (2, 2, 6, 6, 6, 6)),
}


@pytest.mark.parametrize("key", list(_DOC_TABLE))
def test_the_arithmetic_docs_runtime_md_states(key):
    shape, ctx = key
    spec = bc.SHAPES[shape]
    budget = bc.default_kv_budget_gib(spec, 131072, block_size=64, dtype_bytes=2)
    plan = bc.plan_capacity(spec, sequence_len=ctx, decode_steps=32, kv_budget_gib=budget, host_gib=108,
                            sparse=_sparse(), cache_blocks=2, dtype_bytes=2)
    want_budget, want_host, want_batches = _DOC_TABLE[key]
    assert budget == want_budget and plan.host_store_gib == pytest.approx(108) and plan.host_limit_sequences == want_host
    got = tuple(plan.max_batch[a] for a in ("dense", "gsa-on-device", "esa", "gsa", "kvstar", "esa-gpu-reps"))
    assert got == want_batches


def test_offload_batch_keeps_room_for_one_prefill_and_respects_the_host_store():
    spec = bc.SHAPES["llama1b"]
    sparse = _sparse()
    plan = bc.plan_capacity(spec, sequence_len=131072, decode_steps=40, kv_budget_gib=8.5, host_gib=108,
                            sparse=sparse, cache_blocks=2, dtype_bytes=2)
    # ESA working set: 1 sink + 2 local + floor(0.125 * (2047 - 3)) selected + 1 decode block + 2 cache
    assert plan.working_set_blocks["esa"] == 3 + 255 + 1 + 2
    assert plan.working_set_blocks["gsa"] == plan.working_set_blocks["esa"] + 1  # the prefetch block
    for alg in ("esa", "gsa", "kvstar"):
        n, ws = plan.max_batch[alg], plan.working_set_blocks[alg]
        assert plan.pool_blocks[alg] == plan.dense_pool_blocks
        # one prompt being prefilled (every block resident) + n - 1 working sets fit, one more does not
        def fits(k: int, ws: int = ws) -> bool:
            return plan.sequence_blocks + (k - 1) * ws <= plan.dense_pool_blocks - 1

        assert n <= plan.host_limit_sequences
        assert fits(n)
        assert n == plan.host_limit_sequences or not fits(n + 1)
    # GPU-resident representations (float32 [Hkv, D] per block = 1/64 of a bf16 block of 64 tokens)
    # come out of the same budget: the pool shrinks by every sequence's representations
    reps = plan.device_rep_blocks["esa-gpu-reps"]
    assert reps == math.ceil(2047 / 64) and plan.device_rep_blocks["esa"] == 0
    n = plan.max_batch["esa-gpu-reps"]
    assert plan.pool_blocks["esa-gpu-reps"] == plan.dense_pool_blocks - n * reps
    assert plan.sequence_blocks + (n - 1) * plan.working_set_blocks["esa"] <= plan.pool_blocks["esa-gpu-reps"] - 1
    assert plan.sequence_blocks + reps + n * (plan.working_set_blocks["esa"] + reps) > plan.dense_pool_blocks - 1
    assert n <= plan.max_batch["esa"]
    # KVStar's compact vote tiles: float16 [Hkv=8, 16 kept channels of 64, 32 sub-blocks] + a mask byte per
    # sub-block per block, 2048 prompt-block slots (64 tiles of 32), + an 8-byte id per block, in 128 KiB blocks
    per_block = 8 * 16 * 32 * 2 + 32
    want = math.ceil((2048 * per_block + 2047 * 8) / (64 * 8 * 64 * 2 * 2))
    assert plan.device_rep_blocks["kvstar-gpu-reps"] == want and plan.device_rep_blocks["kvstar"] == 0
    assert plan.pool_blocks["kvstar-gpu-reps"] == plan.dense_pool_blocks - plan.max_batch["kvstar-gpu-reps"] * want
    with pytest.raises(ValueError, match="esa, gsa or kvstar"):
        bc.device_rep_blocks(spec, 10, 64, 2, "dense")
    # a host store of 4 sequences (1 GiB per layer) caps the batch
    small = bc.plan_capacity(spec, sequence_len=131072, decode_steps=40, kv_budget_gib=8.5, host_gib=16,
                             sparse=sparse, cache_blocks=2, dtype_bytes=2)
    assert small.host_limit_sequences == 4 and small.max_batch["esa"] == 4


@pytest.mark.parametrize("shape,host_gib", [("llama1b", 108), ("llama8b", 108), ("llama1b", 64), ("llama8b", 63.9)])
def test_host_store_fills_its_budget_at_the_exact_size(shape, host_gib):
    """Page-locked at their exact size, the layers' stores use the budget up to less than one block each."""
    spec = bc.SHAPES[shape]
    n = bc.host_store_blocks(spec, host_gib, block_size=64, dtype_bytes=2)
    bb = 2 * spec.kv_heads * 64 * spec.head_dim * 2
    assert spec.layers * n * bb <= host_gib * GIB < spec.layers * (n + 1) * bb


def test_bad_arguments_are_refused():
    spec = bc.SHAPES["llama1b"]
    with pytest.raises(ValueError, match="decode-steps"):
        bc.plan_capacity(spec, sequence_len=32768, decode_steps=64, kv_budget_gib=8, host_gib=64, sparse=_sparse(),
                         cache_blocks=2, dtype_bytes=2)
    with pytest.raises(ValueError, match="multiple of the block size"):
        bc.plan_capacity(spec, sequence_len=32768 + 3, decode_steps=8, kv_budget_gib=8, host_gib=64,
                         sparse=_sparse(), cache_blocks=2, dtype_bytes=2)
    with pytest.raises(ValueError, match="less than one block"):
        bc.host_store_blocks(spec, 1e-6, block_size=64, dtype_bytes=2)
    with pytest.raises(ValueError, match="one-token chunk"):
        bc.check_chunking(4097, 4096)
    with pytest.raises(SystemExit):
        bc.parse_args(["--shapes", "tiny", "llama1b", "--kv-budget-gib", "1"])
    with pytest.raises(SystemExit):
        bc.parse_args(["--decode-steps", "8", "--warmup-steps", "8"])
    with pytest.raises(ValueError, match="NAME=VALUE"):
        bc.parse_runtime_options(["max_batch=4"])  # the benchmark sets it from the plan
    with pytest.raises(ValueError, match="NAME=VALUE"):
        bc.parse_runtime_options(["early_prefetch"])
    assert bc.parse_runtime_options(["early_prefetch=true", "max_cuda_graphs=8"]) == (
        ("early_prefetch", True), ("max_cuda_graphs", 8))


# ------------------------------------------------------------------ the filled prefill
@pytest.fixture(scope="module")
def tiny_model():
    return bc.build_model(bc.SHAPES["tiny"], dtype=torch.float32, device="cpu", max_positions=1024)


def _prefill_all(engine: Engine, prompts: list[list[int]]) -> list[str]:
    started: set[str] = set()
    rids = [engine.add_request(p, SamplingParams(max_new_tokens=4), on_token=lambda rid, _t: started.add(rid))
            for p in prompts]
    while len(started) < len(rids):
        engine.step()
    return rids


def _engine(model, backend, algorithm: str = "esa") -> Engine:
    sparse = sparse_config_for(algorithm, SparseConfig(block_size=16, budget=Budget.ratio(0.25), retrieval_stride=2))
    rt = RuntimeConfig(max_batch=2, max_seq_len=512, prefill_chunk=128, cache_blocks=1, num_device_blocks=60)
    return Engine(backend, make_policy(algorithm), sparse=sparse, config=rt)


def test_filled_prefill_leaves_the_engine_state_a_real_prefill_leaves(tiny_model):
    """Same prompts, real prefill vs filled: the same blocks resident per layer, the same host ids
    and written-back counts, policy state of the same form (representations of every prompt block,
    a first selection of the same shape), and decoding goes on from there."""
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 256, (n,), generator=g).tolist() for n in (384, 288)]
    states = []
    for fill in (False, True):
        backend = TorchBackend(tiny_model)
        if fill:
            backend = bc.FilledPrefillBackend(backend, vocab_size=256, seed=3)
        eng = _engine(tiny_model, backend)
        rids = _prefill_all(eng, prompts)
        seqs = [eng.kv.seqs[r] for r in rids]
        pol = [eng.policy._state[r] for r in rids]
        states.append({
            "seq_len": [s.seq_len for s in seqs], "flushed": [s.flushed for s in seqs],
            "host_ids": [s.host_ids.copy() for s in seqs], "resident": [(s.table != 0).copy() for s in seqs],
            "reps": [p.store.num_blocks for p in pol], "sel_shape": [tuple(p.sel.shape[:2]) for p in pol],
            "device_blocks": eng.kv.device_blocks_held(),
        })
        while eng.has_work:
            eng.step()
        assert all(len(eng.result(r).token_ids) == 4 for r in rids)
        eng.close()
    real, filled = states
    for key in ("seq_len", "flushed", "reps", "sel_shape", "device_blocks"):
        assert real[key] == filled[key], key
    for a, b in zip(real["host_ids"] + real["resident"], filled["host_ids"] + filled["resident"], strict=True):
        np.testing.assert_array_equal(a, b)
    assert real["flushed"] == [384 // 16, 288 // 16]


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_filled_prefill_writes_its_random_kv_into_the_host_store(tiny_model, device):
    """The K/V the fill draws (reproduced from its seed, in its draw order) is what the host store
    holds for every written-back block (on CUDA: the pinned store, through the side-stream
    write-back), and decoding goes on from there (on CUDA: replayed CUDA graphs)."""
    model = tiny_model.to(device)
    backend = TorchBackend(model, attention="auto", validate=False)
    eng = _engine(model, bc.FilledPrefillBackend(backend, vocab_size=256, seed=11))
    prompt = list(range(1, 129))  # one chunk of 128 tokens = 8 blocks of 16
    [rid] = _prefill_all(eng, [prompt])
    if device == "cuda":
        torch.cuda.synchronize()
        assert eng.kv.host[0].is_pinned()
    shape = eng.shape
    g = torch.Generator(device=device).manual_seed(11)
    seq = eng.kv.seqs[rid]
    for layer in range(shape.num_layers):
        k = torch.randn(1, shape.num_kv_heads, 128, shape.head_dim, generator=g, device=device)
        v = torch.randn(1, shape.num_kv_heads, 128, shape.head_dim, generator=g, device=device)
        w = min(128, max(1, eng.policy.query_window))  # the queries the policy reads at prefill end
        torch.randn(1, shape.num_q_heads, w, shape.head_dim, generator=g, device=device)
        host = eng.kv.host[layer][torch.from_numpy(seq.host_ids[:8])]  # [8, 2, Hkv, 16, D]
        want_k = k[0].reshape(shape.num_kv_heads, 8, 16, shape.head_dim).permute(1, 0, 2, 3).cpu()
        want_v = v[0].reshape(shape.num_kv_heads, 8, 16, shape.head_dim).permute(1, 0, 2, 3).cpu()
        torch.testing.assert_close(host[:, 0], want_k, rtol=0, atol=0)
        torch.testing.assert_close(host[:, 1], want_v, rtol=0, atol=0)
    while eng.has_work:
        eng.step()
    assert len(eng.result(rid).token_ids) == 4
    if device == "cuda":
        assert eng.stats()["cuda_graph_replays"] > 0
    eng.close()
    tiny_model.to("cpu")


def test_filled_prefill_feeds_gsa_on_device_hash_codes(tiny_model):
    from ucm_trt.config import GSAOnDeviceConfig

    sparse = sparse_config_for("gsa-on-device", SparseConfig(block_size=16, budget=Budget.ratio(0.25)))
    rt = RuntimeConfig(max_batch=1, max_seq_len=512, prefill_chunk=128)
    policy = make_policy("gsa-on-device", gsa_on_device=GSAOnDeviceConfig(top_k_tokens=64, seq_len_threshold=0))
    eng = Engine(bc.FilledPrefillBackend(TorchBackend(tiny_model), vocab_size=256, seed=5), policy, sparse=sparse,
                 config=rt)
    [rid] = _prefill_all(eng, [list(range(1, 129))])
    for layer in range(eng.shape.num_layers):
        phys = torch.from_numpy(eng.kv.seqs[rid].table[layer, :8].astype(np.int64))
        k = eng.kv.pools[layer][phys, 0]  # [8, Hkv, 16, D]
        want = policy.encoders[layer].encode(k.permute(0, 2, 1, 3).reshape(-1, k.shape[1], k.shape[-1]))
        got = policy.codes[layer][phys].permute(0, 2, 1, 3).reshape(want.shape)
        assert torch.equal(got, want)
    eng.close()


# ------------------------------------------------------------------ the whole benchmark, tiny shape
def test_tiny_run_writes_rows_summary_and_table(tmp_path, capsys):
    rc = bc.main(["--shapes", "tiny", "--contexts", "512", "--algorithms", "dense", "gsa-on-device", "esa", "gsa",
                  "kvstar", "--block-size", "16", "--decode-steps", "8",
                  "--warmup-steps", "3", "--stride", "2", "--host-gib", "0.002", "--turnovers", "random",
                  "--threads", "1", "--out-dir", str(tmp_path)])
    assert rc == 0
    [path] = tmp_path.glob("capacity_*.json")
    d = json.loads(path.read_text())
    assert d["card"] == "cpu" and d["plans"][0]["context_len"] == 496
    runs = [r for r in d["rows"] if r["kind"] == "run"]
    summary = [r for r in d["rows"] if r["kind"] == "summary"]
    plan = d["plans"][0]
    assert {r["algorithm"] for r in runs} == {"dense", "gsa-on-device", "esa", "gsa", "kvstar"}
    for r in runs:
        for key in ("context_len", "algorithm", "batch", "tokens_per_s", "kv_budget_gib", "turnover", "shape"):
            assert r[key] is not None, key
        assert r["tokens_per_s"] > 0 and r["measured_steps"] == 8 - 3
        assert r["prefill_tokens"] == r["batch"] * 496 and r["prefill"] == "fill"
        if r["batch_kind"] == "max":
            assert r["batch"] == plan["max_batch"][r["algorithm"]]
        else:
            assert r["batch"] == 1 and r["speedup_vs_dense"] > 0
    dense1 = next(r for r in runs if r["algorithm"] == "dense" and r["batch_kind"] == "one")
    esa1 = next(r for r in runs if r["algorithm"] == "esa" and r["batch_kind"] == "one")
    assert esa1["speedup_vs_dense"] == pytest.approx(esa1["tokens_per_s"] / dense1["tokens_per_s"])
    [s] = summary
    best = max((r for r in runs if r["offload"] and r["batch_kind"] == "max"), key=lambda r: r["tokens_per_s"])
    dense = next(r for r in runs if r["algorithm"] == "dense" and r["batch_kind"] == "max")
    assert s["capacity_speedup_vs_dense"] == pytest.approx(best["tokens_per_s"] / dense["tokens_per_s"])
    assert s["best_offload_batch"] > s["dense_batch"]
    # offload runs moved blocks host -> device and held fewer device bytes than their dense equivalent
    esa = next(r for r in runs if r["algorithm"] == "esa" and r["batch_kind"] == "max")
    assert esa["host_kv_bytes_peak"] > 0 and esa["device_kv_bytes_peak"] < esa["dense_kv_bytes"]
    out = capsys.readouterr().out
    assert "cap x" in out.splitlines()[-2] and out.splitlines()[-1].startswith("tiny")
    md = bc.markdown_table(d["rows"]).splitlines()
    assert len(md) == 3 and md[2].startswith("| tiny | 512 | random |")
    assert f"| {s['capacity_speedup_vs_dense']:.2f}x |" in md[2]


def test_tiny_run_realistic_turnover_and_gpu_representations(tmp_path):
    """The realistic run: a query drift calibrated to the target, used by every offload policy (and
    its measured top-k turnover is far below the random run's); dense and GSA On-Device rows are
    shared by both turnovers; the GPU-representation variant runs ESA with device representations."""
    rc = bc.main(["--shapes", "tiny", "--contexts", "1024", "--algorithms", "dense", "gsa-on-device", "esa",
                  "esa-gpu-reps", "kvstar-gpu-reps", "--block-size", "16", "--decode-steps", "12", "--warmup-steps", "4", "--stride", "2",
                  "--host-gib", "0.004", "--realistic-turnover", "0.05", "--no-batch1", "--threads", "1",
                  "--out-dir", str(tmp_path)])
    assert rc == 0
    [path] = tmp_path.glob("capacity_*.json")
    d = json.loads(path.read_text())
    [model] = d["turnover_models"]
    assert 0 < model["persistence"] <= 1 and abs(model["calibrated_topk_turnover"] - 0.05) <= 0.05
    assert model["source"] == "--realistic-turnover"
    runs = [r for r in d["rows"] if r["kind"] == "run"]
    assert {(r["algorithm"], r["turnover"]) for r in runs} == {
        (a, t) for a in ("dense", "gsa-on-device", "esa", "esa-gpu-reps", "kvstar-gpu-reps")
        for t in ("random", "realistic")}
    assert all(r["turnover_independent"] == (r["algorithm"] in ("dense", "gsa-on-device")) for r in runs)
    assert all(r["batch_kind"] == "max" for r in runs)  # --no-batch1
    esa = {r["turnover"]: r for r in runs if r["algorithm"] == "esa"}
    assert esa["realistic"]["policy"]["query_drift_persistence"] == model["persistence"]
    assert esa["random"]["policy"]["query_drift_persistence"] is None
    assert esa["realistic"]["topk_turnover_measured"] < 0.5 * esa["random"]["topk_turnover_measured"]
    gpu = next(r for r in runs if r["algorithm"] == "esa-gpu-reps" and r["turnover"] == "random")
    assert gpu["policy"]["representations"] == "device" and esa["random"]["policy"]["representations"] == "host"
    # the representations the policy held stay within what the plan took out of the device budget
    plan = d["plans"][0]
    block = plan["bytes_per_token_per_layer"] * plan["block_size"]
    allowed = gpu["batch"] * plan["device_rep_blocks"]["esa-gpu-reps"] * block * bc.SHAPES["tiny"].layers
    assert 0 < gpu["policy"]["representation_bytes_peak"] <= allowed
    kv = next(r for r in runs if r["algorithm"] == "kvstar-gpu-reps" and r["turnover"] == "random")
    assert kv["policy"]["representations"] == "device"
    allowed = kv["batch"] * plan["device_rep_blocks"]["kvstar-gpu-reps"] * block * bc.SHAPES["tiny"].layers
    assert 0 < kv["policy"]["representation_bytes_peak"] <= allowed
    summary = [r for r in d["rows"] if r["kind"] == "summary"]
    assert sorted(s["turnover"] for s in summary) == ["random", "realistic"]


def test_measured_turnover_reads_the_smollm2_summary(tmp_path):
    rows = [{"block_size": 64, "ratio": 0.125, "selection": "shared", "stride": 4, "topk_turnover": 0.2},
            {"block_size": 64, "ratio": 0.125, "selection": "per_head", "stride": 4, "topk_turnover": 0.9},
            {"block_size": 32, "ratio": 0.125, "selection": "shared", "stride": 4, "topk_turnover": 0.9}]
    (tmp_path / "turnover_smollm2_8k.json").write_text(json.dumps({"summary": rows}))
    (tmp_path / "turnover_smollm2_16k.json").write_text(json.dumps({"summary": [{**rows[0], "topk_turnover": 0.3}]}))
    value, source = bc.measured_turnover(tmp_path, block_size=64, ratio=0.125, stride=4)
    assert value == pytest.approx(0.25) and "turnover_smollm2_8k.json" in source
    with pytest.raises(ValueError, match="--realistic-turnover"):
        bc.measured_turnover(tmp_path, block_size=64, ratio=0.25, stride=4)


def test_a_budget_that_fits_nothing_is_reported_not_hidden(tmp_path, capsys):
    rc = bc.main(["--shapes", "tiny", "--contexts", "512", "--algorithms", "dense", "esa", "--kv-budget-gib", "0.0001",
                  "--block-size", "16", "--decode-steps", "4", "--warmup-steps", "2", "--host-gib", "0.002",
                  "--turnovers", "random", "--out-dir", str(tmp_path)])
    assert rc == 1
    d = json.loads(next(tmp_path.glob("capacity_*.json")).read_text())
    runs = [r for r in d["rows"] if r["kind"] == "run"]
    assert len(runs) == 2 and all("no batch fits the budget" in r["error"] for r in runs)
    assert "2 error rows" in capsys.readouterr().out


@pytest.mark.gpu
def test_tiny_run_on_cuda(tmp_path):
    """The whole benchmark on the GPU at the tiny shape (bf16, pinned host store, CUDA graphs, every
    default algorithm, both turnovers): no error row, graphs replayed."""
    algorithms = list(bc.DEFAULT_ALGORITHMS)
    rc = bc.main(["--shapes", "tiny", "--contexts", "1024", "--algorithms", *algorithms, "--realistic-turnover", "0.2",
                  "--block-size", "16", "--decode-steps", "12", "--warmup-steps", "4", "--stride", "2",
                  "--host-gib", "0.004", "--out-dir", str(tmp_path)])
    d = json.loads(next(tmp_path.glob("capacity_*.json")).read_text())
    assert rc == 0, [r["error"] for r in d["rows"] if "error" in r]
    assert d["card"] != "cpu" and d["dtype"] == "bfloat16"
    runs = [r for r in d["rows"] if r["kind"] == "run"]
    assert {r["algorithm"] for r in runs} == set(algorithms)
    assert all(r["cuda_graph_replays_total"] > 0 for r in runs)


def test_missing_turnover_measurement_skips_the_realistic_runs_loudly(tmp_path, capsys):
    rc = bc.main(["--shapes", "tiny", "--contexts", "512", "--algorithms", "dense", "esa", "--block-size", "16",
                  "--decode-steps", "4", "--warmup-steps", "2", "--stride", "2", "--host-gib", "0.004", "--no-batch1",
                  "--turnover-dir", str(tmp_path), "--out-dir", str(tmp_path)])
    assert rc == 1
    d = json.loads(next(tmp_path.glob("capacity_*.json")).read_text())
    assert [(s["algorithm"], s["turnover"]) for s in d["skipped"]] == [("esa", "realistic")]
    assert "no SmolLM2 turnover measurement" in d["skipped"][0]["reason"]
    assert {(r["algorithm"], r["turnover"]) for r in d["rows"] if r["kind"] == "run"} == {
        ("dense", "random"), ("dense", "realistic"), ("esa", "random")}
    assert "WARNING: the realistic-turnover runs are skipped" in capsys.readouterr().out


def test_tiny_run_with_the_model_prefill(tmp_path):
    """``--prefill model`` runs the real chunked prefill instead of the fill; same rows."""
    rc = bc.main(["--shapes", "tiny", "--contexts", "512", "--algorithms", "dense", "esa", "--prefill", "model",
                  "--fill-chunk", "128", "--block-size", "16", "--decode-steps", "6", "--warmup-steps", "2",
                  "--stride", "2", "--host-gib", "0.004", "--turnovers", "random", "--no-batch1", "--threads", "1",
                  "--out-dir", str(tmp_path)])
    assert rc == 0
    d = json.loads(next(tmp_path.glob("capacity_*.json")).read_text())
    runs = [r for r in d["rows"] if r["kind"] == "run"]
    assert {r["algorithm"] for r in runs} == {"dense", "esa"} and all(r["prefill"] == "model" for r in runs)
    assert all(r["prefill_tokens"] == r["batch"] * 496 and r["tokens_per_s"] > 0 for r in runs)


def test_job_order_runs_what_the_capacity_speedup_needs_first():
    jobs = bc.job_order(["dense", "gsa-on-device", "esa", "gsa", "kvstar"], [32768, 131072], ["random", "realistic"])
    assert jobs[:8] == [(32768, "dense", "random"), (32768, "gsa-on-device", "random"), (32768, "esa", "random"),
                        (32768, "esa", "realistic"), (131072, "dense", "random"), (131072, "gsa-on-device", "random"),
                        (131072, "esa", "random"), (131072, "esa", "realistic")]
    assert jobs[8:] == [(c, a, t) for c in (32768, 131072) for a in ("gsa", "kvstar") for t in ("random", "realistic")]
    # by default the realistic turnover runs before the random one (a time-limited call gets the target's row first)
    assert bc.job_order(["dense", "esa"], [32768], list(bc.TURNOVERS)) == [
        (32768, "dense", "random"), (32768, "esa", "realistic"), (32768, "esa", "random")]


def test_max_minutes_records_what_it_leaves_out(tmp_path):
    rc = bc.main(["--shapes", "tiny", "--contexts", "512", "--algorithms", "dense", "esa", "--max-minutes", "0",
                  "--block-size", "16", "--decode-steps", "4", "--warmup-steps", "2", "--host-gib", "0.004",
                  "--turnovers", "random", "--out-dir", str(tmp_path)])
    d = json.loads(next(tmp_path.glob("capacity_*.json")).read_text())
    assert rc == 0 and not [r for r in d["rows"] if r["kind"] == "run"]
    assert [(s["algorithm"], s["turnover"]) for s in d["skipped"]] == [("dense", "random"), ("esa", "random")]
    assert all("--max-minutes" in s["reason"] for s in d["skipped"])
