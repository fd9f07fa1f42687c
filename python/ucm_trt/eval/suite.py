"""The quality suite: attention-mass recall sweep and the sparsity / accuracy table (issue 7).

Two resumable runs, each writing one JSON file through :class:`~ucm_trt.eval.results.ResultStore`:

* :func:`run_recall_sweep` captures post-RoPE Q/K of every layer on long prompts
  (:func:`ucm_trt.models.capture_qk`) and, for every layer x block size x selection mode, calls
  :func:`ucm_trt.sparse.recall.recall_curve`: attention-mass recall of each representation at every
  budget, the oracle's recall at the same number of blocks, and the sink+local-only baseline. The
  evaluated queries are the last ``num_queries`` prompt tokens (each one a decode step); the
  ``observation`` tokens before them weight ``weighted_mean``.
* :func:`run_accuracy` runs the model with real sparse attention (:mod:`ucm_trt.eval.sparse_lm`):
  perplexity of essay continuations and greedy passkey retrieval, for every method x sparsity.
  The prompt (or the perplexity prefix) is prefilled densely, as UCM does; everything after it
  (the passkey question and the generated tokens; the scored continuation) runs sparse in every
  non-rollback layer.

Configs are frozen keyword-only dataclasses; :func:`quick_configs` gives the small preset of
``ucm-trt eval --quick``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

import torch

from ucm_trt import algorithms as registry
from ucm_trt.eval.methods import BASELINES, METHODS, MethodContext, make_selector
from ucm_trt.eval.results import ResultStore, cell_key

__all__ = [
    "RecallSweepConfig",
    "AccuracyConfig",
    "quick_configs",
    "essay_ids",
    "run_recall_sweep",
    "run_accuracy",
    "config_dict",
    "RuntimePasskeyConfig",
    "RUNTIME_ALGORITHMS",
    "run_runtime_passkey",
]

_SELECTIONS = ("per_head", "shared")


def _pos_int(cls: str, name: str, v: Any, minimum: int = 1) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
        raise ValueError(f"{cls}.{name} must be an int >= {minimum}, got {v!r}")


def _int_tuple(cls: str, name: str, v: Any, minimum: int = 1, allow_empty: bool = False) -> None:
    if not isinstance(v, tuple) or (not v and not allow_empty):
        raise TypeError(f"{cls}.{name} must be a {'' if allow_empty else 'non-empty '}tuple of ints, got {v!r}")
    for x in v:
        _pos_int(cls, f"{name}[...]", x, minimum)
    if len(set(v)) != len(v):
        raise ValueError(f"{cls}.{name} must not repeat values, got {v!r}")


def _ratio_tuple(cls: str, name: str, v: Any) -> None:
    if not isinstance(v, tuple) or not v:
        raise TypeError(f"{cls}.{name} must be a non-empty tuple of numbers in (0, 1], got {v!r}")
    for x in v:
        if isinstance(x, bool) or not isinstance(x, (int, float)) or not 0 < x <= 1:
            raise ValueError(f"{cls}.{name} values must be numbers in (0, 1], got {x!r} in {v!r}")


def _unit(cls: str, name: str, v: Any) -> None:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v <= 1:
        raise ValueError(f"{cls}.{name} must be a number in [0, 1], got {v!r}")


@dataclass(frozen=True, kw_only=True)
class RecallSweepConfig:
    """Attention-mass recall sweep on captured Q/K.

    Attributes
    ----------
    num_tokens:
        Prompt length in tokens.
    essay_samples, passkey_samples:
        Prompts: essay text at different offsets, and passkey prompts (needle at depth 0.5).
    num_queries:
        The last ``num_queries`` prompt tokens are evaluated, each as a decode step.
    observation:
        Tokens before those whose queries weight ``weighted_mean``.
    block_sizes, selections:
        Block sizes and selection modes (``per_head`` / ``shared``) swept.
    ratios:
        ``Budget.ratio`` values (fraction of the candidate blocks, upstream ``sparse_ratio``).
    token_budgets:
        Fixed budgets in tokens (``Budget.top_k(tokens // block_size - forced)``; skipped for a block
        size where that is < 1).
    rollback_ratio, rollback_threshold:
        A layer is *diffuse* (run dense: rollback) when the oracle's mean recall at
        ``Budget.ratio(rollback_ratio)`` is below ``rollback_threshold``.
    layers:
        Layers to evaluate, ``None`` for all.
    """

    num_tokens: int = 4096
    essay_samples: int = 2
    passkey_samples: int = 1
    num_queries: int = 64
    observation: int = 32
    block_sizes: tuple[int, ...] = (16, 32, 64)
    selections: tuple[str, ...] = ("per_head", "shared")
    ratios: tuple[float, ...] = (0.1, 0.3, 0.5, 0.7)
    token_budgets: tuple[int, ...] = (512, 1024)
    sink_blocks: int = 1
    local_blocks: int = 2
    rollback_ratio: float = 0.125
    rollback_threshold: float = 0.5
    layers: tuple[int, ...] | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        c = "RecallSweepConfig"
        _pos_int(c, "num_tokens", self.num_tokens, 8)
        _pos_int(c, "essay_samples", self.essay_samples, 0)
        _pos_int(c, "passkey_samples", self.passkey_samples, 0)
        if self.essay_samples + self.passkey_samples == 0:
            raise ValueError(f"{c}: essay_samples + passkey_samples must be >= 1")
        _pos_int(c, "num_queries", self.num_queries)
        _pos_int(c, "observation", self.observation)
        if self.num_queries + self.observation >= self.num_tokens:
            raise ValueError(
                f"{c}: num_queries + observation ({self.num_queries} + {self.observation}) must be < "
                f"num_tokens ({self.num_tokens})"
            )
        _int_tuple(c, "block_sizes", self.block_sizes)
        for bs in self.block_sizes:
            if bs & (bs - 1):
                raise ValueError(f"{c}.block_sizes must be powers of two, got {bs}")
        if not isinstance(self.selections, tuple) or not self.selections:
            raise TypeError(f"{c}.selections must be a non-empty tuple, got {self.selections!r}")
        for s in self.selections:
            if s not in _SELECTIONS:
                raise ValueError(f"{c}.selections values must be one of {_SELECTIONS}, got {s!r}")
        _ratio_tuple(c, "ratios", self.ratios)
        _int_tuple(c, "token_budgets", self.token_budgets, allow_empty=True)
        _pos_int(c, "sink_blocks", self.sink_blocks, 0)
        _pos_int(c, "local_blocks", self.local_blocks)
        _ratio_tuple(c, "rollback_ratio", (self.rollback_ratio,))
        _unit(c, "rollback_threshold", self.rollback_threshold)
        if self.layers is not None:
            _int_tuple(c, "layers", self.layers, minimum=0)
        _pos_int(c, "seed", self.seed, 0)


@dataclass(frozen=True, kw_only=True)
class AccuracyConfig:
    """Perplexity and passkey retrieval with real sparse attention, per method x sparsity.

    Attributes
    ----------
    block_size, selection, sink_blocks, local_blocks:
        Sparse layout (one selection per KV head with ``per_head``).
    ratios:
        ``Budget.ratio`` values (fraction of candidate blocks kept); the measured fraction of all
        blocks read (``density``) is recorded with every cell.
    methods:
        From :data:`~ucm_trt.eval.methods.METHODS` + ``oracle``, ``streaming``; dense is always run.
    ppl_samples, ppl_prefix, ppl_scored, chunk:
        Perplexity: ``ppl_samples`` essay windows; ``ppl_prefix`` tokens prefilled densely, the next
        ``ppl_scored`` tokens scored with sparse attention, fed ``chunk`` tokens at a time (one
        retrieval per chunk, from the chunk's queries).
    passkey_lengths, passkey_depths, passkey_samples, max_new_tokens:
        Passkey prompts (:func:`ucm_trt.models.build_passkey_prompt`); everything before the question
        is prefilled densely, the question runs sparse (in chunks of ``chunk`` tokens: one chunk for
        SmolLM2's 11-token question), then ``max_new_tokens`` greedy sparse decode steps.
    observation:
        Queries at the end of the dense prefix that weight ``weighted_mean``.
    rollback_layers:
        Layers kept dense.
    """

    block_size: int = 32
    selection: str = "per_head"
    sink_blocks: int = 1
    local_blocks: int = 2
    ratios: tuple[float, ...] = (0.1, 0.3, 0.5, 0.7)
    methods: tuple[str, ...] = METHODS + BASELINES
    ppl_samples: int = 2
    ppl_prefix: int = 1024
    ppl_scored: int = 128
    chunk: int = 16
    passkey_lengths: tuple[int, ...] = (1024, 2048)
    passkey_depths: tuple[float, ...] = (0.1, 0.5, 0.9)
    passkey_samples: int = 1
    max_new_tokens: int = 6
    observation: int = 32
    rollback_layers: tuple[int, ...] = ()
    seed: int = 0

    def __post_init__(self) -> None:
        c = "AccuracyConfig"
        _pos_int(c, "block_size", self.block_size)
        if self.block_size & (self.block_size - 1):
            raise ValueError(f"{c}.block_size must be a power of two, got {self.block_size}")
        if self.selection not in _SELECTIONS:
            raise ValueError(f"{c}.selection must be one of {_SELECTIONS}, got {self.selection!r}")
        _pos_int(c, "sink_blocks", self.sink_blocks, 0)
        _pos_int(c, "local_blocks", self.local_blocks)
        _ratio_tuple(c, "ratios", self.ratios)
        if not isinstance(self.methods, tuple) or not self.methods:
            raise TypeError(f"{c}.methods must be a non-empty tuple, got {self.methods!r}")
        for m in self.methods:
            if m not in METHODS + BASELINES:
                raise ValueError(f"{c}.methods values must be in {METHODS + BASELINES}, got {m!r}")
        _pos_int(c, "ppl_samples", self.ppl_samples, 0)
        _pos_int(c, "ppl_prefix", self.ppl_prefix)
        _pos_int(c, "ppl_scored", self.ppl_scored, 2)
        _pos_int(c, "chunk", self.chunk)
        if self.chunk > self.block_size:
            raise ValueError(f"{c}.chunk ({self.chunk}) must be <= block_size ({self.block_size})")
        _int_tuple(c, "passkey_lengths", self.passkey_lengths, allow_empty=True)
        if not isinstance(self.passkey_depths, tuple):
            raise TypeError(f"{c}.passkey_depths must be a tuple, got {self.passkey_depths!r}")
        for d in self.passkey_depths:
            _unit(c, "passkey_depths[...]", d)
        _pos_int(c, "passkey_samples", self.passkey_samples, 0)
        _pos_int(c, "max_new_tokens", self.max_new_tokens)
        _pos_int(c, "observation", self.observation)
        _int_tuple(c, "rollback_layers", self.rollback_layers, minimum=0, allow_empty=True)
        _pos_int(c, "seed", self.seed, 0)


def quick_configs() -> tuple[RecallSweepConfig, AccuracyConfig]:
    """The ``--quick`` preset: one 1K-token essay, one block size, a small table. ``ucm-trt eval --quick``
    narrows the recall layers to the first, second, middle and last layer of the model it runs."""
    return (
        RecallSweepConfig(
            num_tokens=1024, essay_samples=1, passkey_samples=0, num_queries=32, observation=32,
            block_sizes=(32,), selections=("per_head",), ratios=(0.1, 0.5), token_budgets=(256,),
        ),
        AccuracyConfig(
            ratios=(0.1, 0.5), methods=("mean", "oracle", "streaming"), ppl_samples=1, ppl_prefix=512,
            ppl_scored=32, passkey_lengths=(512,), passkey_depths=(0.5,), passkey_samples=1,
        ),
    )


# --------------------------------------------------------------------------------------------
# prompts

_ESSAY_STRIDE_CHARS = 97_000


def essay_ids(tokenizer: Any, text: str, *, num_tokens: int, sample: int) -> torch.Tensor:
    """``[1, num_tokens]`` int64 tokens of the haystack text starting at ``sample * 97,000`` characters
    (wrapping around the text), tokenized without special tokens."""
    _pos_int("essay_ids", "num_tokens", num_tokens)
    _pos_int("essay_ids", "sample", sample, 0)
    if not isinstance(text, str) or not text:
        raise ValueError("text must be a non-empty str")
    start = (sample * _ESSAY_STRIDE_CHARS) % len(text)
    need_chars = 8 * num_tokens + 1024
    window = text[start : start + need_chars]
    while len(window) < need_chars:
        window += "\n\n" + text[: need_chars - len(window)]
    ids = tokenizer(window, add_special_tokens=False)["input_ids"]
    if len(ids) < num_tokens:
        raise ValueError(f"the haystack gives only {len(ids)} tokens at sample {sample}, need {num_tokens}")
    return torch.tensor([ids[:num_tokens]], dtype=torch.int64)


def _passkey(seed: int, *parts: int) -> str:
    mixed = seed
    for p in parts:
        mixed = (mixed * 1_000_003 + p) % (2**31 - 1)
    g = torch.Generator().manual_seed(mixed)
    return str(int(torch.randint(10000, 100000, (1,), generator=g)))


def _passkey_prompt(tokenizer: Any, haystack: Any, *, num_tokens: int, depth: float, sample: int, seed: int):
    from ucm_trt.models import build_passkey_prompt

    key = _passkey(seed, num_tokens, round(depth * 1000), sample)
    offset = (sample * _ESSAY_STRIDE_CHARS + 13_000) % max(1, len(haystack.text) - 16 * num_tokens)
    return build_passkey_prompt(
        tokenizer, num_tokens=num_tokens, passkey=key, depth=float(depth), haystack=haystack,
        offset_chars=offset,
    )


def _question_start(tokenizer: Any, prompt: Any) -> int:
    """Index of the first token of the passkey question (the text after the haystack)."""
    from ucm_trt.models.prompts import PASSKEY_QUESTION

    if not prompt.text.endswith(PASSKEY_QUESTION):
        raise ValueError("passkey prompt does not end with the question template")
    q_char = len(prompt.text) - len(PASSKEY_QUESTION)
    enc = tokenizer(prompt.text, return_offsets_mapping=True)
    offsets = enc["offset_mapping"]
    for i, (_start, end) in enumerate(offsets):
        if end > q_char:
            return i
    raise ValueError("the question was not found in the prompt's token offsets")


def _progress(iterable: Iterable, *, total: int, desc: str, enabled: bool):
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, dynamic_ncols=True)


# --------------------------------------------------------------------------------------------
# recall sweep


def _recall_budgets(cfg: RecallSweepConfig, block_size: int):
    from ucm_trt.config import Budget

    ratios = list(cfg.ratios)
    if cfg.rollback_ratio not in ratios:
        ratios.append(cfg.rollback_ratio)
    budgets = [Budget.ratio(r) for r in sorted(ratios)]
    forced = cfg.sink_blocks + cfg.local_blocks
    for tokens in cfg.token_budgets:
        k = tokens // block_size - forced
        if k >= 1:
            budgets.append(Budget.top_k(k))
    return budgets


def _recall_samples(cfg: RecallSweepConfig) -> list[tuple[str, int]]:
    return [("essay", i) for i in range(cfg.essay_samples)] + [("passkey", i) for i in range(cfg.passkey_samples)]


def run_recall_sweep(
    model: Any, tokenizer: Any, haystack: Any, cfg: RecallSweepConfig, store: ResultStore, *, progress: bool = True
) -> int:
    """Run (or resume) the recall sweep into ``store``; returns the number of cells computed now.

    Cell ``recall|block_size|layer|num_tokens|...|sample|selection`` holds the rows of
    :func:`~ucm_trt.sparse.recall.recall_curve` (method, budget, recall, oracle_recall, relative,
    blocks, num_blocks) and, for the passkey prompt, the needle's token span.
    """
    from ucm_trt.models import capture_qk
    from ucm_trt.sparse.recall import recall_curve

    if not isinstance(cfg, RecallSweepConfig):
        raise TypeError(f"cfg must be a RecallSweepConfig, got {type(cfg).__name__}")
    num_layers = int(model.config.num_hidden_layers)
    layers = tuple(range(num_layers)) if cfg.layers is None else cfg.layers
    for layer in layers:
        if layer >= num_layers:
            raise ValueError(f"RecallSweepConfig.layers names layer {layer}, but the model has {num_layers}")
    done = 0
    for kind, sample in _recall_samples(cfg):
        def params(layer: int, bs: int, sel: str, kind: str = kind, sample: int = sample) -> dict[str, Any]:
            return dict(prompt=kind, sample=sample, num_tokens=cfg.num_tokens, layer=layer, block_size=bs,
                        selection=sel, num_queries=cfg.num_queries, observation=cfg.observation,
                        sink_blocks=cfg.sink_blocks, local_blocks=cfg.local_blocks, seed=cfg.seed)

        todo = [(layer, bs, sel) for layer in layers for bs in cfg.block_sizes for sel in cfg.selections]
        todo = [t for t in todo if cell_key("recall", params(*t)) not in store]
        if not todo:
            continue
        extra: dict[str, Any] = {}
        if kind == "essay":
            ids = essay_ids(tokenizer, haystack.text, num_tokens=cfg.num_tokens, sample=sample)
        else:
            prompt = _passkey_prompt(tokenizer, haystack, num_tokens=cfg.num_tokens, depth=0.5,
                                     sample=sample, seed=cfg.seed)
            ids = prompt.input_ids
            extra = {"needle_token_span": list(prompt.needle_token_span), "passkey": prompt.passkey}
        need_layers = sorted({t[0] for t in todo})
        captured = capture_qk(model, ids, layers=need_layers)
        t = ids.shape[1]
        nq, no = cfg.num_queries, cfg.observation
        for layer, bs, sel in _progress(todo, total=len(todo), desc=f"recall {kind}{sample}", enabled=progress):
            q, k = captured[layer]
            q = q[0].float()
            k = k[0].float()
            curve = recall_curve(
                q[:, t - nq :], k, budgets=_recall_budgets(cfg, bs), block_size=bs, selection=sel,
                sink_blocks=cfg.sink_blocks, local_blocks=cfg.local_blocks,
                observation_q=q[:, t - nq - no : t - nq], hash_seed=cfg.seed,
            )
            rows = [
                {key: r[key] for key in ("method", "budget", "recall", "oracle_recall", "relative", "blocks", "num_blocks")}
                for r in curve.rows
            ]
            for r in rows:
                if not all(math.isfinite(r[x]) for x in ("recall", "oracle_recall", "blocks")):
                    raise RuntimeError(f"non-finite recall row {r} at layer {layer}, block size {bs}")
                if not math.isfinite(r["relative"]):
                    r["relative"] = None  # oracle recall 0: ratio undefined
            store.put("recall", params(layer, bs, sel), {"rows": rows, "prompt_tokens": int(t), **extra})
            done += 1
        del captured
    return done


# --------------------------------------------------------------------------------------------
# accuracy: perplexity and passkey


def _contexts(prefix: Any, cfg: AccuracyConfig, head_dim: int):
    from ucm_trt.config import KVStarConfig
    from ucm_trt.sparse.representations import HashEncoder

    enc = HashEncoder.random(head_dim, head_dim, seed=cfg.seed)
    kv = KVStarConfig()
    cache: dict[int, MethodContext] = {}

    def context(layer: int) -> MethodContext:
        if layer not in cache:
            w = prefix.token_weights.get(layer)
            cache[layer] = MethodContext(hash_encoder=enc, kvstar=kv, token_weights=None if w is None else w[0])
        return cache[layer]

    return context


def _run_for(method: str, ratio: float, cfg: AccuracyConfig, context):
    from ucm_trt.eval.sparse_lm import SparseRun

    if method == "dense":
        return SparseRun(selector=None, block_size=cfg.block_size)
    sel = make_selector(method, ratio=ratio, sink_blocks=cfg.sink_blocks, local_blocks=cfg.local_blocks,
                        selection=cfg.selection, context=context)
    return SparseRun(selector=sel, block_size=cfg.block_size, rollback_layers=frozenset(cfg.rollback_layers))


def _acc_variants(cfg: AccuracyConfig) -> list[tuple[str, float]]:
    return [("dense", 1.0)] + [(m, r) for m in cfg.methods for r in cfg.ratios]


def _common(cfg: AccuracyConfig) -> dict[str, Any]:
    return dict(block_size=cfg.block_size, selection=cfg.selection, sink_blocks=cfg.sink_blocks,
                local_blocks=cfg.local_blocks, rollback=list(cfg.rollback_layers), seed=cfg.seed)


def run_accuracy(
    model: Any, tokenizer: Any, haystack: Any, cfg: AccuracyConfig, store: ResultStore, *, progress: bool = True
) -> int:
    """Run (or resume) the perplexity and passkey cells into ``store``; returns cells computed now."""
    from ucm_trt.eval.sparse_lm import continuation_nll, greedy_generate, prefill

    if not isinstance(cfg, AccuracyConfig):
        raise TypeError(f"cfg must be an AccuracyConfig, got {type(cfg).__name__}")
    num_layers = int(model.config.num_hidden_layers)
    for layer in cfg.rollback_layers:
        if layer >= num_layers:
            raise ValueError(f"AccuracyConfig.rollback_layers names layer {layer}, but the model has {num_layers}")
    head_dim = int(getattr(model.config, "head_dim", None) or model.config.hidden_size // model.config.num_attention_heads)
    variants = _acc_variants(cfg)
    done = 0

    # perplexity
    for sample in range(cfg.ppl_samples):
        def pparams(method: str, ratio: float, sample: int = sample) -> dict[str, Any]:
            return dict(sample=sample, prefix=cfg.ppl_prefix, scored=cfg.ppl_scored, chunk=cfg.chunk,
                        method=method, ratio=ratio, **_common(cfg))

        todo = [v for v in variants if cell_key("ppl", pparams(*v)) not in store]
        if not todo:
            continue
        ids = essay_ids(tokenizer, haystack.text, num_tokens=cfg.ppl_prefix + cfg.ppl_scored, sample=sample + 1)
        prefix = prefill(model, ids[:, : cfg.ppl_prefix], observe_window=cfg.observation)
        context = _contexts(prefix, cfg, head_dim)
        cont = ids[:, cfg.ppl_prefix :]
        for method, ratio in _progress(todo, total=len(todo), desc=f"ppl sample {sample}", enabled=progress):
            run = _run_for(method, ratio, cfg, context)
            nll, n = continuation_nll(model, prefix, cont, run, chunk=cfg.chunk)
            store.put("ppl", pparams(method, ratio), {
                "nll": nll, "tokens": n, "ppl": math.exp(nll / n),
                "density": 1.0 if run.density is None else run.density,
            })
            done += 1

    # passkey
    for length in cfg.passkey_lengths:
        for depth in cfg.passkey_depths:
            for sample in range(cfg.passkey_samples):
                def kparams(method: str, ratio: float, length: int = length, depth: float = depth,
                            sample: int = sample) -> dict[str, Any]:
                    return dict(length=length, depth=float(depth), sample=sample, max_new_tokens=cfg.max_new_tokens,
                                method=method, ratio=ratio, **_common(cfg))

                todo = [v for v in variants if cell_key("passkey", kparams(*v)) not in store]
                if not todo:
                    continue
                prompt = _passkey_prompt(tokenizer, haystack, num_tokens=length, depth=depth, sample=sample,
                                         seed=cfg.seed)
                qstart = _question_start(tokenizer, prompt)
                prefix = prefill(model, prompt.input_ids[:, :qstart], observe_window=cfg.observation)
                context = _contexts(prefix, cfg, head_dim)
                suffix = prompt.input_ids[:, qstart:]
                desc = f"passkey {length} d={depth}"
                for method, ratio in _progress(todo, total=len(todo), desc=desc, enabled=progress):
                    run = _run_for(method, ratio, cfg, context)
                    gen = greedy_generate(model, prefix, suffix, run, max_new_tokens=cfg.max_new_tokens, chunk=cfg.chunk)
                    completion = tokenizer.decode(gen)
                    store.put("passkey", kparams(method, ratio), {
                        "passkey": prompt.passkey, "completion": completion,
                        "correct": bool(prompt.is_correct(completion)), "prompt_tokens": prompt.num_tokens,
                        "question_tokens": int(suffix.shape[1]), "needle_token_span": list(prompt.needle_token_span),
                        "density": 1.0 if run.density is None else run.density,
                    })
                    done += 1
    return done


def config_dict(cfg: RecallSweepConfig | AccuracyConfig) -> dict[str, Any]:
    d = asdict(cfg)
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in d.items()}


# --------------------------------------------------------------------------------------------
# passkey through the generation runtime (ucm_trt.runtime)

#: dense and every block-selecting decode policy of the registry (dense, esa, gsa, gsa-on-device, kvstar)
RUNTIME_ALGORITHMS: tuple[str, ...] = ("dense", *registry.budgeted_names())
_RUNTIME_REPR = {n: (registry.get(n).representation, registry.get(n).scoring) for n in RUNTIME_ALGORITHMS}


@dataclass(frozen=True, kw_only=True)
class RuntimePasskeyConfig:
    """Passkey retrieval through :class:`ucm_trt.runtime.Engine` (TorchBackend, reference attention).

    The runtime prefills the prompt densely and decodes sparsely with the algorithm's policy. Every
    algorithm keeps the same number of blocks: ``Budget.ratio(ratio)`` of the candidates (for
    ``gsa-on-device``, ``top_k_tokens`` is set to that many blocks plus the forced windows, and its
    gate is opened with ``seq_len_threshold=0``).
    """

    algorithms: tuple[str, ...] = RUNTIME_ALGORITHMS
    ratios: tuple[float, ...] = (0.1, 0.3, 0.5, 0.7)
    block_size: int = 32
    sink_blocks: int = 1
    local_blocks: int = 2
    retrieval_stride: int = 1
    lengths: tuple[int, ...] = (1024, 2048)
    depths: tuple[float, ...] = (0.1, 0.5, 0.9)
    samples: int = 1
    max_new_tokens: int = 6
    seed: int = 0

    def __post_init__(self) -> None:
        c = "RuntimePasskeyConfig"
        if not isinstance(self.algorithms, tuple) or not self.algorithms:
            raise TypeError(f"{c}.algorithms must be a non-empty tuple, got {self.algorithms!r}")
        for a in self.algorithms:
            if a not in RUNTIME_ALGORITHMS:
                raise ValueError(f"{c}.algorithms values must be in {RUNTIME_ALGORITHMS}, got {a!r}")
        _ratio_tuple(c, "ratios", self.ratios)
        _pos_int(c, "block_size", self.block_size)
        _pos_int(c, "sink_blocks", self.sink_blocks, 0)
        _pos_int(c, "local_blocks", self.local_blocks)
        _pos_int(c, "retrieval_stride", self.retrieval_stride)
        _int_tuple(c, "lengths", self.lengths)
        if not isinstance(self.depths, tuple) or not self.depths:
            raise TypeError(f"{c}.depths must be a non-empty tuple, got {self.depths!r}")
        for d in self.depths:
            _unit(c, "depths[...]", d)
        _pos_int(c, "samples", self.samples)
        _pos_int(c, "max_new_tokens", self.max_new_tokens)
        _pos_int(c, "seed", self.seed, 0)


def _runtime_engine(model: Any, algorithm: str, ratio: float, cfg: RuntimePasskeyConfig, prompt_len: int):
    from ucm_trt.config import Budget, GSAOnDeviceConfig, SparseConfig
    from ucm_trt.runtime import Engine, RuntimeConfig, TorchBackend, make_policy

    rep, scoring = _RUNTIME_REPR[algorithm]
    bs = cfg.block_size
    sparse = SparseConfig(block_size=bs, sink_blocks=cfg.sink_blocks, local_blocks=cfg.local_blocks,
                          budget=Budget.ratio(ratio), min_blocks=1, representation=rep, scoring=scoring,
                          selection="per_head", retrieval_stride=cfg.retrieval_stride)
    kwargs: dict[str, Any] = {}
    if algorithm == "gsa-on-device":
        nb = (prompt_len + bs - 1) // bs
        forced = cfg.sink_blocks + cfg.local_blocks
        keep = max(1, math.floor(ratio * (nb - forced) + 1e-9))
        kwargs["gsa_on_device"] = GSAOnDeviceConfig(top_k_tokens=(forced + keep) * bs, seq_len_threshold=0,
                                                    hash_seed=cfg.seed)
    policy = make_policy(algorithm, **kwargs)
    rcfg = RuntimeConfig(max_batch=1, max_seq_len=prompt_len + cfg.max_new_tokens + bs, prefill_chunk=512)
    return Engine(TorchBackend(model), policy, sparse=sparse, config=rcfg)


def run_runtime_passkey(
    model: Any, tokenizer: Any, haystack: Any, cfg: RuntimePasskeyConfig, store: ResultStore, *, progress: bool = True
) -> int:
    """Run (or resume) passkey cells through the generation runtime; returns cells computed now."""
    from ucm_trt.runtime import SamplingParams

    if not isinstance(cfg, RuntimePasskeyConfig):
        raise TypeError(f"cfg must be a RuntimePasskeyConfig, got {type(cfg).__name__}")
    variants = [(a, 1.0) if a == "dense" else None for a in cfg.algorithms]
    variants = [v for v in variants if v is not None] + [
        (a, r) for a in cfg.algorithms if a != "dense" for r in cfg.ratios
    ]
    done = 0
    for length in cfg.lengths:
        for depth in cfg.depths:
            for sample in range(cfg.samples):
                def kparams(alg: str, ratio: float, length: int = length, depth: float = depth,
                            sample: int = sample) -> dict[str, Any]:
                    return dict(length=length, depth=float(depth), sample=sample, algorithm=alg, ratio=ratio,
                                block_size=cfg.block_size, sink_blocks=cfg.sink_blocks,
                                local_blocks=cfg.local_blocks, retrieval_stride=cfg.retrieval_stride,
                                max_new_tokens=cfg.max_new_tokens, seed=cfg.seed)

                todo = [v for v in variants if cell_key("runtime_passkey", kparams(*v)) not in store]
                if not todo:
                    continue
                prompt = _passkey_prompt(tokenizer, haystack, num_tokens=length, depth=depth, sample=sample,
                                         seed=cfg.seed)
                ids = prompt.input_ids[0].tolist()
                desc = f"runtime passkey {length} d={depth}"
                for alg, ratio in _progress(todo, total=len(todo), desc=desc, enabled=progress):
                    engine = _runtime_engine(model, alg, ratio, cfg, len(ids))
                    try:
                        [res] = engine.generate(ids, SamplingParams(max_new_tokens=cfg.max_new_tokens))
                        stats = engine.stats()
                    finally:
                        engine.close()
                    completion = tokenizer.decode(res.token_ids)
                    scalars = {k: v for k, v in stats.items()
                               if isinstance(v, (int, float, str)) and not isinstance(v, bool)
                               and (not isinstance(v, float) or math.isfinite(v))}
                    store.put("runtime_passkey", kparams(alg, ratio), {
                        "passkey": prompt.passkey, "completion": completion,
                        "correct": bool(prompt.is_correct(completion)), "prompt_tokens": prompt.num_tokens,
                        "stats": scalars,
                    })
                    done += 1
    return done
