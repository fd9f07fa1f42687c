"""Command-line argument checks shared by every ``ucm-trt`` command (issue 17).

Each check runs on the parsed flags before any model, tokenizer or graph loads, and raises
:class:`FlagError` (a ``ValueError``) whose one-line message starts with the flag's name and
the value given, then the rule it breaks::

    --block-size must be a power of two in [16, 256], got 24
    --prompt-file 'p.txt' is a directory, not a file
    --ratio must be in (0, 1], got -0.5

Files: an input must exist, be a file (a directory is reported as a directory), be readable and
be non-empty; a text input must also be UTF-8. Outputs: the folder they go into must exist, or be
created only when the command's ``--make-dirs`` flag says so (a typo in a path must not create
folders). Shape rules come from :mod:`ucm_trt.limits`. Imports nothing heavy: ``--help`` and these
checks run before torch is loaded.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from ucm_trt.limits import block_size_problem

__all__ = [
    "FlagError",
    "block_size",
    "checkpoint_dir",
    "fraction",
    "input_dir",
    "input_file",
    "int_at_least",
    "output_dir",
    "output_file",
    "text_file",
]


class FlagError(ValueError):
    """A bad command-line value; the message names the flag, the value and the rule (one line)."""


def _q(path: object) -> str:
    return repr(str(path))


def input_file(flag: str, path: str | os.PathLike) -> Path:
    """``path`` exists, is a file, is readable and is not empty."""
    if not str(path).strip():
        raise FlagError(f"{flag} must be a file path, got {_q(path)}")
    p = Path(path).expanduser()
    if not p.exists():
        raise FlagError(f"{flag} {_q(path)} does not exist")
    if p.is_dir():
        raise FlagError(f"{flag} {_q(path)} is a directory, not a file")
    if not p.is_file():
        raise FlagError(f"{flag} {_q(path)} is not a regular file")
    if not os.access(p, os.R_OK):
        raise FlagError(f"{flag} {_q(path)} is not readable (permission denied)")
    if p.stat().st_size == 0:
        raise FlagError(f"{flag} {_q(path)} is empty (0 bytes)")
    return p


def text_file(flag: str, path: str | os.PathLike) -> str:
    """The text of a UTF-8 file that :func:`input_file` accepts and that holds more than whitespace."""
    p = input_file(flag, path)
    try:
        data = p.read_bytes()
    except OSError as exc:
        raise FlagError(f"{flag} {_q(path)} cannot be read ({exc.strerror or type(exc).__name__})") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise FlagError(f"{flag} {_q(path)} is not UTF-8 text (byte 0x{data[exc.start]:02x} at offset "
                        f"{exc.start}: {exc.reason})") from None
    if not text.strip():
        raise FlagError(f"{flag} {_q(path)} holds only whitespace; give a file with text in it")
    return text


def input_dir(flag: str, path: str | os.PathLike) -> Path:
    """``path`` exists and is a directory."""
    if not str(path).strip():
        raise FlagError(f"{flag} must be a directory path, got {_q(path)}")
    p = Path(path).expanduser()
    if not p.exists():
        raise FlagError(f"{flag} {_q(path)} does not exist")
    if not p.is_dir():
        raise FlagError(f"{flag} {_q(path)} is a file, not a directory")
    return p


def checkpoint_dir(flag: str, path: str | os.PathLike) -> Path:
    """A Hugging Face checkpoint directory: :func:`input_dir` holding a ``config.json`` file."""
    p = input_dir(flag, path)
    if not (p / "config.json").is_file():
        raise FlagError(f"{flag} {_q(path)} has no config.json: not a Hugging Face checkpoint directory")
    return p


def _folder_ready(flag: str, path: object, folder: Path, make_dirs: bool, create: bool) -> None:
    if folder.is_dir():
        if not os.access(folder, os.W_OK | os.X_OK):
            raise FlagError(f"{flag} {_q(path)}: the folder {_q(folder)} is not writable")
        return
    if folder.exists():
        raise FlagError(f"{flag} {_q(path)}: {_q(folder)} is a file, not a folder")
    if not make_dirs:
        raise FlagError(f"{flag} {_q(path)}: the folder {_q(folder)} does not exist (create it, or pass "
                        "--make-dirs)")
    base = folder
    while not base.exists() and base != base.parent:  # the nearest existing ancestor must take new folders
        base = base.parent
    if not base.is_dir() or not os.access(base, os.W_OK | os.X_OK):
        raise FlagError(f"{flag} {_q(path)}: cannot create the folder {_q(folder)} ({_q(base)} is not a writable "
                        "folder)")
    if not create:
        return
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise FlagError(f"{flag} {_q(path)}: cannot create the folder {_q(folder)} "
                        f"({exc.strerror or type(exc).__name__})") from None


def output_file(flag: str, path: str | os.PathLike, *, make_dirs: bool = False, create: bool = True) -> Path:
    """A file path to write: not a directory; its folder exists, or with ``make_dirs`` can be created
    (and is, unless ``create`` is False: a check-only pass)."""
    p = Path(path).expanduser()
    if not str(path).strip():
        raise FlagError(f"{flag} must be a file path, got {_q(path)}")
    if p.is_dir():
        raise FlagError(f"{flag} {_q(path)} is a directory; give a file path")
    _folder_ready(flag, path, p.parent, make_dirs, create)
    return p


def output_dir(flag: str, path: str | os.PathLike, *, make_dirs: bool = False, create: bool = True) -> Path:
    """A folder to write into: it exists and is writable, or with ``make_dirs`` can be created (and
    is, unless ``create`` is False: a check-only pass)."""
    p = Path(path).expanduser()
    if not str(path).strip():
        raise FlagError(f"{flag} must be a folder path, got {_q(path)}")
    if p.exists() and not p.is_dir():
        raise FlagError(f"{flag} {_q(path)} is a file, not a folder")
    _folder_ready(flag, path, p, make_dirs, create)
    return p


def block_size(flag: str, value: object) -> int:
    """Tokens per KV block, by the kernels' rule (:mod:`ucm_trt.limits`)."""
    problem = block_size_problem(value)
    if problem is not None:
        raise FlagError(f"{flag} {problem}, got {value}")
    return value  # type: ignore[return-value]


def fraction(flag: str, value: float, *, allow_zero: bool = False, allow_one: bool = True, what: str = "") -> float:
    """A finite fraction in (0, 1] (``[0, ...`` with ``allow_zero``; ``..., 1)`` without ``allow_one``);
    ``what`` says what it is a fraction of, in the message."""
    lo, hi = ("[" if allow_zero else "("), ("]" if allow_one else ")")
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and (
        (value >= 0 if allow_zero else value > 0) and (value <= 1 if allow_one else value < 1))
    if not ok:
        raise FlagError(f"{flag} must be in {lo}0, 1{hi}{f' ({what})' if what else ''}, got {value}")
    return float(value)


def int_at_least(flag: str, value: object, minimum: int) -> int:
    """An int >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise FlagError(f"{flag} must be an integer, got {value!r}")
    if value < minimum:
        raise FlagError(f"{flag} must be >= {minimum}, got {value}")
    return value
