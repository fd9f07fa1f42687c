"""Fuzz of every ``ucm-trt`` command line (issue 17): random flag combinations, values and files
through the parse + check stage (``ucm_trt.cli.check``: argparse, then each command's flag and file
checks; no model, graph or engine loads, nothing is written).

Properties: no exception escapes (no traceback); the exit code is 0 (would start working), 1 (the
environment lacks something, e.g. TensorRT or a GPU) or 2 (bad input); every refusal is exactly one
line on stderr, ``ucm-trt[ CMD]: error: ...``, that names a flag or positional argument of that
command; the check stage creates no file or folder.

The flags are read from the parser itself, so a flag added later is fuzzed without editing this
file.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import re
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ucm_trt import cli

PARSER = cli.build_parser()
SUBPARSERS = next(a for a in PARSER._actions if isinstance(a, argparse._SubParsersAction)).choices
COMMANDS = sorted(SUBPARSERS)
_FILES = ("missing.onnx", "dir", "empty.txt", "latin1.txt", "spaces.txt", "prompt.txt", "model.onnx",
          "nodir/sub/out.onnx", "out.json", "")


def _make_files(root: Path) -> None:
    (root / "dir").mkdir()
    (root / "dir" / "config.json").write_text("{}")
    (root / "empty.txt").write_bytes(b"")
    (root / "latin1.txt").write_bytes("caf\u00e9 cr\u00e8me\n".encode("latin-1"))
    (root / "spaces.txt").write_text("  \n\t\n")
    (root / "prompt.txt").write_text("The capital of France is")
    (root / "model.onnx").write_bytes(b"\x08\x07not really a model")


def _snapshot(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


_INTS = st.one_of(st.integers(-3, 600), st.sampled_from([0, 1, 15, 16, 24, 32, 96, 256, 257, 512, 2**40, -2**31]))
_FLOATS = st.one_of(st.floats(allow_nan=True, allow_infinity=True, width=32),
                    st.sampled_from([0.0, -0.5, 0.25, 1.0, 1.5, 1e-9]))
_WORDS = st.sampled_from(["", " ", "abc", "cpu", "cuda", "cuda:0", "tpu", "smollm2", "1,2", "a,b", "0.5,0.5",
                          "0,1,x", "-1", "nan", "inf", "1e3", "L=3", "name=4", "=", "\u00e9\u00e8"])
_PATHS = st.sampled_from(_FILES)


def _value(action: argparse.Action) -> st.SearchStrategy[str]:
    """Mostly values of the right kind (so the commands' own checks are reached), sometimes junk."""
    if action.choices:
        good = st.sampled_from([str(c) for c in action.choices])
        return st.one_of(good, good, good, st.just("nope"))
    if action.type is int:
        good = st.one_of(st.integers(0, 300), st.sampled_from([16, 32, 64]))
        return st.one_of(good.map(str), good.map(str), _INTS.map(str), _WORDS)
    if action.type is float:
        good = st.floats(0, 1)
        return st.one_of(good.map(repr), good.map(repr), _FLOATS.map(repr), _WORDS)
    return st.one_of(_PATHS, _PATHS, _WORDS, st.text(max_size=6), _INTS.map(str))


@st.composite
def command_lines(draw) -> list[str]:
    name = draw(st.sampled_from(COMMANDS))
    sub = SUBPARSERS[name]
    argv = [name]
    for action in sub._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        if not action.option_strings:  # positional: usually given, a path most of the time
            if draw(st.integers(0, 9)) > 0:
                argv.append(draw(st.one_of(_PATHS, _value(action))))
            continue
        if draw(st.integers(0, 3)) > 0:  # about a quarter of the flags per command line
            continue
        flag = draw(st.sampled_from(action.option_strings))
        if action.nargs == 0:
            argv.append(flag)
        else:
            argv += [flag, draw(_value(action))]
    if draw(st.integers(0, 39)) == 0:
        argv.append(draw(st.sampled_from(["--no-such-flag", "stray"])))
    return argv


def _names(command: str) -> set[str]:
    """The flags and positional metavars of ``command`` (what a refusal must name)."""
    sub = SUBPARSERS[command]
    names = {"COMMAND"}
    for a in sub._actions:
        names.update(a.option_strings)
        if a.metavar:
            names.add(str(a.metavar))
    names.add("-o/--output")
    return names


def _check(argv: list[str]) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            rc = cli.check(argv)
        except SystemExit as e:  # argparse usage errors
            rc = e.code
    return rc, err.getvalue()


@pytest.mark.filterwarnings("ignore")
@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(argv=command_lines())
def test_fuzzed_command_lines_are_checked_in_one_line(argv, tmp_path_factory, monkeypatch):
    root = _ROOT.get(tmp_path_factory)
    monkeypatch.chdir(root)
    before = _snapshot(root)
    rc, err = _check(argv)
    assert rc in (0, 1, 2), (argv, rc, err)
    assert _snapshot(root) == before, f"the check stage wrote files: {argv}"
    if rc == 0:
        assert err == "", (argv, err)
        return
    lines = err.splitlines()
    assert len(lines) == 1 and err.endswith("\n"), (argv, err)
    line = lines[0]
    assert re.match(r"ucm-trt( [a-z]+)?: error: \S", line), (argv, line)
    assert "Traceback" not in line
    named = {n for n in _names(argv[0]) if n in line} if argv[0] in SUBPARSERS else {"COMMAND"}
    assert named, f"the refusal names no flag or argument of {argv[0]!r}: {line!r} for {argv}"


class _Root:
    """One folder of test files for every example (never written by the checks)."""

    def __init__(self) -> None:
        self.path: Path | None = None

    def get(self, factory) -> Path:
        if self.path is None:
            self.path = factory.mktemp("fuzz")
            _make_files(self.path)
        return self.path


_ROOT = _Root()


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["run", "--prompt", "x", "--block-size", "24"], "--block-size must be a power of two in [16, 256], got 24"),
        (["run", "--prompt", "x", "--ratio", "-0.5"], "--ratio must be in (0, 1] (the fraction of candidate blocks kept), got -0.5"),
        (["run", "--prompt-file", "empty.txt"], "--prompt-file 'empty.txt' is empty (0 bytes)"),
        (["run", "--prompt-file", "spaces.txt"], "--prompt-file 'spaces.txt' holds only whitespace"),
        (["run", "--prompt-file", "latin1.txt"], "--prompt-file 'latin1.txt' is not UTF-8 text (byte 0xe9 at offset 3"),
        (["run", "--prompt-file", "dir"], "--prompt-file 'dir' is a directory, not a file"),
        (["run", "--prompt", "x", "--onnx", "missing.onnx"], "--onnx 'missing.onnx' does not exist"),
        (["rewrite", "model.onnx", "nodir/sub/out.onnx", "--algorithm", "esa", "--block-size", "16"],
         "OUT.onnx 'nodir/sub/out.onnx': the folder 'nodir/sub' does not exist (create it, or pass --make-dirs)"),
        (["chat", "--load", "latin1.txt"], "--load 'latin1.txt' is not UTF-8 text"),
        (["eval", "--out", "nodir/q"], "--out 'nodir/q': the folder 'nodir/q' does not exist"),
        (["bench", "--out", "nodir/b.json"], "--out 'nodir/b.json': the folder 'nodir' does not exist"),
        (["build", "dir", "-o", "e.engine"], "REWRITTEN.onnx 'dir' is a directory, not a file"),
    ],
)
def test_named_refusals(argv, needle, tmp_path_factory, monkeypatch):
    monkeypatch.chdir(_ROOT.get(tmp_path_factory))
    rc, err = _check(argv)
    assert rc == 2 and err.count("\n") == 1 and needle in err, err


def test_make_dirs_passes_the_check_without_creating(tmp_path_factory, monkeypatch):
    root = _ROOT.get(tmp_path_factory)
    monkeypatch.chdir(root)
    rc, err = _check(["rewrite", "model.onnx", "nodir/sub/out.onnx", "--algorithm", "esa", "--block-size", "16",
                      "--make-dirs"])
    assert rc == 0 and err == "" and not (root / "nodir").exists()
    assert os.access(root, os.W_OK)
