"""The chat says when a sparse algorithm ran a turn dense, and why (issue 17): a conversation shorter
than ``min_blocks`` blocks attends to every block. The rule per algorithm (ESA/KVStar once per turn
from the prompt; GSA per retrieval and GSA On-Device per step) is checked on its own, then against
what the runtime really selected in a chat turn on SmolLM2."""

from __future__ import annotations

import io

import pytest

from ucm_trt.chat.session import ChatSession, ChatSettings, dense_reason


@pytest.mark.parametrize(
    "algorithm, prompt, new, expect",
    [
        ("dense", 10, 5, None),  # dense is not a sparse algorithm running dense
        ("rerope", 10, 5, None),
        # block 64, min_blocks 4: ESA/KVStar/GSA sparse from (4 - 1) * 64 + 1 = 193 tokens
        ("esa", 192, 50, "this turn ran dense: the conversation is 192 tokens"),
        ("esa", 193, 50, None),
        ("kvstar", 100, 500, "this turn ran dense"),  # decided once per turn, from the prompt
        ("gsa", 100, 50, "this turn ran dense: the conversation stayed at 149 tokens or fewer"),
        ("gsa", 180, 50, "the first steps of this turn ran dense: the 180-token conversation"),
        ("gsa", 193, 50, None),
        # GSA On-Device: sparse from min_blocks * block size = 256 tokens
        ("gsa-on-device", 200, 56, "this turn ran dense: the conversation stayed at 255 tokens or fewer"),
        ("gsa-on-device", 200, 57, "the first steps of this turn ran dense"),
        ("gsa-on-device", 256, 5, None),
    ],
)
def test_dense_reason_rule(algorithm, prompt, new, expect):
    why = dense_reason(ChatSettings(algorithm=algorithm, block_size=64), prompt, new)
    if expect is None:
        assert why is None
    else:
        assert why is not None and why.startswith(expect), why
        sparse_from = 256 if algorithm == "gsa-on-device" else 193
        assert f"min_blocks 4 x block size 64 (sparse from {sparse_from} tokens)" in why


def test_chat_turn_says_it_ran_dense(chat_model, doc_file):
    from ucm_trt.chat.app import _Console, chat_loop
    from ucm_trt.runtime import TorchBackend

    model, tok = chat_model
    session = ChatSession(TorchBackend(model), tok, backend_label="torch/cpu:reference",
                          settings=ChatSettings(algorithm="esa", block_size=16, max_new_tokens=3))
    out, err = io.StringIO(), io.StringIO()
    script = f"Hi!\n/load {doc_file}\nWhat is the secret code of the blue team?\n/quit\n"
    assert chat_loop(session, _Console(io.StringIO(script), out, err)) == 0
    text = out.getvalue()
    stats = [line for line in text.splitlines() if line.startswith("[stats] ")]
    notes = [line for line in text.splitlines() if line.startswith("[chat] note: ")]
    assert len(stats) == 2 and err.getvalue() == "", text + err.getvalue()
    # turn 1: a few dozen tokens < 4 blocks of 16: dense, said in the stats line and in a note
    assert "ran dense (see note)" in stats[0] and ("blocks/step all" in stats[0] or "(100%)" in stats[0]), stats[0]
    assert len(notes) == 1 and "this turn ran dense: the conversation is" in notes[0]
    assert "shorter than min_blocks 4 x block size 16 (sparse from 49 tokens); esa decides once per turn" in notes[0]
    # turn 2: the document makes it ~13 blocks: sparse, no note
    assert "ran dense" not in stats[1] and "blocks/step all" not in stats[1] and "(100%)" not in stats[1]
    assert session.last_stats.dense_reason is None and session.last_stats.selected_fraction < 1
