"""``ucm-trt bench`` (CPU figures): pipeline, JSON schema, bad arguments, and the retrieval math.

These check the pipeline and the correctness of what is timed, never a speed.
"""

from __future__ import annotations

import json

import pytest
import torch

from ucm_trt.bench.cpu import (
    RetrievalShape,
    all_layers_case,
    floor_case,
    half_storage_case,
    retrieval_case,
    time_median,
)
from ucm_trt.cli import main
from ucm_trt.config import Budget, SparseConfig


@pytest.fixture(scope="module")
def quick_result(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "quick.json"
    rc = main(["bench", "--quick", "--out", str(out)])
    assert rc == 0
    return json.loads(out.read_text())


def test_quick_json_schema(quick_result):
    r = quick_result
    assert r["schema_version"] == 1
    assert "load_average_at_end" in r["machine"]
    for key in ("cpu_model", "logical_cores", "torch_threads_default", "load_average_1_5_15", "date_utc"):
        assert key in r["machine"], key
    s = r["settings"]
    assert s["quick"] is True
    ret = r["retrieval"]
    assert ret["target"]["ms_per_step_per_seq"] == 1.0 and ret["target"]["num_blocks"] == 1024
    rows = ret["rows"]
    variants = {"all_layers", "all_layers_per_head", "per_layer", "batched", "bare_torch_floor",
                "score_only_bf16_matmul", "score_only_bf16_upcast", "score_only_fp16_upcast"}
    assert len(rows) == len(s["blocks"]) * len(s["threads"]) * len(variants)
    assert {(x["num_blocks"], x["threads"], x["variant"]) for x in rows} == {
        (b, t, v) for b in s["blocks"] for t in s["threads"] for v in variants}
    for x in rows:
        assert x["min_ms"] <= x["ms_per_step_per_seq"] <= x["max_ms"]
        assert x["context_tokens"] == x["num_blocks"] * ret["shape"]["block_size"]
        assert x["repeats"] == s["repeats"]
        assert 0 < x["selected_blocks_per_head"] < x["num_blocks"]
        width = 2 if x["variant"].startswith("score_only_") else 4
        assert x["rep_bytes_per_step"] == ret["shape"]["num_layers"] * x["num_blocks"] * 8 * 128 * width
        assert x["read_bandwidth_gbps"] > 0 and x["read_floor_ms"] > 0
        assert x["calls_per_step"] == (ret["shape"]["num_layers"] if x["variant"] == "per_layer" else 1)
        if x["variant"].startswith("all_layers"):
            assert x["score_ms"] > 0 and x["select_ms"] > 0
        if x["variant"] == "all_layers":
            assert 0 <= x["differs_from_per_layer_layers"] <= ret["shape"]["num_layers"]
    over = ret["per_call_overhead"]
    assert over["all_layers_ms_per_step"] > 0
    assert over["plan"]["num_blocks"] == 1024 and over["plan"]["selected_per_head"] == 128
    assert min(over["plan"][k] for k in ("old_per_layer_ms", "cached_ms", "rebuild_ms")) > 0
    off = r["offload"]["rows"]
    assert {(x["algorithm"], x["retrieval_stride"], x["budget_ratio"]) for x in off} == {
        (a, st, ra) for a in ("esa", "gsa") for st in s["strides"] for ra in s["ratios"]}
    for x in off:
        # max_new_tokens = settings' decode_steps; the first new token comes from the prefill step
        assert x["decode_steps"] == s["decode_steps"] - 1
        assert x["bytes_equal_loaded_blocks_x_block_bytes"] is True
        assert 0.0 <= x["cache_hit_rate"] <= 1.0
        assert x["decode_blocks_loaded_total"] <= x["decode_blocks_needed_total"]
        assert x["decode_bytes_h2d_per_step_mean"] * x["decode_steps"] == pytest.approx(
            x["decode_blocks_loaded_total"] * x["block_bytes_per_layer"])
        # offload holds less than dense at the last decode step
        assert x["device_kv_bytes_last_decode"] < x["dense_kv_bytes_last_decode"]


def _naive_shared_selection(q, reps, sparse, num_blocks):
    """Independent reference: per layer, scores summed over KV heads of (group-mean q) . rep,
    sink/local forced, floor(ratio * candidates) best candidates."""
    L, hq, d = q.shape
    hkv = reps.shape[2]
    out = []
    for layer in range(L):
        qg = q[layer].view(hkv, hq // hkv, d).mean(1)  # [Hkv, D]
        s = torch.einsum("hd,nhd->n", qg.double(), reps[layer].double())
        forced = set(range(sparse.sink_blocks)) | set(range(num_blocks - sparse.local_blocks, num_blocks))
        cand = [n for n in range(num_blocks) if n not in forced]
        k = max(1, int(sparse.budget.value * len(cand)))
        best = sorted(cand, key=lambda n: -float(s[n]))[:k]
        out.append(sorted(forced | set(best)))
    return out


@pytest.mark.parametrize("num_blocks", [9, 40])
def test_retrieval_variants_match_reference(num_blocks):
    shape = RetrievalShape(num_layers=3, num_heads=8, num_kv_heads=2, head_dim=16, block_size=16)
    sparse = SparseConfig(block_size=16, budget=Budget.ratio(0.25))
    per_layer, batched = retrieval_case(shape, num_blocks, sparse, seed=3)
    g = torch.Generator().manual_seed(3)  # retrieval_case draws q then reps from this seed
    q = torch.randn(3, 8, 16, generator=g)
    reps = torch.randn(3, num_blocks, 2, 16, generator=g)
    want = _naive_shared_selection(q, reps, sparse, num_blocks)
    b = batched()
    for layer, sel in enumerate(per_layer()):
        for h in range(shape.num_kv_heads):
            got = [int(x) for x in sel[h] if x >= 0]
            assert got == want[layer]
            assert [int(x) for x in b[layer, h] if x >= 0] == want[layer]
    floor = floor_case(shape, num_blocks, sparse, seed=3)()
    for layer in range(3):
        assert sorted(int(x) for x in floor[layer]) == want[layer]
    step, score, select, reference = all_layers_case(shape, num_blocks, sparse, seed=3)
    a = step()
    assert a.shape[:2] == (3, shape.num_kv_heads) and torch.equal(select(), a)
    for layer in range(3):
        for h in range(shape.num_kv_heads):
            assert [int(x) for x in a[layer, h] if x >= 0] == want[layer]
        assert torch.equal(reference()[layer], a[layer, :, : reference()[layer].shape[-1]])
    torch.testing.assert_close(score(), torch.einsum("lhd,lnhd->lhn", q.view(3, 2, 4, 16).mean(2), reps))
    # half-precision storage variants score the same queries against rounded representations
    for variant in ("score_only_bf16_matmul", "score_only_bf16_upcast", "score_only_fp16_upcast"):
        got = half_storage_case(shape, num_blocks, variant, seed=3)()[:, :, 0].float()
        r = reps.to(torch.float16 if "fp16" in variant else torch.bfloat16).float()
        want_s = torch.einsum("lhd,lnhd->lhn", q.view(3, 2, 4, 16).mean(2), r)
        tol = 0.1 if variant == "score_only_bf16_matmul" else 1e-4
        torch.testing.assert_close(got, want_s, rtol=tol, atol=tol)
    with pytest.raises(ValueError, match="variant must be one of"):
        half_storage_case(shape, num_blocks, "score_only_int8")
    # per-head selection: each KV head ranks its own scores
    ph = SparseConfig(block_size=16, budget=Budget.ratio(0.25), selection="per_head")
    b = all_layers_case(shape, num_blocks, ph, seed=3)[0]()
    s = torch.einsum("lhd,lnhd->lhn", q.view(3, 2, 4, 16).mean(2).double(), reps.double())
    k = max(1, int(0.25 * (num_blocks - 3)))
    for layer in range(3):
        for h in range(2):
            cand = range(1, num_blocks - 2)
            best = sorted(cand, key=lambda n: -float(s[layer, h, n]))[:k]
            assert [int(x) for x in b[layer, h] if x >= 0] == sorted({0, num_blocks - 2, num_blocks - 1} | set(best))


def test_time_median_and_shape_errors():
    r = time_median(lambda: None, warmup=0, repeats=3)
    assert r["min_ms"] <= r["median_ms"] <= r["max_ms"] and r["repeats"] == 3
    with pytest.raises(ValueError, match="repeats must be a positive int, got 0"):
        time_median(lambda: None, warmup=0, repeats=0)
    with pytest.raises(ValueError, match="warmup must be an int >= 0, got -1"):
        time_median(lambda: None, warmup=-1, repeats=1)
    with pytest.raises(ValueError, match="num_heads must be a multiple of num_kv_heads"):
        RetrievalShape(num_heads=6, num_kv_heads=4)
    with pytest.raises(ValueError, match="ESA scoring"):
        retrieval_case(RetrievalShape(num_layers=1), 16, SparseConfig(representation="minmax", scoring="quest"))


@pytest.mark.parametrize(("argv", "needle"), [
    (["--blocks", "abc"], "--blocks must be comma-separated integers, got 'abc'"),
    (["--blocks", "4"], "--blocks values must be >= 8, got '4'"),
    (["--threads", "0"], "--threads values must be >= 1, got '0'"),
    (["--repeats", "1,2"], "--repeats must be one integer, got '1,2'"),
    (["--warmup", "-1"], "--warmup values must be >= 0, got '-1'"),
    (["--ratios", "1.5"], "--ratios values must be in (0, 1), got '1.5'"),
    (["--ratios", "x"], "--ratios must be comma-separated numbers, got 'x'"),
    (["--strides", "0"], "--strides values must be >= 1, got '0'"),
    (["--skip-retrieval", "--skip-offload"], "leave nothing to run"),
])
def test_bad_arguments_exit_2_one_line(argv, needle, capsys):
    assert main(["bench", "--quick", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert err.startswith("ucm-trt bench: error: ") and needle in err


def test_out_is_directory_exit_2(tmp_path, capsys):
    assert main(["bench", "--quick", "--skip-offload", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "is a directory" in err


def test_unknown_option_exit_2(capsys):
    with pytest.raises(SystemExit) as e:
        main(["bench", "--no-such-option"])
    assert e.value.code == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
