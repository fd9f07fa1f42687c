"""``ucm-trt run`` end to end on a tiny checkpoint (random Llama + the SmolLM2 tokenizer)."""

from __future__ import annotations

import json
import shutil

import pytest

from ucm_trt.cli import main
from ucm_trt.runtime.algorithms import ALGORITHMS
from ucm_trt.runtime.cli_run import RUN_ALGORITHMS

from .conftest import tiny_llama


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from ucm_trt.models import smollm2_checkpoint_dir

    d = tmp_path_factory.mktemp("tinyckpt")
    tiny_llama(vocab=49152).save_pretrained(d)
    src = smollm2_checkpoint_dir()
    for f in src.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")) or f.name.endswith(".jinja"):
            shutil.copy(f, d / f.name)
    return d


def test_run_algorithms_match_the_registry():
    from ucm_trt.graph.driver import ALGORITHMS as GRAPH_ALGORITHMS

    assert RUN_ALGORITHMS == ALGORITHMS == GRAPH_ALGORITHMS  # one list of names across rewrite and run


@pytest.mark.parametrize("algorithm", ["dense", "esa"])
def test_run_prints_text_and_stats(algorithm, tiny_dir, capsys):
    prompt = "The quick brown fox jumps over the lazy dog. " * 30
    # --dense-layers none: the random tiny model's layers are diffuse, auto detection would run them all dense
    rc = main(["run", "--prompt", prompt, "--model", str(tiny_dir), "--algorithm", algorithm,
               "--max-new-tokens", "6", "--block-size", "16", "--stride", "2", "--json", "--dense-layers", "none"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    stats = out["stats"]
    assert isinstance(out["text"], str)
    assert stats["algorithm"] == algorithm and stats["generated_tokens"] >= 1
    assert stats["prompt_tokens"] > 200
    assert stats["decode_steps"] == stats["generated_tokens"] - 1
    if stats["decode_steps"]:
        assert stats["decode_tokens_per_s"] > 0
    if algorithm == "esa":
        assert stats["offload"] is True and stats["retrieval_tasks"] > 0
        assert stats["policy"]["selected_block_fraction"] < 0.8


def test_run_usage_errors_are_one_line(tiny_dir, capsys):
    rc = main(["run", "--prompt", "hi", "--model", str(tiny_dir), "--backend", "ort"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err == "ucm-trt run: error: --backend ort needs --onnx PATH (a model rewritten by 'ucm-trt rewrite')"
    rc = main(["run", "--prompt", "hi", "--model", str(tiny_dir), "--max-new-tokens", "0"])
    assert rc == 2 and "--max-new-tokens must be >= 1, got 0" in capsys.readouterr().err
    rc = main(["run", "--prompt", "hi", "--model", str(tiny_dir), "--onnx", "x.onnx", "--no-validate"])
    assert rc == 2 and "--no-validate applies to --backend torch" in capsys.readouterr().err
    rc = main(["run", "--prompt", "hi", "--model", str(tiny_dir), "--onnx", "x.onnx", "--validate"])
    assert rc == 2 and "--validate applies to --backend torch" in capsys.readouterr().err


def test_run_no_validate_reports_cuda_graph_state(tiny_dir, capsys):
    """--no-validate reaches the backend; on the CPU there are no CUDA graphs and the stats say so."""
    rc = main(["run", "--prompt", "hello there", "--model", str(tiny_dir), "--max-new-tokens", "3",
               "--no-validate", "--json"])
    assert rc == 0
    stats = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["stats"]
    assert stats["cuda_graph"] is False and stats["eager_decode_steps"] == 2


def test_run_on_onnx_runtime_backend(tiny_dir, tmp_path, capsys):
    """``--onnx``: the ONNX Runtime backend on a model exported and rewritten by ucm_trt.graph."""
    from ucm_trt.graph import RewriteConfig, export_hf_model, rewrite_model, save_model

    from .conftest import tiny_llama

    src = export_hf_model(tiny_llama(vocab=49152), tmp_path / "tiny.onnx")
    model, _ = rewrite_model(src, config=RewriteConfig(algorithm="esa", block_size=16))
    path = save_model(model, tmp_path / "tiny-esa.onnx")
    prompt = "The quick brown fox jumps over the lazy dog. " * 30
    rc = main(["run", "--prompt", prompt, "--model", str(tiny_dir), "--onnx", str(path), "--algorithm", "esa",
               "--max-new-tokens", "6", "--block-size", "16", "--stride", "2", "--json", "--dense-layers", "none"])
    assert rc == 0
    stats = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["stats"]
    assert stats["attention"] == "onnxruntime (esa graph)" and stats["algorithm"] == "esa"
    assert stats["retrieval_tasks"] > 0 and stats["policy"]["selected_block_fraction"] < 0.8
    # the same model with another block size, an ONNX file ONNX Runtime cannot parse, and a model that was
    # never rewritten: one line naming the flag each (issue 17), exit 2
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"\x08\x07 not a model")
    for argv, msg in (
        (["--onnx", str(path), "--block-size", "32"], "--block-size 32 differs from the block size"),
        (["--onnx", str(garbage)], "cannot be loaded by ONNX Runtime (InvalidProtobuf"),
        (["--onnx", str(src)], "is not a ucm_trt-rewritten model"),
    ):
        assert main(["run", "--prompt", "hi", "--model", str(tiny_dir), *argv]) == 2
        err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert len(err) == 1 and err[0].startswith("ucm-trt run: error: --") and msg in err[0], err


# ------------------------------------------------------------------------------------------ blend

CHUNKS = ["The Eiffel Tower is in Paris, the capital of France. It was built in 1889 for the World's Fair. " * 2,
          "Mount Fuji is the highest mountain in Japan, near Tokyo. It last erupted in 1707. " * 3]
QUESTION = " Question: in which city is the Eiffel Tower? Answer:"


def _blend(tiny_dir, capsys, *extra, json_out=True, chunks=CHUNKS):
    argv = ["run", "--algorithm", "blend", "--model", str(tiny_dir), "--prompt", QUESTION, "--block-size", "16",
            "--max-new-tokens", "8"]
    for c in chunks:
        argv += ["--chunk", c]
    argv += list(extra) + (["--json"] if json_out else [])
    rc = main(argv)
    out = capsys.readouterr().out
    assert rc == 0, out
    return json.loads(out.strip().splitlines()[-1]) if json_out else out


def _expected_blocks(tiny_dir, chunks=CHUNKS):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_dir, local_files_only=True)
    sizes = [len(tok(c, add_special_tokens=False)["input_ids"]) for c in chunks]
    return sizes, [-(-n // 16) for n in sizes], len(tok(QUESTION, add_special_tokens=False)["input_ids"])


def test_blend_defaults_and_policy_names_match_the_library():
    from ucm_trt.chat._names import CHAT_ALGORITHMS
    from ucm_trt.config import BlendConfig
    from ucm_trt.runtime.algorithms import POLICY_ALGORITHMS
    from ucm_trt.runtime.cli_run import BLEND_DEFAULTS

    cfg = BlendConfig()
    assert BLEND_DEFAULTS == {k: getattr(cfg, k) for k in BLEND_DEFAULTS}
    assert "blend" in ALGORITHMS and "blend" not in POLICY_ALGORITHMS
    assert CHAT_ALGORITHMS == POLICY_ALGORITHMS


def test_make_policy_refuses_blend_and_says_how_to_run_it():
    from ucm_trt.runtime.algorithms import make_policy, sparse_config_for

    with pytest.raises(ValueError, match=r"'blend' is not a per-step policy.*BlendRunner"):
        make_policy("blend")
    sc = sparse_config_for("blend")
    assert (sc.representation, sc.scoring) == ("mean", "dot")  # what its dense decode reads


def test_blend_run_prints_text_and_stats(tiny_dir, capsys):
    out = _blend(tiny_dir, capsys, json_out=False)
    lines = out.splitlines()
    stats_at = lines.index("--- stats ---")
    assert stats_at >= 1 and "--- full prefill (--compare-full) ---" not in lines  # the streamed text comes first
    kv = dict(line.split(": ", 1) for line in lines[stats_at + 1:])
    sizes, blocks, q = _expected_blocks(tiny_dir)
    reused = sum(blocks) * 16
    assert kv["algorithm"] == "blend" and kv["decode_algorithm"] == "dense" and kv["attention"] == "torch"
    assert kv["blend.chunks"] == "2" and kv["blend.chunk_tokens"] == str([b * 16 for b in blocks])
    assert kv["blend.chunk_pad_tokens"] == str([b * 16 - n for b, n in zip(blocks, sizes, strict=True)])
    assert int(kv["prompt_tokens"]) == reused + q and kv["blend.suffix_tokens"] == str(q)
    # every chunk block was cached first, then reused; 20 % of the reused tokens recomputed from layer 1
    assert kv["blend.cached_blocks"] == kv["blend.reused_blocks"] == str(sum(blocks))
    assert kv["blend.recomputed_tokens"] == str(int(0.2 * reused))
    assert kv["blend.reused_tokens"] == str(reused - int(0.2 * reused))
    assert kv["blend.fallback_to_full_prefill"] == "False" and float(kv["blend.ttft_seconds"]) > 0
    assert kv["prefill_steps"] == "1"  # Blend prefills the whole prompt in one step
    assert "blend.greedy_agreement" not in kv


def test_blend_compare_full_reports_ttft_and_agreement(tiny_dir, capsys):
    out = _blend(tiny_dir, capsys, "--compare-full", "--recompute-ratio", "0")
    b = out["stats"]["blend"]
    assert b["recomputed_tokens"] == 0 and b["reused_tokens"] == b["reused_blocks"] * 16
    assert b["full_prefill_ttft_seconds"] > 0 and b["ttft_seconds"] > 0
    assert b["ttft_speedup_vs_full"] == pytest.approx(b["full_prefill_ttft_seconds"] / b["ttft_seconds"])
    assert 0 <= b["greedy_agreement"] <= 1 and isinstance(out["full_prefill_text"], str)
    # no recompute after layer 0 on this random model changes the output: the comparison must see it
    assert b["greedy_agreement"] < 1 and b["identical_prefix_tokens"] < out["stats"]["generated_tokens"]
    assert b["first_token_equal"] == (b["identical_prefix_tokens"] > 0)


@pytest.mark.parametrize("layer", ["0", "1"])
def test_blend_recompute_ratio_one_reproduces_full_prefill(layer, tiny_dir, capsys):
    out = _blend(tiny_dir, capsys, "--compare-full", "--recompute-ratio", "1.0", "--recompute-layer", layer)
    b, st = out["stats"]["blend"], out["stats"]
    assert b["reused_blocks"] > 0 and b["reused_tokens"] == 0 and b["recomputed_tokens"] == b["reused_blocks"] * 16
    assert b["greedy_agreement"] == 1.0 and b["identical_prefix_tokens"] == st["generated_tokens"] == 8
    assert out["text"] == out["full_prefill_text"]


def test_blend_chunk_files_padding_and_fallback(tiny_dir, tmp_path, capsys):
    f = tmp_path / "doc.txt"
    f.write_text(CHUNKS[1])
    out = _blend(tiny_dir, capsys, "--chunk-file", str(f), "--chunk-pad-token", "0", "--min-reused-blocks", "100",
                 chunks=CHUNKS[:1])
    b = out["stats"]["blend"]
    sizes, blocks, _ = _expected_blocks(tiny_dir)  # the file holds chunk 2: same tokens, same order
    assert b["chunk_tokens"] == [n * 16 for n in blocks] and b["chunk_pad_tokens"][1] == blocks[1] * 16 - sizes[1]
    assert b["fallback_to_full_prefill"] is True and b["reused_blocks"] == 0  # reported, not silent


@pytest.mark.parametrize(
    "extra, msg",
    [
        (["--backend", "ort"], "--algorithm blend needs --backend torch, got --backend ort: algorithm 'blend' cannot "
                               "be combined with the onnxruntime backend: its prefill drops token rows"),
        (["--onnx", "m.onnx"], "--algorithm blend needs --backend torch, got --backend ort (chosen by --onnx)"),
        (["--recompute-ratio", "1.5"], "--recompute-ratio must be in [0, 1] (a fraction of the reused tokens), got 1.5"),
        (["--recompute-ratio", "-0.1"], "--recompute-ratio must be in [0, 1]"),
        (["--recompute-layer", "2"], "--recompute-layer must be < the model's 2 layers, got 2"),
        (["--recompute-layer", "-1"], "--recompute-layer must be >= 0, got -1"),
        (["--min-reused-blocks", "0"], "--min-reused-blocks must be >= 1, got 0"),
        (["--chunk-pad-token", "49152"], "--chunk-pad-token must be < the model's vocabulary size (49152), got 49152"),
        (["--chat"], "--chat does not apply to --algorithm blend"),
        (["--compare-full", "--temperature", "0.7", "--seed", "1"],
         "--compare-full compares greedy outputs and needs --temperature 0, got 0.7"),
        (["--chunk-file", "/nonexistent/doc.txt"], "--chunk-file '/nonexistent/doc.txt' does not exist"),
        (["--chunk", ""], "--chunk number 3 is empty; every chunk needs text"),
        (["--prefill-chunk", "64"], "exceed --prefill-chunk (64)"),
    ],
)
def test_blend_bad_arguments_are_one_line_errors(extra, msg, tiny_dir, capsys):
    argv = ["run", "--algorithm", "blend", "--model", str(tiny_dir), "--prompt", QUESTION, "--block-size", "16",
            "--chunk", CHUNKS[0], "--chunk", CHUNKS[1], *extra]
    assert main(argv) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip() and "Loading weights" not in line]
    assert len(err) == 1 and err[0].startswith("ucm-trt run: error: ") and msg in err[0], err


def test_blend_needs_chunks_and_blend_options_need_blend(tiny_dir, capsys):
    assert main(["run", "--algorithm", "blend", "--model", str(tiny_dir), "--prompt", "hi"]) == 2
    assert capsys.readouterr().err.strip() == (
        "ucm-trt run: error: --algorithm blend needs at least one --chunk TEXT or --chunk-file PATH (the reusable "
        "document chunks; --prompt/--prompt-file is the question after them)")
    assert main(["run", "--algorithm", "esa", "--model", str(tiny_dir), "--prompt", "hi", "--chunk", "x",
                 "--recompute-ratio", "0", "--compare-full"]) == 2
    assert capsys.readouterr().err.strip() == (
        "ucm-trt run: error: --chunk/--chunk-file, --recompute-ratio, --compare-full only apply to --algorithm "
        "blend, got --algorithm esa")


def test_blend_chunk_file_must_be_utf8(tiny_dir, tmp_path, capsys):
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\xe9".encode("latin-1"))
    assert main(["run", "--algorithm", "blend", "--model", str(tiny_dir), "--prompt", QUESTION,
                 "--chunk-file", str(bad)]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip() and "Loading weights" not in line]
    assert len(err) == 1 and err[0].startswith(f"ucm-trt run: error: --chunk-file {str(bad)!r} is not UTF-8 text ("), err


@pytest.mark.parametrize(
    "argv, msg",
    [
        (["--max-seq-len", "4"], "leaves no room to generate within --max-seq-len (4)"),
        (["--device-blocks", "1", "--algorithm", "esa"], "--device-blocks must be >= 2, got 1"),
        (["--algorithm", "gsa-on-device", "--rollback-layers", "7"], "--rollback-layers names layer 7, but the model has"),
    ],
)
def test_runtime_errors_name_the_flag(tiny_dir, capsys, argv, msg):
    """Settings the runtime refuses (issue 17: they named RuntimeConfig / GSAOnDeviceConfig fields)."""
    assert main(["run", "--prompt", "hello there my friend", "--model", str(tiny_dir), "--max-new-tokens", "2",
                 *argv]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip() and not line.startswith("Loading")]
    assert len(err) == 1 and err[0].startswith("ucm-trt run: error: ") and msg in err[0], err
