"""Slash-command parsing, settings validation and stats formatting of the chat app (no model)."""

from __future__ import annotations

import math

import pytest

from ucm_trt.chat.commands import COMMAND_HELP, Command, help_text, parse_line
from ucm_trt.chat.session import ChatError, ChatSettings, TurnStats, _Detokenizer, format_bytes


def test_algorithm_names_match_the_runtime():
    from ucm_trt.chat._names import ALGORITHMS
    from ucm_trt.runtime.algorithms import ALGORITHMS as RUNTIME

    assert ALGORITHMS == RUNTIME


@pytest.mark.parametrize(
    "line, expected",
    [
        ("", None),
        ("   ", None),
        ("Hello there", "Hello there"),
        ("  What is 2+2?  ", "What is 2+2?"),
        ("/help", Command("help")),
        ("/?", Command("help")),
        ("/quit", Command("quit")),
        ("/exit", Command("quit")),
        ("/stats", Command("stats")),
        ("/reset", Command("reset")),
        ("/algo", Command("algo")),
        ("/algo esa", Command("algo", "esa")),
        ("/ALGO gsa-on-device", Command("algo", "gsa-on-device")),
        ("/budget", Command("budget")),
        ("/budget 0.25", Command("budget", 0.25)),
        ("/budget 1", Command("budget", 1.0)),
        ("/load essay.txt", Command("load", "essay.txt")),
        ("/load my long essay.txt", Command("load", "my long essay.txt")),
        ('/load "quoted name.txt"', Command("load", "quoted name.txt")),
    ],
)
def test_parse_line(line, expected):
    assert parse_line(line) == expected


@pytest.mark.parametrize(
    "line, msg",
    [
        ("/bogus", "unknown command '/bogus'"),
        ("/", "unknown command '/'"),
        ("/algo quest", "unknown algorithm 'quest'"),
        ("/algo blend", "unknown algorithm 'blend'"),
        ("/budget abc", "needs a number in (0, 1]"),
        ("/budget 0", "must be in (0, 1]"),
        ("/budget -0.5", "must be in (0, 1]"),
        ("/budget 1.5", "must be in (0, 1]"),
        ("/budget nan", "must be in (0, 1]"),
        ("/budget inf", "must be in (0, 1]"),
        ("/load", "needs a file path"),
        ('/load "a.txt" "b.txt"', "takes one path"),
        ('/load "unterminated', "cannot parse the path"),
        ("/help me", "takes no argument"),
        ("/quit now", "takes no argument"),
    ],
)
def test_bad_commands_raise_one_line_errors(line, msg):
    with pytest.raises(ChatError) as e:
        parse_line(line)
    assert msg in str(e.value) and "\n" not in str(e.value)


def test_help_lists_every_command():
    text = help_text()
    for name in COMMAND_HELP:
        assert f"/{name}" in text
    for required in ("algo", "budget", "help", "stats", "reset", "quit", "load"):
        assert required in COMMAND_HELP


@pytest.mark.parametrize(
    "kwargs, msg",
    [
        ({"algorithm": "quest"}, "ChatSettings.algorithm must be one of"),
        ({"budget": 0}, "ChatSettings.budget must be in (0, 1]"),
        ({"budget": 2.0}, "ChatSettings.budget must be in (0, 1]"),
        ({"budget": math.nan}, "ChatSettings.budget must be a finite number"),
        ({"block_size": 48}, "ChatSettings.block_size must be a power of two"),
        ({"block_size": 0}, "ChatSettings.block_size must be >= 1"),
        ({"max_new_tokens": 0}, "ChatSettings.max_new_tokens must be >= 1"),
        ({"temperature": 0.7}, "seed is required"),
        ({"temperature": 0.0, "top_p": 0.5}, "has no effect with temperature=0"),
        ({"max_context": 1}, "ChatSettings.max_context must be >= 2"),
        ({"system_prompt": 3}, "ChatSettings.system_prompt must be a str"),
    ],
)
def test_settings_validation(kwargs, msg):
    with pytest.raises((ValueError, TypeError)) as e:
        ChatSettings(**kwargs)
    assert msg in str(e.value)


