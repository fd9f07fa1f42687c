"""A multi-turn chat session over the generation runtime (:mod:`ucm_trt.runtime`).

:class:`ChatSession` keeps the conversation (system prompt, user / assistant turns, an optional
document loaded from a file) and renders it with the tokenizer's chat template each turn. Every
turn runs on a fresh :class:`ucm_trt.runtime.Engine` sized for that turn (one request,
``max_seq_len`` = prompt + tokens to generate), built from the current :class:`ChatSettings`, so
switching the algorithm or the budget between turns takes effect on the next turn and the stats
of a turn (:class:`TurnStats`) are that turn's own.

The runtime keeps no KV between requests, so every turn prefills the whole conversation again;
long documents therefore cost one full prefill per turn.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ucm_trt import algorithms
from ucm_trt.chat._names import CHAT_ALGORITHMS, not_in_chat

__all__ = [
    "ChatError",
    "ChatSettings",
    "ChatSession",
    "DocumentInfo",
    "TurnResult",
    "TurnStats",
    "format_bytes",
    "measure_turn",
]

#: algorithms whose selection size the budget ratio sets
BUDGETED_ALGORITHMS: tuple[str, ...] = algorithms.budgeted_names()


class ChatError(ValueError):
    """A user-level error in the chat (bad command argument, context overflow, unreadable file)."""


def _int_field(name: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"ChatSettings.{name} must be an int, got {value!r} ({type(value).__name__})")
    if value < minimum:
        raise ValueError(f"ChatSettings.{name} must be >= {minimum}, got {value}")


def _float_field(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise TypeError(f"ChatSettings.{name} must be a finite number, got {value!r}")


@dataclass(frozen=True, kw_only=True)
class ChatSettings:
    """What the next turn runs with. Replace fields with :func:`dataclasses.replace`.

    Attributes
    ----------
    algorithm:
        One of :data:`ucm_trt.runtime.algorithms.POLICY_ALGORITHMS` (``dense``, ``esa``, ``gsa``,
        ``gsa-on-device``, ``kvstar``, ``rerope``); ``blend`` is refused (a prefill method over
        cached document chunks, run by ``ucm-trt run --algorithm blend``).
    budget:
        Fraction of the candidate blocks (those outside the sink and local windows) that a sparse
        algorithm selects, in (0, 1]. For ``gsa-on-device`` it is turned into the policy's
        ``top_k_tokens`` from the prompt length of each turn. Ignored by ``dense`` and ``rerope``.
    block_size, sink_blocks, local_blocks, min_blocks, retrieval_stride:
        :class:`ucm_trt.config.SparseConfig` fields (``kvstar`` uses its own stride,
        :class:`ucm_trt.config.KVStarConfig`).
    max_new_tokens, temperature, top_p, seed:
        Sampling (:class:`ucm_trt.runtime.SamplingParams`); ``temperature > 0`` needs a ``seed``.
    system_prompt:
        System message; ``None`` leaves it to the chat template (SmolLM2 adds its default one).
    prefill_chunk:
        Prompt tokens per prefill step.
    rerope_window:
        ReRoPE window (``rerope`` only); the training length is the model's max positions.
    max_context:
        Longest conversation (prompt + generated tokens) in tokens; ``None`` = the model's max
        positions. Only ``rerope`` may go beyond the model's max positions.
    """

    algorithm: str = "dense"
    budget: float = 0.25
    block_size: int = 64
    sink_blocks: int = 1
    local_blocks: int = 2
    min_blocks: int = 4
    retrieval_stride: int = 4
    max_new_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    system_prompt: str | None = None
    prefill_chunk: int = 512
    rerope_window: int = 1024
    max_context: int | None = None
    #: ``default`` (ucm-trt's: per-head selection, automatic dense layers) or ``ucm`` (upstream's)
    preset: str = "default"

    def __post_init__(self) -> None:
        if self.preset not in ("default", "ucm"):
            raise ValueError(f"ChatSettings.preset must be 'default' or 'ucm', got {self.preset!r}")
        if self.algorithm not in CHAT_ALGORITHMS:
            raise ValueError(
                f"ChatSettings.algorithm must be one of {', '.join(CHAT_ALGORITHMS)}; got {self.algorithm!r}"
                f"{not_in_chat(self.algorithm)}"
            )
        _float_field("budget", self.budget)
        if not 0 < self.budget <= 1:
            raise ValueError(f"ChatSettings.budget must be in (0, 1] (a fraction of blocks), got {self.budget}")
        for name, minimum in (("block_size", 1), ("sink_blocks", 0), ("local_blocks", 1), ("min_blocks", 1),
                              ("retrieval_stride", 1), ("max_new_tokens", 1), ("prefill_chunk", 1),
                              ("rerope_window", 1)):
            _int_field(name, getattr(self, name), minimum)
        if self.block_size & (self.block_size - 1):
            raise ValueError(f"ChatSettings.block_size must be a power of two, got {self.block_size}")
        if self.max_context is not None:
            _int_field("max_context", self.max_context, 2)
        if self.system_prompt is not None and not isinstance(self.system_prompt, str):
            raise TypeError(f"ChatSettings.system_prompt must be a str or None, got {type(self.system_prompt).__name__}")
        # sampling and sparse settings are validated by the runtime's own configs
        self.sampling(stop_token_ids=())
        self.sparse_config()

    def sampling(self, *, stop_token_ids: tuple[int, ...]):
        from ucm_trt.runtime import SamplingParams

        return SamplingParams(max_new_tokens=self.max_new_tokens, temperature=self.temperature, top_p=self.top_p,
                              seed=self.seed, stop_token_ids=stop_token_ids)

    def sparse_config(self):
        """The :class:`~ucm_trt.config.SparseConfig` of :attr:`algorithm` (representation / scoring
        as :func:`ucm_trt.runtime.algorithms.sparse_config_for` assigns)."""
        from ucm_trt.config import Budget, KVStarConfig, SparseConfig
        from ucm_trt.runtime.algorithms import sparse_config_for

        stride = KVStarConfig().retrieval_stride if self.algorithm == "kvstar" else self.retrieval_stride
        base = SparseConfig(block_size=self.block_size, sink_blocks=self.sink_blocks, local_blocks=self.local_blocks,
                            min_blocks=self.min_blocks, budget=Budget.ratio(float(self.budget)),
                            retrieval_stride=stride)
        sparse = sparse_config_for(self.algorithm, base, preset=self.preset)
        if self.preset == "default":  # per-head selection keeps the answer's block more often (docs/quality.md)
            sparse = dataclasses.replace(sparse, selection="per_head")
        return sparse

    def make_policy(self, prompt_tokens: int, max_positions: int):
        """A fresh policy for one turn whose prompt has ``prompt_tokens`` tokens."""
        from ucm_trt.config import Budget, GSAOnDeviceConfig, ReRoPEConfig
        from ucm_trt.runtime.algorithms import make_policy

        if self.algorithm == "gsa-on-device":
            bs, forced = self.block_size, self.sink_blocks + self.local_blocks
            candidates = max(0, -(-prompt_tokens // bs) - forced)
            keep = max(1, Budget.ratio(float(self.budget)).num_blocks(candidates) or 0)
            cfg = GSAOnDeviceConfig(top_k_tokens=(forced + keep) * bs, seq_len_threshold=self.min_blocks * bs)
            return make_policy("gsa-on-device", gsa_on_device=cfg, preset=self.preset)
        if self.algorithm == "rerope":
            window = min(self.rerope_window, max_positions)
            return make_policy("rerope", rerope=ReRoPEConfig(window=window, training_length=max_positions))
        return make_policy(self.algorithm, preset=self.preset)

    def describe(self) -> str:
        budget = f" budget={self.budget:g}" if self.algorithm in BUDGETED_ALGORITHMS else ""
        return f"algorithm={self.algorithm}{budget} block_size={self.block_size}"


@dataclass(frozen=True, kw_only=True)
class DocumentInfo:
    """A text file loaded with :meth:`ChatSession.load_document`; sent with the next message."""

    path: str
    text: str
    chars: int
    tokens: int


@dataclass(frozen=True, kw_only=True)
class TurnStats:
    """Measurements of one turn (one fresh engine)."""

    backend: str
    attention: str
    algorithm: str
    budget: float | None  # None: the algorithm takes no budget
    block_size: int
    prompt_tokens: int
    new_tokens: int
    finish_reason: str
    prefill_seconds: float
    ttft_seconds: float
    decode_steps: int
    decode_tokens_per_s: float | None
    blocks_selected: float | None  # mean selected blocks per (layer, KV head, decode step); None = all
    blocks_total: float  # mean blocks of the sequence per decode step
    selected_fraction: float | None
    retrieval_tasks: int
    retrieval_ms: float
    retrieval_overlap: float | None
    in_step_retrieval: bool  # retrieval runs inside the attention step (GSA On-Device): not timed apart
    bytes_h2d: int
    bytes_d2h: int
    kv_held_bytes: int  # peak KV pool bytes held during decode (prefill if no decode step)
    kv_dense_bytes: int | None  # what dense attention would hold for the same sequence
    kv_host_bytes: int
    wall_seconds: float
    dense_reason: str | None = None  # why a sparse algorithm ran (part of) this turn dense; None = it did not


    def line(self) -> str:
        """The one-line summary printed after every turn."""
        algo = self.algorithm + (f"@{self.budget:g}" if self.budget is not None else "")
        tps = f"{self.decode_tokens_per_s:.1f} tok/s" if self.decode_tokens_per_s is not None else "- tok/s"
        if self.blocks_selected is None:
            blocks = f"blocks/step all {self.blocks_total:.0f}"
        else:
            blocks = (f"blocks/step {self.blocks_selected:.1f}/{self.blocks_total:.1f} "
                      f"({100 * (self.selected_fraction or 0):.0f}%)")
        if self.in_step_retrieval:
            retr = "retrieval in-step"
        elif self.retrieval_tasks:
            retr = f"retrieval {self.retrieval_ms:.1f} ms/{self.retrieval_tasks} tasks"
        else:
            retr = "retrieval none"
        held = f"KV held {format_bytes(self.kv_held_bytes)}"
        if self.kv_dense_bytes:
            held += f" (dense {format_bytes(self.kv_dense_bytes)})"
        dense = " | ran dense (see note)" if self.dense_reason else ""
        return (f"[stats] {self.backend} | {algo} | prompt {self.prompt_tokens} tok, prefill {self.prefill_seconds:.2f} s"
                f" | decode {self.new_tokens} tok, {tps} | {blocks} | {retr} | moved h2d "
                f"{format_bytes(self.bytes_h2d)} d2h {format_bytes(self.bytes_d2h)} | {held}{dense}")

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True, kw_only=True)
class TurnResult:
    text: str
    token_ids: list[int]
    stats: TurnStats


def format_bytes(n: int | float | None) -> str:
    """``n`` bytes in binary units (KiB, MiB, GiB: powers of 1024, named as such)."""
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


class _Detokenizer:
    """Turns streamed token ids into text deltas (waits while a multi-byte character is incomplete)."""

    def __init__(self, tokenizer, stop_ids: tuple[int, ...], on_text: Callable[[str], None] | None) -> None:
        self.tok, self.stop_ids, self.on_text = tokenizer, set(stop_ids), on_text
        self.ids: list[int] = []
        self.emitted = 0

    def __call__(self, _rid: str, token: int) -> None:
        if token in self.stop_ids:
            return
        self.ids.append(token)
        text = self.tok.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return
        if len(text) > self.emitted and self.on_text is not None:
            self.on_text(text[self.emitted:])
        self.emitted = max(self.emitted, len(text))

    def finish(self) -> str:
        text = self.tok.decode(self.ids, skip_special_tokens=True)
        if len(text) > self.emitted and self.on_text is not None:
            self.on_text(text[self.emitted:])
        self.emitted = len(text)
        return text


def _stop_token_ids(tokenizer) -> tuple[int, ...]:
    stops: list[int] = []
    if tokenizer.eos_token_id is not None:
        stops.append(int(tokenizer.eos_token_id))
    vocab = tokenizer.get_vocab()
    for name in ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<end_of_turn>"):
        if name in vocab and int(vocab[name]) not in stops:
            stops.append(int(vocab[name]))
    return tuple(stops)


class ChatSession:
    """A conversation with a model through the generation runtime.

    Parameters
    ----------
    backend:
        A runtime :class:`~ucm_trt.runtime.backends.base.Backend` (e.g. ``TorchBackend(model)``);
        reused by every turn.
    tokenizer:
        The model's Hugging Face tokenizer; it must have a chat template.
    settings:
        Initial :class:`ChatSettings`.
    backend_label:
        How the stats line names the backend (e.g. ``"torch/cpu"``).
    """

    def __init__(self, backend, tokenizer, *, settings: ChatSettings | None = None, backend_label: str) -> None:
        from ucm_trt.runtime.backends.base import Backend

        if not isinstance(backend, Backend):
            raise TypeError(f"backend must be a ucm_trt runtime Backend, got {type(backend).__name__}")
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("tokenizer has no chat_template; the chat needs one to render the conversation")
        settings = ChatSettings() if settings is None else settings
        if not isinstance(settings, ChatSettings):
            raise TypeError(f"settings must be a ChatSettings, got {type(settings).__name__}")
        if not isinstance(backend_label, str) or not backend_label:
            raise ValueError(f"backend_label must be a non-empty str, got {backend_label!r}")
        self.backend = backend
        self.tokenizer = tokenizer
        self.backend_label = backend_label
        self._settings = settings
        self._stop_ids = _stop_token_ids(tokenizer)
        self._messages: list[dict[str, str]] = []
        self._document: DocumentInfo | None = None
        self.last_stats: TurnStats | None = None
        self.turns = 0
        self._check_context(settings)
        self._check_backend(settings)

    # ------------------------------------------------------------------ settings
    @property
    def settings(self) -> ChatSettings:
        return self._settings

    @property
    def max_positions(self) -> int:
        return int(self.backend.shape.max_positions)

    @property
    def context_limit(self) -> int:
        s = self._settings
        return s.max_context if s.max_context is not None else self.max_positions

    def _check_context(self, settings: ChatSettings) -> None:
        if settings.max_context is not None and settings.max_context > self.max_positions \
                and settings.algorithm != "rerope":
            raise ChatError(
                f"max_context {settings.max_context} exceeds the model's {self.max_positions} positions; "
                "only the rerope algorithm extrapolates beyond them"
            )

    def update(self, **changes: Any) -> ChatSettings:
        """Replace settings fields (validated); returns the new settings."""
        try:
            new = dataclasses.replace(self._settings, **changes)
        except TypeError as exc:  # unknown field names or wrong types
            raise ChatError(str(exc)) from exc
        self._check_context(new)
        self._check_backend(new)
        self._settings = new
        return new

    def _engine(self, settings: ChatSettings, prompt_tokens: int, max_seq_len: int):
        from ucm_trt.runtime import Engine, RuntimeConfig

        policy = settings.make_policy(prompt_tokens, self.max_positions)
        try:
            return Engine(self.backend, policy, sparse=settings.sparse_config(),
                          config=RuntimeConfig(max_batch=1, max_seq_len=max_seq_len,
                                               prefill_chunk=settings.prefill_chunk))
        except ValueError as exc:  # the runtime's checks of policy / config against the backend
            msg = str(exc).strip().splitlines()[0]
            if getattr(self.backend, "algorithm", None) is not None and "policy" in msg and "PyTorch" not in msg:
                msg += " (the PyTorch backend, --backend torch, runs every algorithm)"
            raise ChatError(msg) from None

    def _check_backend(self, settings: ChatSettings) -> None:
        """Dry run: the runtime's own checks of ``settings`` against the backend, on a tiny engine."""
        graph_algorithm = getattr(self.backend, "algorithm", None)  # graph backends (ONNX Runtime, TensorRT)
        if settings.algorithm == "rerope" and graph_algorithm is not None and graph_algorithm != "rerope":
            raise ChatError(
                f"the rerope algorithm needs a model rewritten for ReRoPE (ucm-trt rewrite --algorithm rerope); "
                f"this one was rewritten for {graph_algorithm!r}"
            )
        small = min(self.context_limit, max(2, settings.block_size * settings.min_blocks))
        self._engine(settings, small - 1, small).close()

    def set_algorithm(self, name: str) -> ChatSettings:
        if name not in CHAT_ALGORITHMS:
            raise ChatError(f"unknown algorithm {name!r}; choose one of {', '.join(CHAT_ALGORITHMS)}"
                            f"{not_in_chat(name)}")
        return self.update(algorithm=name)

    def set_budget(self, value: float) -> ChatSettings:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                or not 0 < value <= 1:
            raise ChatError(f"budget must be a fraction of blocks in (0, 1], e.g. 0.25; got {value!r}")
        return self.update(budget=float(value))

    # ------------------------------------------------------------------ conversation
    @property
    def messages(self) -> list[dict[str, str]]:
        return [dict(m) for m in self._messages]

    @property
    def document(self) -> DocumentInfo | None:
        return self._document

    def reset(self) -> None:
        """Forget the conversation and any loaded document (settings stay)."""
        self._messages.clear()
        self._document = None
        self.last_stats = None

    def load_document(self, path: str | Path) -> DocumentInfo:
        """Read a UTF-8 text file; it is sent together with the next user message."""
        if not isinstance(path, (str, Path)) or not str(path).strip():
            raise ChatError(f"a file path is needed, got {path!r}")
        p = Path(str(path).strip()).expanduser()
        if not p.exists():
            raise ChatError(f"cannot load {str(p)!r}: no such file")
        if not p.is_file():
            raise ChatError(f"cannot load {str(p)!r}: not a regular file")
        try:
            text = p.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise ChatError(f"cannot load {str(p)!r}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
        except OSError as exc:
            raise ChatError(f"cannot load {str(p)!r}: {exc.strerror or exc}") from None
        text = text.strip()
        if not text:
            raise ChatError(f"cannot load {str(p)!r}: the file is empty")
        tokens = len(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        if tokens + 1 >= self.context_limit:
            raise ChatError(
                f"cannot load {str(p)!r}: {tokens} tokens do not fit the {self.context_limit}-token context"
            )
        self._document = DocumentInfo(path=str(p), text=text, chars=len(text), tokens=tokens)
        return self._document

    def _render(self, messages: list[dict[str, str]]) -> list[int]:
        msgs = list(messages)
        if self._settings.system_prompt is not None:
            msgs = [{"role": "system", "content": self._settings.system_prompt}] + msgs
        ids = self.tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=False)
        if isinstance(ids, dict) or hasattr(ids, "input_ids"):
            ids = ids["input_ids"]
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        if ids and isinstance(ids[0], list):
            ids = ids[0]
        return [int(t) for t in ids]

    def prompt_ids(self, user_text: str) -> list[int]:
        """Token ids of the conversation plus ``user_text`` (and the pending document), rendered."""
        return self._render(self._messages + [{"role": "user", "content": self._user_content(user_text)}])

    def _user_content(self, text: str) -> str:
        if self._document is None:
            return text
        return f"{self._document.text}\n\n{text}"

    def send(self, text: str, on_text: Callable[[str], None] | None = None) -> TurnResult:
        """Send a user message, stream the reply through ``on_text(delta)``, and record the turn.

        The user message (with the pending document) and the reply join the history only when
        the turn completes; an error or an interrupt leaves the conversation as it was.
        """
        if not isinstance(text, str) or not text.strip():
            raise ChatError("an empty message cannot be sent")
        s = self._settings
        content = self._user_content(text)
        ids = self._render(self._messages + [{"role": "user", "content": content}])
        limit = self.context_limit
        if len(ids) + 1 > limit:
            raise ChatError(
                f"the conversation is {len(ids)} tokens, which leaves no room to answer in the {limit}-token "
                "context; /reset to start over"
            )
        max_seq = min(limit, len(ids) + s.max_new_tokens)
        params = s.sampling(stop_token_ids=self._stop_ids)
        engine = self._engine(s, len(ids), max_seq)
        detok = _Detokenizer(self.tokenizer, self._stop_ids, on_text)
        t0 = time.perf_counter()
        try:
            [res] = engine.generate(ids, params, on_token=detok)
            reply = detok.finish()
            stats = measure_turn(engine, res, settings=s, backend_label=self.backend_label,
                                 wall_seconds=time.perf_counter() - t0)
        finally:
            engine.close()
        self._messages.append({"role": "user", "content": content})
        self._messages.append({"role": "assistant", "content": reply.strip()})
        self._document = None
        self.last_stats = stats
        self.turns += 1
        return TurnResult(text=reply, token_ids=list(res.token_ids), stats=stats)


def measure_turn(engine, result, *, settings: ChatSettings, backend_label: str, wall_seconds: float) -> TurnStats:
    """:class:`TurnStats` of a finished single-request ``engine`` (built from ``settings``).

    ``blocks_selected`` is the policy's selected-block fraction times the mean number of blocks of
    the sequence over the decode steps: the mean blocks one (layer, KV head) attended per step.
    ``kv_held_bytes`` is the largest KV pool footprint of a decode step (the working set for the
    offloading algorithms), next to what dense attention holds for the same sequence.
    """
    s = settings
    st = engine.stats()
    bs = s.block_size
    steps = int(st.get("decode_steps") or 0)
    p = result.prompt_tokens
    if steps:
        blocks_total = sum(-(-(p + k) // bs) for k in range(1, steps + 1)) / steps
    else:
        blocks_total = float(-(-p // bs))
    frac = (st.get("policy") or {}).get("selected_block_fraction")
    decode_recs = [r for r in engine.metrics.steps if r.kind == "decode"]
    recs = decode_recs or list(engine.metrics.steps)
    held = max((r.device_kv_bytes for r in recs), default=0)
    dense = max((getattr(r, "dense_kv_bytes", 0) or 0 for r in recs), default=0) or None
    return TurnStats(
        backend=backend_label,
        attention=str(st.get("attention", "")),
        algorithm=s.algorithm,
        budget=s.budget if s.algorithm in BUDGETED_ALGORITHMS else None,
        block_size=bs,
        prompt_tokens=p,
        new_tokens=len(result.token_ids),
        finish_reason=result.finish_reason,
        prefill_seconds=float(st.get("prefill_seconds") or 0.0),
        ttft_seconds=float(result.ttft_seconds),
        decode_steps=steps,
        decode_tokens_per_s=st.get("decode_tokens_per_s"),
        blocks_selected=None if frac is None else frac * blocks_total,
        blocks_total=blocks_total,
        selected_fraction=frac,
        retrieval_tasks=int(st.get("retrieval_tasks") or 0),
        retrieval_ms=float(st.get("retrieval_busy_ms") or 0.0),
        retrieval_overlap=st.get("retrieval_overlap"),
        in_step_retrieval=s.algorithm == "gsa-on-device",
        bytes_h2d=int(st.get("bytes_h2d_total") or 0),
        bytes_d2h=int(st.get("bytes_d2h_total") or 0),
        kv_held_bytes=int(held),
        kv_dense_bytes=dense,
        kv_host_bytes=int(st.get("host_kv_bytes_peak") or 0),
        wall_seconds=wall_seconds,
        dense_reason=dense_reason(s, p, len(result.token_ids)),
    )


def dense_reason(settings: ChatSettings, prompt_tokens: int, new_tokens: int) -> str | None:
    """Why a sparse algorithm ran a turn (or its first steps) with dense attention, or None.

    A sequence shorter than ``min_blocks`` blocks runs dense. ESA and KVStar decide once per
    request, on the prompt; GSA decides at every retrieval and GSA On-Device at every step (from
    ``min_blocks * block_size`` tokens on), so a turn can start dense and become sparse.
    """
    s = settings
    if s.algorithm not in BUDGETED_ALGORITHMS:
        return None
    bs, mb = s.block_size, s.min_blocks
    sparse_from = mb * bs if s.algorithm == "gsa-on-device" else (mb - 1) * bs + 1  # tokens
    rule = f"min_blocks {mb} x block size {bs} (sparse from {sparse_from} tokens)"
    if s.algorithm in ("esa", "kvstar"):
        if prompt_tokens < sparse_from:
            return (f"this turn ran dense: the conversation is {prompt_tokens} tokens, shorter than {rule}; "
                    f"{s.algorithm} decides once per turn")
        return None
    last = prompt_tokens + max(new_tokens - 1, 0)  # sequence length at the last decode step
    if last < sparse_from:
        return f"this turn ran dense: the conversation stayed at {last} tokens or fewer, shorter than {rule}"
    if prompt_tokens < sparse_from:
        return (f"the first steps of this turn ran dense: the {prompt_tokens}-token conversation was shorter "
                f"than {rule}")
    return None
