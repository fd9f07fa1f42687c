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
    assert RUN_ALGORITHMS == ALGORITHMS


@pytest.mark.parametrize("algorithm", ["dense", "esa"])
def test_run_prints_text_and_stats(algorithm, tiny_dir, capsys):
    prompt = "The quick brown fox jumps over the lazy dog. " * 30
    rc = main(["run", "--prompt", prompt, "--model", str(tiny_dir), "--algorithm", algorithm,
               "--max-new-tokens", "6", "--block-size", "16", "--stride", "2", "--json"])
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


def test_run_on_onnx_runtime_backend(tiny_dir, tmp_path, capsys):
    """``--onnx``: the ONNX Runtime backend on a model exported and rewritten by ucm_trt.graph."""
    from ucm_trt.graph import RewriteConfig, export_hf_model, rewrite_model, save_model

    from .conftest import tiny_llama

    src = export_hf_model(tiny_llama(vocab=49152), tmp_path / "tiny.onnx")
    model, _ = rewrite_model(src, config=RewriteConfig(algorithm="esa", block_size=16))
    path = save_model(model, tmp_path / "tiny-esa.onnx")
    prompt = "The quick brown fox jumps over the lazy dog. " * 30
    rc = main(["run", "--prompt", prompt, "--model", str(tiny_dir), "--onnx", str(path), "--algorithm", "esa",
               "--max-new-tokens", "6", "--block-size", "16", "--stride", "2", "--json"])
    assert rc == 0
    stats = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["stats"]
    assert stats["attention"] == "onnxruntime (esa graph)" and stats["algorithm"] == "esa"
    assert stats["retrieval_tasks"] > 0 and stats["policy"]["selected_block_fraction"] < 0.8
