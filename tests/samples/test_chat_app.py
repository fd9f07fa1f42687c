"""The chat app driven by a scripted conversation on standard input (SmolLM2, CPU).

In process (``ucm_trt.chat.app.run`` with a recording stdout, so streaming is observable write by
write) and as a subprocess of ``samples/chat/chat.py`` (the real entry point, stdin piped).
"""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
from pathlib import Path

from ucm_trt.chat import app

ROOT = Path(__file__).resolve().parents[2]


class _Recorder(io.StringIO):
    """A stdout that remembers every write (one write per streamed text delta)."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[str] = []

    def write(self, s: str) -> int:
        self.writes.append(s)
        return super().write(s)


def _run(argv: list[str], script: str) -> tuple[int, _Recorder, str]:
    args = app.build_parser().parse_args(argv)
    out, err = _Recorder(), io.StringIO()
    rc = app.run(args, stdin=io.StringIO(script), stdout=out, stderr=err)
    return rc, out, err.getvalue()


def test_scripted_conversation(doc_file):
    script = "\n".join([
        "Hello! Who are you?",
        "/algo gsa-on-device",
        "/budget 0.3",
        "/bogus",
        "/budget abc",
        "/algo quest",
        "/load /nonexistent/dir/essay.txt",
        f"/load {doc_file}",
        "What is the secret code of the blue team?",
        "/stats",
        "/reset",
        "/quit",
        "This line comes after /quit and is never read",
    ]) + "\n"
    rc, out, err = _run(["--backend", "torch", "--max-new-tokens", "4", "--block-size", "16"], script)
    text = out.getvalue()
    assert rc == 0, err

    # bad commands: one line each on stderr, and the chat went on
    errors = err.splitlines()
    assert len(errors) == 4 and all(e.startswith("error: ") for e in errors), err
    assert "unknown command '/bogus'" in errors[0]
    assert "/budget needs a number" in errors[1]
    assert "unknown algorithm 'quest'" in errors[2]
    assert "no such file" in errors[3]

    assert "backend torch/cpu:torch" in text  # the stats and the banner name the backend
    assert "[chat] algorithm -> gsa-on-device" in text and "[chat] budget -> 0.3" in text
    assert re.search(r"\[chat\] loaded .*long doc\.txt: \d+ chars, \d+ tokens", text)
    assert "[chat] conversation cleared" in text
    assert "never read" not in text

    replies = re.findall(r"^assistant> (.*)$", text, flags=re.M)
    assert len(replies) == 2 and all(r.strip() for r in replies), text
    stats = [line for line in text.splitlines() if line.startswith("[stats] ")]
    assert len(stats) == 3, text  # two replies + the one /stats repeats
    first, second = stats[0], stats[1]
    assert "| dense |" in first and "blocks/step all" in first and "retrieval none" in first
    assert "| gsa-on-device@0.3 |" in second and "retrieval in-step" in second
    m = re.search(r"prompt (\d+) tok", second)
    assert m and int(m.group(1)) > 120  # the loaded document went with the question
    m = re.search(r"blocks/step ([\d.]+)/([\d.]+) \((\d+)%\)", second)
    assert m and float(m.group(1)) < float(m.group(2)) and 0 < int(m.group(3)) < 70, second
    for field in ("decode", "tok/s", "moved h2d", "KV held"):
        assert field in second
    assert stats[2] == second and "  selected_fraction: " in text  # /stats shows the last turn in full

    # streaming: the first reply reached stdout in several writes, before its stats line
    i = out.writes.index("assistant> ")
    j = next(k for k in range(i, len(out.writes)) if out.writes[k].startswith("[stats]"))
    pieces = [w for w in out.writes[i + 1 : j] if w.strip()]
    assert len(pieces) >= 2, out.writes[i:j]


def test_end_of_input_quits_and_help(tmp_path):
    rc, out, err = _run(["--backend", "torch", "--max-new-tokens", "2"], "/help\n/algo\n/budget\n")
    text = out.getvalue()
    assert rc == 0 and err == ""
    for cmd in ("/algo", "/budget", "/load", "/stats", "/reset", "/quit", "/help"):
        assert cmd in text
    assert "[chat] algorithm dense; available: dense, esa, gsa, gsa-on-device, kvstar, rerope" in text
    assert "[chat] budget 0.25 of candidate blocks" in text


def test_sample_script_subprocess():
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["HF_HUB_OFFLINE"] = "1"
    r = subprocess.run([sys.executable, str(ROOT / "samples" / "chat" / "chat.py"), "--max-new-tokens", "3",
                        "--algorithm", "esa", "--backend", "torch"],
                       input="Hi!\n/budget 2\n", capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    assert re.search(r"^assistant> \S", r.stdout, flags=re.M), r.stdout
    assert re.search(r"^\[stats\] torch/cpu:torch \| esa@0.25 \| prompt \d+ tok", r.stdout, flags=re.M)
    errs = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert errs == ["error: /budget must be in (0, 1] (a fraction of candidate blocks); got 2"], r.stderr
