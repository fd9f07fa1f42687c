"""ChatSession on SmolLM2 through the runtime's PyTorch backend (CPU): streaming, history with the
chat template, algorithm/budget switches, documents, stats, and errors that leave the history as
it was. Replies are a few tokens and prompts a few hundred tokens, so each turn takes seconds."""

from __future__ import annotations

import pytest

from ucm_trt.chat.session import ChatError, ChatSession, ChatSettings


@pytest.fixture
def session(chat_model):
    from ucm_trt.runtime import TorchBackend

    model, tok = chat_model
    return ChatSession(TorchBackend(model), tok, settings=ChatSettings(max_new_tokens=6, block_size=16),
                       backend_label="torch/cpu:reference")


def test_turns_stream_keep_history_and_switch_algorithm(session, doc_file):
    deltas: list[str] = []
    r1 = session.send("What is the capital of France?", deltas.append)
    assert len(deltas) >= 2 and "".join(deltas) == r1.text  # streamed piecewise, nothing lost
    assert "Paris" in r1.text
    assert r1.stats.algorithm == "dense" and r1.stats.blocks_selected is None and r1.stats.retrieval_tasks == 0
    assert 1 <= r1.stats.new_tokens <= 6
    assert [m["role"] for m in session.messages] == ["user", "assistant"]
    assert session.messages[1]["content"] == r1.text.strip()

    # the rendered prompt of the next turn holds the whole conversation in the chat template
    tok = session.tokenizer
    nxt = tok.decode(session.prompt_ids("And of Italy?"))
    assert nxt.count("<|im_start|>user") == 2 and "capital of France" in nxt and r1.text.strip() in nxt
    assert nxt.rstrip().endswith("<|im_start|>assistant")

    info = session.load_document(doc_file)
    assert 120 < info.tokens < 220 and session.document is info
    session.set_algorithm("esa")
    session.set_budget(0.3)
    r2 = session.send("What is the secret code of the blue team?")
    s = r2.stats
    assert s.algorithm == "esa" and s.budget == 0.3
    assert s.prompt_tokens > r1.stats.prompt_tokens + info.tokens  # history + document + question
    # sparse: 1 sink + 2 local + floor(0.3 * candidates) of ~14 blocks per (layer, KV head)
    nb = -(-s.prompt_tokens // 16)
    assert s.blocks_total >= nb
    assert s.selected_fraction is not None and 0.2 < s.selected_fraction < 0.7
    k = int(0.3 * (nb - 3))  # Budget.ratio: floor(ratio * candidates)
    # at least the budget per (layer, KV head); more where the default preset's automatic dense layers
    # (diffuse layers detected at prefill end) read every block
    assert 3 + k - 1.01 <= s.blocks_selected <= 3 + k + (nb - 3 - k) * 0.5, (s.blocks_selected, nb, k)
    assert s.blocks_selected < s.blocks_total
    assert s.retrieval_tasks > 0 and s.retrieval_ms > 0
    assert s.bytes_h2d > 0 and s.bytes_d2h > 0  # offload: blocks written back, working set prefetched
    assert s.kv_dense_bytes is not None and s.kv_held_bytes < s.kv_dense_bytes
    assert session.document is None  # consumed by the turn
    assert [m["role"] for m in session.messages] == ["user", "assistant"] * 2
    assert "secret code of the blue team is 4417" in session.messages[2]["content"]

    session.reset()
    assert session.messages == [] and session.document is None and session.last_stats is None
    assert session.settings.algorithm == "esa"  # settings survive /reset


def test_failed_turn_leaves_history_and_document(session, tmp_path):
    note = tmp_path / "note.txt"
    note.write_text("Remember: the meeting is on Tuesday.")
    session.load_document(note)

    def broken(_delta):
        raise OSError("terminal went away")

    with pytest.raises(OSError, match="terminal went away"):
        session.send("Hello", broken)
    assert session.messages == [] and session.document is not None
    r = session.send("Hello")  # the session is still usable, and the document went with this turn
    assert r.text and len(session.messages) == 2 and session.document is None
    assert session.messages[0]["content"].startswith("Remember: the meeting is on Tuesday.")


def test_context_overflow_and_bad_documents(session, tmp_path, doc_file):
    session.update(max_context=100)
    with pytest.raises(ChatError, match="do not fit the 100-token context"):
        session.load_document(doc_file)
    with pytest.raises(ChatError, match="leaves no room to answer in the 100-token context"):
        session.send("word " * 300)
    assert session.messages == []
    with pytest.raises(ChatError, match="exceeds the model's 8192 positions"):
        session.update(max_context=10_000)
    session.update(algorithm="rerope", max_context=10_000)  # ReRoPE may extrapolate

    (tmp_path / "empty.txt").write_text("  \n")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    for path, msg in [(tmp_path / "missing.txt", "no such file"), (tmp_path, "not a regular file"),
                      (tmp_path / "empty.txt", "the file is empty"), (tmp_path / "latin1.txt", "not UTF-8 text")]:
        with pytest.raises(ChatError, match=msg):
            session.load_document(path)
    with pytest.raises(ChatError, match="unknown algorithm 'quest'"):
        session.set_algorithm("quest")
    with pytest.raises(ChatError, match=r"budget must be a fraction of blocks in \(0, 1\]"):
        session.set_budget(0)
    with pytest.raises(ChatError, match="empty message"):
        session.send("   ")


def test_session_argument_checks(chat_model):
    from ucm_trt.runtime import TorchBackend

    model, tok = chat_model
    with pytest.raises(TypeError, match="backend must be a ucm_trt runtime Backend"):
        ChatSession(model, tok, backend_label="x")
    with pytest.raises(TypeError, match="settings must be a ChatSettings"):
        ChatSession(TorchBackend(model), tok, settings={"algorithm": "esa"}, backend_label="x")
    with pytest.raises(ValueError, match="backend_label must be a non-empty str"):
        ChatSession(TorchBackend(model), tok, backend_label="")
