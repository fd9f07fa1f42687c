"""Haystack text and passkey prompts (tokenizer only, except the one greedy-decoding check)."""

from __future__ import annotations

import pytest
import torch

from ucm_trt.models import FILLER_SENTENCES, Haystack, build_passkey_prompt, haystack_text


def test_essay_haystack_is_read_from_the_wheel():
    hay = haystack_text(source="essays")
    assert hay.source == "essays"
    # 49 essays, 643,830 characters of text (shared/reference/models.md §6), joined by blank lines
    assert 640_000 < len(hay.text) < 650_000
    assert hay.text == haystack_text(source="auto").text


def test_filler_haystack_is_deterministic_and_long_enough():
    a = haystack_text(source="filler", min_chars=10_000)
    assert a.source == "filler"
    assert len(a.text) >= 10_000
    assert a.text.startswith(FILLER_SENTENCES)
    assert a == haystack_text(source="filler", min_chars=10_000)


@pytest.mark.parametrize("source", ["essays", "filler"])
@pytest.mark.parametrize("depth", [0.0, 0.5, 1.0])
def test_passkey_prompt_length_and_needle_position(smollm2, source, depth):
    _, tok = smollm2
    p = build_passkey_prompt(
        tok, num_tokens=1024, passkey=52917, depth=depth, haystack=haystack_text(source=source)
    )
    assert abs(p.num_tokens - 1024) <= 8
    assert p.input_ids.dtype == torch.int64 and p.input_ids.shape == (1, p.num_tokens)
    assert p.haystack_source == source
    assert p.text.endswith("What is the pass key? The pass key is")
    start, end = p.needle_token_span
    needle = tok.decode(p.input_ids[0, start:end])
    assert "The pass key is 52917. Remember it. 52917 is the pass key." in needle
    # the needle sits near the requested depth of the prompt
    assert abs(start / p.num_tokens - depth) < 0.15
    assert p.is_correct(" 52917. Remember") and not p.is_correct(" 12345")


def test_passkey_prompt_offsets_give_different_haystacks(smollm2):
    _, tok = smollm2
    a = build_passkey_prompt(tok, num_tokens=512, passkey="7", offset_chars=0)
    b = build_passkey_prompt(tok, num_tokens=512, passkey="7", offset_chars=50_000)
    assert a.text != b.text and a.passkey == b.passkey == "7"


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        ({"num_tokens": 40}, ValueError, "at least 16 haystack tokens"),
        ({"num_tokens": 1024.0}, TypeError, "num_tokens must be an int"),
        ({"passkey": "12a"}, ValueError, "passkey must be"),
        ({"passkey": -3}, ValueError, "passkey must be"),
        ({"passkey": True}, TypeError, "passkey must be"),
        ({"depth": 1.5}, ValueError, r"depth must be a number in \[0, 1\]"),
        ({"offset_chars": -1}, ValueError, "offset_chars must be"),
        ({"haystack": "text"}, TypeError, "haystack must be a Haystack"),
        ({"haystack": Haystack(text=FILLER_SENTENCES, source="filler")}, ValueError, "haystack has only"),
    ],
)
def test_passkey_prompt_rejects_bad_arguments(smollm2, kwargs, exc, match):
    _, tok = smollm2
    args = {"num_tokens": 1024, "passkey": 123, **kwargs}
    with pytest.raises(exc, match=match):
        build_passkey_prompt(tok, **args)


def test_haystack_rejects_bad_arguments():
    with pytest.raises(ValueError, match="source must be one of"):
        haystack_text(source="wiki")
    with pytest.raises(ValueError, match="min_chars must be a positive int"):
        haystack_text(source="filler", min_chars=0)


def test_dense_model_finds_the_passkey(smollm2):
    """The task is solvable by the dense model, so sparse-vs-dense passkey comparisons are meaningful."""
    model, tok = smollm2
    p = build_passkey_prompt(tok, num_tokens=512, passkey=80314, depth=0.5)
    with torch.no_grad():
        out = model.generate(p.input_ids, max_new_tokens=6, do_sample=False, pad_token_id=tok.eos_token_id)
    answer = tok.decode(out[0, p.num_tokens :])
    assert p.is_correct(answer), answer
