"""passkey_side_by_side: a passkey buried in filler text, answered with dense and sparse attention."""

from __future__ import annotations

import io

import pytest

from ucm_trt.chat.demo_passkey import passkey_side_by_side


def test_dense_and_esa_side_by_side(chat_model):
    from ucm_trt.models import haystack_text

    model, tok = chat_model
    buf = io.StringIO()
    runs = passkey_side_by_side(num_tokens=320, algorithms=("dense", "esa"), budget=0.3, block_size=16,
                                passkey=52917, max_new_tokens=7, model=model, tokenizer=tok,
                                haystack=haystack_text(source="filler"), file=buf)
    text = buf.getvalue()
    assert [r.algorithm for r in runs] == ["dense", "esa"]
    dense, esa = runs
    assert dense.correct and "52917" in dense.answer
    assert esa.correct == ("52917" in esa.answer)
    assert esa.correct, esa.answer  # the needle block is among the selected ones
    assert dense.stats.blocks_selected is None
    assert esa.stats.blocks_selected is not None and esa.stats.blocks_selected < esa.stats.blocks_total
    assert esa.stats.kv_held_bytes < esa.stats.kv_dense_bytes
    assert "backend: torch/cpu:torch" in text
    assert "prompt: 3" in text and "filler text, key 52917" in text
    for col in ("algorithm", "answer", "correct", "prefill s", "decode tok/s", "blocks/step sel/total",
                "KV held / dense"):
        assert col in text
    assert "esa @0.3" in text and "2/2 answers contain the pass key 52917" in text


@pytest.mark.parametrize(
    "kwargs, msg",
    [
        ({"num_tokens": 100}, "num_tokens must be an int in [256, 8000]"),
        ({"algorithms": ()}, "algorithms must be a non-empty sequence"),
        ({"algorithms": "esa"}, "algorithms must be a non-empty sequence"),
        ({"algorithms": ("dense", "quest")}, "'quest' is not one of"),
        ({"algorithms": ("esa", "esa")}, "must not repeat"),
        ({"budget": 0}, "budget must be a fraction in (0, 1]"),
        ({"block_size": 48}, "block_size must be a power of two"),
        ({"max_new_tokens": 0}, "max_new_tokens must be an int >= 1"),
        ({"depth": 1.5}, "depth must be in [0, 1]"),
        ({"model": object()}, "pass both model and tokenizer"),
    ],
)
def test_bad_arguments(kwargs, msg):
    with pytest.raises((ValueError, TypeError)) as e:
        passkey_side_by_side(**kwargs)
    assert msg in str(e.value)


@pytest.mark.parametrize(
    "argv, msg",
    [
        (["--tokens", "10"], "--tokens must be an int in [256, 8000]"),
        (["--block-size", "48"], "--block-size must be a power of two in [16, 256], got 48"),
        (["--budget", "0"], "--budget must be a fraction in (0, 1]"),
        (["--onnx", "/nonexistent/m.onnx"], "--onnx '/nonexistent/m.onnx' does not exist"),
    ],
)
def test_main_bad_arguments_exit_2(argv, msg, capsys):
    from ucm_trt.chat.demo_passkey import main

    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and msg in err, err