@pytest.mark.parametrize("algorithm", ["dense", "esa", "gsa", "gsa-on-device", "kvstar", "rerope"])
def test_settings_build_the_runtime_configs(algorithm):
    from ucm_trt.config import KVStarConfig
    from ucm_trt.runtime.algorithms import sparse_config_for

    s = ChatSettings(algorithm=algorithm, budget=0.3, block_size=32, retrieval_stride=2)
    sp = s.sparse_config()
    ref = sparse_config_for(algorithm)
    assert (sp.representation, sp.scoring) == (ref.representation, ref.scoring)
    assert sp.block_size == 32 and sp.budget.kind == "ratio" and sp.budget.value == 0.3
    assert sp.retrieval_stride == (KVStarConfig().retrieval_stride if algorithm == "kvstar" else 2)
    policy = s.make_policy(1000, 8192)
    assert policy.name == algorithm


@pytest.mark.parametrize(
    "prompt, budget, block, top_k",
    [
        # 1000 tokens / 64 = 16 blocks; sink 1 + local 2 forced; 13 candidates; floor(0.25 * 13) = 3 -> 6 blocks
        (1000, 0.25, 64, 6 * 64),
        # 2000 / 64 = 32 blocks; 29 candidates; floor(0.5 * 29) = 14 -> 17 blocks
        (2000, 0.5, 64, 17 * 64),
        # short prompt: no candidates; still one block beyond the forced windows (the config requires it)
        (100, 0.25, 64, 4 * 64),
        (300, 1.0, 16, 19 * 16),
    ],
)
def test_gsa_on_device_budget_becomes_top_k_tokens(prompt, budget, block, top_k):
    s = ChatSettings(algorithm="gsa-on-device", budget=budget, block_size=block)
    policy = s.make_policy(prompt, 8192)
    assert policy.config.top_k_tokens == top_k
    assert policy.config.seq_len_threshold == s.min_blocks * block


def test_rerope_window_is_capped_by_max_positions():
    p = ChatSettings(algorithm="rerope", rerope_window=4096).make_policy(100, 2048)
    assert (p.rerope.window, p.rerope.training_length) == (2048, 2048)


def _stats(**over):
    base = dict(backend="torch/cpu:reference", attention="reference", algorithm="esa", budget=0.25, block_size=16,
                prompt_tokens=345, new_tokens=6, finish_reason="length", prefill_seconds=1.234, ttft_seconds=1.3,
                decode_steps=5, decode_tokens_per_s=4.56, blocks_selected=7.5, blocks_total=22.0,
                selected_fraction=7.5 / 22, retrieval_tasks=4, retrieval_ms=12.5, retrieval_overlap=0.5,
                in_step_retrieval=False, bytes_h2d=3 * 1024 * 1024, bytes_d2h=2048, kv_held_bytes=5 * 1024 * 1024,
                kv_dense_bytes=15 * 1024 * 1024, kv_host_bytes=10, wall_seconds=2.0)
    base.update(over)
    return TurnStats(**base)


def test_stats_line_names_every_quantity():
    line = _stats().line()
    assert "\n" not in line
    for part in ("[stats] torch/cpu:reference", "esa@0.25", "prompt 345 tok", "prefill 1.23 s", "decode 6 tok",
                 "4.6 tok/s", "blocks/step 7.5/22.0 (34%)", "retrieval 12.5 ms/4 tasks", "moved h2d 3.0 MiB d2h 2.0 KiB",
                 "KV held 5.0 MiB (dense 15.0 MiB)"):
        assert part in line, (part, line)
    dense = _stats(algorithm="dense", budget=None, blocks_selected=None, selected_fraction=None, retrieval_tasks=0,
                   decode_tokens_per_s=None).line()
    assert "| dense |" in dense and "blocks/step all 22" in dense and "retrieval none" in dense and "- tok/s" in dense
    assert "retrieval in-step" in _stats(algorithm="gsa-on-device", in_step_retrieval=True).line()


def test_format_bytes():
    assert [format_bytes(x) for x in (0, 1023, 1024, 1536 * 1024, 3 * 1024**3)] == [
        "0 B", "1023 B", "1.0 KiB", "1.5 MiB", "3.0 GiB"]


class _ByteTokenizer:
    """Each token is one UTF-8 byte; decode replaces incomplete sequences with U+FFFD, as HF does."""

    def decode(self, ids, skip_special_tokens=True):
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


def test_detokenizer_streams_deltas_and_waits_for_whole_characters():
    deltas = []
    det = _Detokenizer(_ByteTokenizer(), stop_ids=(999,), on_text=deltas.append)
    for t in "hé€!".encode():
        det("r", t)
    det("r", 999)  # the stop token is not text
    assert det.finish() == "hé€!"
    assert "".join(deltas) == "hé€!"
    assert deltas == ["h", "é", "€", "!"]  # never a half character
