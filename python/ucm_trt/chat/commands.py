"""Slash commands of the chat app: parsing (pure, no model needed) and their help text."""

from __future__ import annotations

import math
import shlex
from dataclasses import dataclass

from ucm_trt.chat._names import CHAT_ALGORITHMS, not_in_chat
from ucm_trt.chat.session import ChatError

__all__ = ["COMMAND_HELP", "Command", "help_text", "parse_line"]

#: name -> (argument synopsis, one-line help)
COMMAND_HELP: dict[str, tuple[str, str]] = {
    "help": ("", "show this help"),
    "algo": ("[NAME]", f"switch the attention algorithm for the next turns ({', '.join(CHAT_ALGORITHMS)}); "
                       "no NAME shows the current one"),
    "budget": ("[R]", "fraction of candidate blocks sparse algorithms keep, in (0, 1], e.g. 0.25; "
                      "no R shows the current one"),
    "load": ("FILE", "load a UTF-8 text file; it is sent together with your next message"),
    "stats": ("", "show the last turn's full stats and the current settings"),
    "reset": ("", "forget the conversation and any loaded file (settings stay)"),
    "quit": ("", "leave the chat (end of input does too)"),
}
_ALIASES = {"exit": "quit", "q": "quit", "h": "help", "?": "help", "algorithm": "algo"}


@dataclass(frozen=True)
class Command:
    """A parsed slash command: ``name`` (canonical) and its argument (``None`` if absent)."""

    name: str
    arg: str | float | None = None


def help_text() -> str:
    width = max(len(f"/{n} {a}".rstrip()) for n, (a, _) in COMMAND_HELP.items())
    lines = ["Type a message and press Enter to chat. Commands:"]
    for name, (args, text) in COMMAND_HELP.items():
        lines.append(f"  {f'/{name} {args}'.rstrip():<{width}}  {text}")
    return "\n".join(lines)


def parse_line(line: str) -> Command | str | None:
    """``None`` for a blank line, a :class:`Command` for ``/...``, else the message text.

    Bad commands raise :class:`~ucm_trt.chat.session.ChatError` with a one-line message.
    """
    if not isinstance(line, str):
        raise TypeError(f"line must be a str, got {type(line).__name__}")
    text = line.strip()
    if not text:
        return None
    if not text.startswith("/"):
        return text
    head, _, rest = text[1:].partition(" ")
    name = _ALIASES.get(head.lower(), head.lower())
    rest = rest.strip()
    if name not in COMMAND_HELP:
        shown = "/" + head if head else "/"
        raise ChatError(f"unknown command {shown!r}; type /help for the list")
    if name in ("help", "stats", "reset", "quit"):
        if rest:
            raise ChatError(f"/{name} takes no argument, got {rest!r}")
        return Command(name)
    if name == "algo":
        if not rest:
            return Command(name)
        if rest not in CHAT_ALGORITHMS:
            raise ChatError(f"/algo: unknown algorithm {rest!r}; choose one of {', '.join(CHAT_ALGORITHMS)}"
                            f"{not_in_chat(rest)}")
        return Command(name, rest)
    if name == "budget":
        if not rest:
            return Command(name)
        try:
            value = float(rest)
        except ValueError:
            raise ChatError(f"/budget needs a number in (0, 1], e.g. /budget 0.25; got {rest!r}") from None
        if not math.isfinite(value) or not 0 < value <= 1:
            raise ChatError(f"/budget must be in (0, 1] (a fraction of candidate blocks); got {rest}")
        return Command(name, value)
    # load
    if not rest:
        raise ChatError("/load needs a file path, e.g. /load essay.txt")
    if rest[0] in "\"'":
        try:
            parts = shlex.split(rest)
        except ValueError as exc:
            raise ChatError(f"/load: cannot parse the path {rest!r} ({exc})") from None
        if len(parts) != 1:
            raise ChatError(f"/load takes one path, got {len(parts)}: {rest!r}")
        rest = parts[0]
    return Command(name, rest)
