"""Retrieval grids through the generation runtime: does each sparse method keep dense's answers?

Three tasks over the Paul Graham essays (or the synthetic filler), each at several context lengths
x needle depths x samples:

* ``passkey``     one 5-digit pass key (:func:`ucm_trt.models.build_passkey_prompt`);
* ``multikey``    four pass keys for four coloured doors, the question asks for one of them (the
                  asked needle sits at the cell's depth, the three distractors elsewhere);
* ``aggregation`` three secret words spread over the context (the cell's depth and two others);
                  the question asks for all of them (correct = every word in the answer).

Every prompt is answered greedily by every method through :class:`ucm_trt.runtime.Engine`
(PyTorch backend: reference attention on the CPU, Triton on CUDA): the runtime prefills densely and
decodes with the algorithm's policy. The metric is **agreement with dense**: of the prompts dense
answers right, the fraction the method also answers right (:func:`summarize`).

A method is ``algorithm`` or ``algorithm@preset`` (:data:`ucm_trt.runtime.algorithms.PRESETS`), at a
budget ``Budget.ratio(b)`` of the candidate blocks (``gsa-on-device``: ``top_k_tokens`` set to the same
number of blocks, gate open); a ``+sync`` suffix runs it with ``RuntimeConfig(overlap_loads=False)``
(a retrieval's blocks are attended at the step it is due, not one step later), a ``+wN`` suffix
(``esa`` / ``gsa`` only) makes the first retrieval from the last ``N`` prompt queries
(``PrefillWindow(tokens=N)``; ``+wNmax``: ``reduce="max"``; ``+wNp1``: ``persist=1``, the window's scores
added to every later retrieval; ``+w1`` is the window-less first retrieval), a ``+own`` / ``+union`` suffix
(``esa`` / ``gsa`` / ``gsa-on-device`` / ``kvstar``) sets :class:`~ucm_trt.config.HeadMerge` (each KV head attends its own blocks /
the union of its layer's heads' blocks), ``+aX`` (``esa`` / ``gsa``) an adaptive budget, ``+crX`` (``kvstar``)
its channel ratio, ``+hbN`` (``gsa-on-device``) its hash width in bits per head-dim channel, ``+dtX`` the automatic dense layers' threshold (``DenseLayers.threshold``),
``+dlL[_L...]`` layers that always run dense (detection stays on),
a ``:b`` suffix at budget ``b`` only (``esa@ucm:0.125``). Suffixes combine: ``esa+sync+w1:0.125``.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ucm_trt import algorithms as registry

__all__ = [
    "GRID_TASKS",
    "GridConfig",
    "GridPrompt",
    "build_grid_prompt",
    "format_matrix",
    "format_rows",
    "markdown_grid",
    "plot_grid",
    "method_engine",
    "method_dense_layers",
    "method_head_merge",
    "method_prefill_window",
    "method_schedule",
    "parse_method",
    "run_grid",
    "summarize",
]

GRID_TASKS: tuple[str, ...] = ("passkey", "multikey", "aggregation")
_DOORS = ("red", "blue", "green", "yellow")
_WORDS = ("apple", "river", "candle", "tiger", "violin", "garden", "rocket", "pepper", "marble", "falcon",
          "copper", "meadow")
_MAX_NEW = {"passkey": 7, "multikey": 7, "aggregation": 14}
_ESSAY_STRIDE = 97_000


def _seeded(seed: int, *parts: int) -> torch.Generator:
    mixed = seed
    for p in parts:
        mixed = (mixed * 1_000_003 + p) % (2**31 - 1)
    return torch.Generator().manual_seed(mixed)


def _other_depths(depth: float, k: int, g: torch.Generator) -> list[float]:
    """``k`` depths in [0.05, 0.95] at least 0.1 away from ``depth`` and from each other."""
    out: list[float] = []
    while len(out) < k:
        d = 0.05 + 0.9 * float(torch.rand((), generator=g))
        if all(abs(d - x) >= 0.1 for x in [depth, *out]):
            out.append(round(d, 3))
    return out


@dataclass(frozen=True, kw_only=True)
class GridPrompt:
    task: str
    context_len: int  # the nominal length of the cell
    depth: float
    sample: int
    input_ids: list[int]
    answers: tuple[str, ...]
    max_new_tokens: int

    def is_correct(self, completion: str) -> bool:
        return all(a in completion for a in self.answers)


def build_grid_prompt(tokenizer: Any, haystack: Any, *, task: str, context_len: int, depth: float, sample: int,
                      seed: int = 0) -> GridPrompt:
    """The prompt of one grid cell sample (deterministic in its arguments)."""
    from ucm_trt.models.prompts import build_needle_prompt, build_passkey_prompt

    if task not in GRID_TASKS:
        raise ValueError(f"task must be one of {', '.join(GRID_TASKS)}, got {task!r}")
    if isinstance(depth, bool) or not isinstance(depth, (int, float)) or not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be a number in [0, 1], got {depth!r}")
    g = _seeded(seed, GRID_TASKS.index(task), context_len, round(depth * 1000), sample)
    offset = (sample * _ESSAY_STRIDE + 13_000 + 7_919 * GRID_TASKS.index(task)) % max(
        1, len(haystack.text) - 16 * context_len)

    def key() -> str:
        return str(int(torch.randint(10000, 100000, (1,), generator=g)))

    if task == "passkey":
        p = build_passkey_prompt(tokenizer, num_tokens=context_len, passkey=key(), depth=float(depth),
                                 haystack=haystack, offset_chars=offset)
        answers = (p.passkey,)
    elif task == "multikey":
        doors = [_DOORS[int(i)] for i in torch.randperm(len(_DOORS), generator=g)]
        keys = [key() for _ in doors]
        depths = [float(depth), *_other_depths(float(depth), len(doors) - 1, g)]
        needles = [(d, f"\nThe pass key for the {door} door is {k}. Remember it. {k} is the pass key for the "
                       f"{door} door.\n") for d, door, k in zip(depths, doors, keys, strict=True)]
        asked = doors[0]
        question = f"\n\nWhat is the pass key for the {asked} door? The pass key for the {asked} door is"
        p = build_needle_prompt(tokenizer, num_tokens=context_len, needles=needles, question=question,
                                answers=(keys[0],), haystack=haystack, offset_chars=offset)
        answers = p.answers
    else:
        words = [_WORDS[int(i)] for i in torch.randperm(len(_WORDS), generator=g)[:3]]
        depths = [float(depth), *_other_depths(float(depth), 2, g)]
        needles = [(d, f"\nOne of the three secret words is \"{w}\". Remember it.\n")
                   for d, w in zip(depths, words, strict=True)]
        question = "\n\nWhat are the three secret words? The three secret words are \""
        p = build_needle_prompt(tokenizer, num_tokens=context_len, needles=needles, question=question,
                                answers=tuple(words), haystack=haystack, offset_chars=offset)
        answers = p.answers
    return GridPrompt(task=task, context_len=context_len, depth=float(depth), sample=sample,
                      input_ids=p.input_ids[0].tolist(), answers=answers, max_new_tokens=_MAX_NEW[task])


def _split_budget(method: str) -> tuple[str, float | None]:
    """``"esa@ucm:0.125"`` -> ``("esa@ucm", 0.125)``; no ``:`` -> ``(method, None)``."""
    name, colon, b = method.partition(":")
    if not colon:
        return method, None
    try:
        budget = float(b)
    except ValueError:
        raise ValueError(f"method {method!r}: ':' must be followed by a budget in (0, 1], got {b!r}") from None
    if not 0 < budget <= 1:
        raise ValueError(f"method {method!r}: ':' must be followed by a budget in (0, 1], got {b!r}")
    return name, budget


def _suffixes(method: str) -> tuple[str, dict[str, Any]]:
    """``"esa@ucm+sync+w16max+a0.1:0.125"`` -> ``("esa@ucm", {"sync": True, "window": (16, "max", 0.0),
    "heads": None, "adaptive": 0.1})``."""
    base, _ = _split_budget(method)
    base, *parts = base.split("+")
    out: dict[str, Any] = {"sync": False, "window": None, "heads": None, "adaptive": None, "channels": None,
                           "hash_bits": None, "dense_threshold": None, "dense_layers": None}
    for part in parts:
        t = re.fullmatch(r"dt(0|1|0?\.\d+|1\.0*)", part)
        if t and out["dense_threshold"] is None and 0 <= float(t[1]) <= 1:
            out["dense_threshold"] = float(t[1])
            continue
        dl = re.fullmatch(r"dl(\d+(?:_\d+)*)", part)
        layers = tuple(int(x) for x in dl[1].split("_")) if dl else ()
        if dl and out["dense_layers"] is None and len(set(layers)) == len(layers):
            out["dense_layers"] = layers
            continue
        h = re.fullmatch(r"hb(\d+)", part)
        if h and out["hash_bits"] is None and 1 <= int(h[1]) <= 16:
            out["hash_bits"] = int(h[1])
            continue
        c = re.fullmatch(r"cr(0?\.\d+|1(?:\.0*)?)", part)
        if c and out["channels"] is None and 0 < float(c[1]) <= 1:
            out["channels"] = float(c[1])
            continue
        a = re.fullmatch(r"a(0?\.\d+)", part)
        if a and out["adaptive"] is None and 0 < float(a[1]) < 1:
            out["adaptive"] = float(a[1])
            continue
        if part == "sync" and not out["sync"]:
            out["sync"] = True
            continue
        if part in ("own", "union") and out["heads"] is None:
            out["heads"] = part
            continue
        m = re.fullmatch(r"w(\d+)(max)?(?:p(\d+(?:\.\d+)?))?", part)
        if m and int(m[1]) >= 1 and out["window"] is None:
            out["window"] = (int(m[1]), "max" if m[2] else "mean", float(m[3]) if m[3] else 0.0)
            continue
        raise ValueError(f"method {method!r}: a suffix must be '+sync', '+wN[max][pX]' (N >= 1), '+own' / "
                         f"'+union', '+aX' (0 < X < 1), '+crX' (0 < X <= 1), '+hbN' (1 <= N <= 16), '+dtX' "
                         f"(0 <= X <= 1) or '+dlL[_L...]' (distinct layers), each at most once; got '+{part}'")
    return base, out


def parse_method(method: str) -> tuple[str, str]:
    """``"esa"`` -> ``("esa", "default")``; ``"esa@ucm"`` -> ``("esa", "ucm")``. The ``+sync``
    (:func:`method_schedule`) and ``+wN`` (:func:`method_prefill_window`) suffixes and a ``:budget`` suffix
    (run at that budget only, :meth:`GridConfig.variants`) are accepted and not part of the result:
    ``"esa@ucm+sync+w16:0.125"``."""
    from ucm_trt.runtime.algorithms import PRESETS

    if not isinstance(method, str) or not method:
        raise ValueError(f"method must be 'algorithm[@preset][+sync][+wN][:budget]', got {method!r}")
    base, opts = _suffixes(method)
    algo, _, preset = base.partition("@")
    preset = preset or "default"
    if algo not in GRID_ALGORITHMS:
        raise ValueError(f"method {method!r}: algorithm must be one of {', '.join(GRID_ALGORITHMS)}")
    if preset not in PRESETS:
        raise ValueError(f"method {method!r}: preset must be one of {', '.join(PRESETS)}")
    if opts["window"] is not None and algo not in ("esa", "gsa"):
        raise ValueError(f"method {method!r}: '+wN' (the first retrieval's prompt queries) applies to esa and gsa "
                         f"only, not {algo}")
    if opts["adaptive"] is not None and algo not in ("esa", "gsa"):
        raise ValueError(f"method {method!r}: '+aX' (AdaptiveBudget(max_missed=X)) applies to esa and gsa only, "
                         f"not {algo}")
    if opts["channels"] is not None and algo != "kvstar":
        raise ValueError(f"method {method!r}: '+crX' (KVStarConfig(channel_ratio=X)) applies to kvstar only, not {algo}")
    if opts["hash_bits"] is not None and algo != "gsa-on-device":
        raise ValueError(f"method {method!r}: '+hbN' (GSAOnDeviceConfig(hash_bits_per_dim=N)) applies to "
                         f"gsa-on-device only, not {algo}")
    if (opts["dense_threshold"] is not None or opts["dense_layers"] is not None) and algo == "dense":
        raise ValueError(f"method {method!r}: '+dtX' / '+dlL' (the dense layers of a sparse policy) do not apply "
                         "to dense")
    if opts["heads"] is not None and algo not in ("esa", "gsa", "gsa-on-device", "kvstar"):
        raise ValueError(f"method {method!r}: '+{opts['heads']}' (HeadMerge: what each KV head attends) applies to "
                         f"esa, gsa, gsa-on-device and kvstar only, not {algo}")
    return algo, preset


def method_head_merge(method: str):
    """The :class:`~ucm_trt.config.HeadMerge` a ``+own`` / ``+union`` suffix sets, or ``None`` (the preset's)."""
    from ucm_trt.config import HeadMerge

    parse_method(method)
    heads = _suffixes(method)[1]["heads"]
    return None if heads is None else HeadMerge(mode=heads)


def method_adaptive(method: str):
    """The :class:`~ucm_trt.config.AdaptiveBudget` a ``+aX`` suffix sets (``max_missed=X``, the other fields
    their defaults), or ``None`` (off, the default)."""
    from ucm_trt.config import AdaptiveBudget

    parse_method(method)
    x = _suffixes(method)[1]["adaptive"]
    return None if x is None else AdaptiveBudget(max_missed=x)


def method_dense_layers(method: str):
    """The :class:`~ucm_trt.config.DenseLayers` a ``+dtX`` (detection threshold ``X``) and / or ``+dlL[_L...]``
    (layers always dense, detection still on) suffix sets, over the preset's rule; ``None`` without them."""
    import dataclasses

    from ucm_trt.runtime.algorithms import default_dense_layers

    algo, preset = parse_method(method)
    opts = _suffixes(method)[1]
    if opts["dense_threshold"] is None and opts["dense_layers"] is None:
        return None
    rule = default_dense_layers(preset)
    changes: dict[str, Any] = {}
    if opts["dense_threshold"] is not None:
        changes.update(auto=True, threshold=opts["dense_threshold"])
    if opts["dense_layers"] is not None:
        changes["layers"] = opts["dense_layers"]
    return dataclasses.replace(rule, **changes)


def method_kvstar_config(method: str):
    """The :class:`~ucm_trt.config.KVStarConfig` a ``+crX`` suffix sets (``channel_ratio=X``, the other fields
    their defaults), or ``None`` (the defaults)."""
    from ucm_trt.config import KVStarConfig

    parse_method(method)
    x = _suffixes(method)[1]["channels"]
    return None if x is None else KVStarConfig(channel_ratio=x)


def method_gsa_on_device_overrides(method: str) -> dict[str, Any]:
    """The :class:`~ucm_trt.config.GSAOnDeviceConfig` fields a ``+hbN`` suffix sets (``hash_bits_per_dim=N``),
    or ``{}`` (the preset's width)."""
    parse_method(method)
    n = _suffixes(method)[1]["hash_bits"]
    return {} if n is None else {"hash_bits_per_dim": n}


def method_policy_options(method: str) -> dict[str, Any]:
    """The :func:`~ucm_trt.runtime.algorithms.make_policy` keyword arguments ``method``'s suffixes set
    (``prefill_window``, ``head_merge``, ``adaptive``, ``kvstar``); those it does not set are left out."""
    opts = {"prefill_window": method_prefill_window(method), "head_merge": method_head_merge(method),
            "adaptive": method_adaptive(method), "kvstar": method_kvstar_config(method),
            "dense_layers": method_dense_layers(method)}
    return {name: value for name, value in opts.items() if value is not None}


def method_schedule(method: str) -> bool:
    """Whether ``method`` runs the runtime's overlapped (stale-by-one) load schedule
    (``RuntimeConfig.overlap_loads``, the default) — ``False`` for ``algorithm[@preset]+sync``, where a
    step that needs new blocks waits for them and attends the selection its retrieval made."""
    parse_method(method)
    return not _suffixes(method)[1]["sync"]


def method_prefill_window(method: str):
    """The :class:`~ucm_trt.config.PrefillWindow` a ``+wN[max][pX]`` suffix sets (``tokens=N``, ``max``:
    ``reduce="max"``, ``pX``: ``persist=X``), or ``None`` (the preset's)."""
    from ucm_trt.config import PrefillWindow

    parse_method(method)
    window = _suffixes(method)[1]["window"]
    return None if window is None else PrefillWindow(tokens=window[0], reduce=window[1], persist=window[2])


#: dense and every block-selecting decode policy of the registry (dense, esa, gsa, gsa-on-device, kvstar)
GRID_ALGORITHMS: tuple[str, ...] = ("dense", *registry.budgeted_names())


@dataclass(frozen=True, kw_only=True)
class GridConfig:
    """What :func:`run_grid` runs. ``methods`` are ``algorithm[@preset]`` names; ``dense`` always runs
    first (it defines the reference answers) and takes no budget."""

    tasks: tuple[str, ...] = GRID_TASKS
    methods: tuple[str, ...] = GRID_ALGORITHMS
    budgets: tuple[float, ...] = (0.125, 0.25)
    lengths: tuple[int, ...] = (1024, 2048, 4096, 8000)  # 8000: SmolLM2's 8192 positions hold the answer too
    depths: tuple[float, ...] = (0.1, 0.3, 0.5, 0.7, 0.9)
    samples: int = 4
    block_size: int = 32
    batch: int = 8
    prefill_chunk: int = 512
    seed: int = 0

    def __post_init__(self) -> None:
        c = "GridConfig"
        for name in ("tasks", "methods", "budgets", "lengths", "depths"):
            v = getattr(self, name)
            if not isinstance(v, tuple) or not v:
                raise TypeError(f"{c}.{name} must be a non-empty tuple, got {v!r}")
        for t in self.tasks:
            if t not in GRID_TASKS:
                raise ValueError(f"{c}.tasks: {t!r} is not one of {', '.join(GRID_TASKS)}")
        for m in self.methods:
            parse_method(m)
        if "dense" not in self.methods:
            raise ValueError(f"{c}.methods must include 'dense' (the reference answers), got {self.methods}")
        for b in self.budgets:
            if isinstance(b, bool) or not isinstance(b, (int, float)) or not 0 < b <= 1:
                raise ValueError(f"{c}.budgets values must be in (0, 1], got {b!r}")
        for n in self.lengths:
            if isinstance(n, bool) or not isinstance(n, int) or n < 256:
                raise ValueError(f"{c}.lengths values must be ints >= 256, got {n!r}")
        for d in self.depths:
            if isinstance(d, bool) or not isinstance(d, (int, float)) or not 0 <= d <= 1:
                raise ValueError(f"{c}.depths values must be in [0, 1], got {d!r}")
        for name in ("samples", "block_size", "batch", "prefill_chunk"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{c}.{name} must be an int >= 1, got {v!r}")
        if self.block_size & (self.block_size - 1):
            raise ValueError(f"{c}.block_size must be a power of two, got {self.block_size}")

    def variants(self) -> list[tuple[str, float | None]]:
        """``(method, budget)`` in run order: dense first (budget None), then every sparse method x budget;
        a method named ``name:b`` runs at budget ``b`` only (as ``name``; ``b`` need not be in ``budgets``)."""
        out: list[tuple[str, float | None]] = [("dense", None)]
        for m in self.methods:
            if m == "dense":
                continue
            name, only = _split_budget(m)
            out += [(name, only)] if only is not None else [(m, float(b)) for b in self.budgets]
        return out


def method_engine(backend: Any, method: str, budget: float | None, *, max_prompt_len: int, min_prompt_len: int,
                  max_new_tokens: int, cfg: GridConfig, prefill_cache: Any = None):
    """A fresh :class:`~ucm_trt.runtime.Engine` for ``method`` at ``Budget.ratio(budget)``: preset
    ``default`` selects per KV head, ``ucm`` shared (upstream's). ``prefill_cache``: a
    :class:`~ucm_trt.runtime.prefill_cache.PrefillCache` shared by the engines of one set of prompts.

    Decode runs eagerly (``cuda_graph=False``): a grid engine lives for one batch of 7-14 decode steps,
    fewer than a CUDA-graph capture would pay back."""
    from ucm_trt.config import Budget, SparseConfig
    from ucm_trt.runtime import Engine, RuntimeConfig
    from ucm_trt.runtime.algorithms import grid_gsa_on_device_config, make_policy, sparse_config_for

    algo, preset = parse_method(method)
    # preset default selects per KV head (as the chat and `make demo`); ucm: shared (sparse_config_for)
    base = SparseConfig(block_size=cfg.block_size, budget=Budget.ratio(budget if budget is not None else 1.0),
                        selection="per_head" if preset == "default" else "shared")
    sparse = sparse_config_for(algo, base, preset=preset)
    kwargs: dict[str, Any] = {}
    if algo == "gsa-on-device":
        kwargs["gsa_on_device"] = grid_gsa_on_device_config(sparse, min_prompt_len, preset=preset,
                                                            **method_gsa_on_device_overrides(method))
    kwargs.update(method_policy_options(method))
    policy = make_policy(algo, preset=preset, **kwargs)
    bs = cfg.block_size
    rcfg = RuntimeConfig(max_batch=cfg.batch, max_seq_len=max_prompt_len + max_new_tokens + bs,
                         prefill_chunk=cfg.prefill_chunk, cuda_graph=False, overlap_loads=method_schedule(method))
    return Engine(backend, policy, sparse=sparse, config=rcfg, prefill_cache=prefill_cache)


def run_grid(
    model: Any,
    tokenizer: Any,
    haystack: Any,
    cfg: GridConfig,
    *,
    on_records: Callable[[list[dict]], None] | None = None,
    log: Callable[[str], None] | None = print,
    deadline: float | None = None,
    reuse: Sequence[dict] = (),
) -> list[dict]:
    """Every prompt of the grid answered by every ``(method, budget)``; returns one record per answer.

    Order: in *rounds* of one sample per cell (round ``s`` = sample ``s`` of every task x depth), each
    round over every length and every ``(method, budget)``, so that a run stopped early still covers
    the whole grid with fewer samples. ``on_records(records_so_far)`` is called after each engine
    (write partial results there). With ``deadline`` (a ``time.perf_counter()`` value) no new engine
    starts after it; in a round cut short the methods that did not reach it have fewer prompts (``n``
    of :func:`summarize`); dense runs first for every (round, length), so agreement stays defined.

    ``reuse``: records of an earlier run (same prompts: tasks, depths, seed); an engine whose every
    prompt has a record there for the same method and budget is not run again, its records are taken
    (marked ``"reused": True``).

    Every method prefills densely, so the prompts of a (round, length) are prefilled once, by the dense
    engine, and replayed by the others (:class:`~ucm_trt.runtime.prefill_cache.PrefillCache`: the same
    K/V, logits and queries as computing them; a round costs one prefill per prompt, not one per method)."""
    from ucm_trt.runtime import SamplingParams, TorchBackend
    from ucm_trt.runtime.prefill_cache import PrefillCache

    if not isinstance(cfg, GridConfig):
        raise TypeError(f"cfg must be a GridConfig, got {type(cfg).__name__}")
    backend = TorchBackend(model)
    windows = [w[0] for w in (_suffixes(m)[1]["window"] for m in cfg.methods) if w is not None]
    cache = PrefillCache(backend, query_window=max([32, *windows]), max_bytes=1 << 40)
    records: list[dict] = []
    done = {(r["method"], r["budget"], r["task"], r["context_len"], r["depth"], r["sample"]): r for r in reuse}
    for sample in range(cfg.samples):
        for length in cfg.lengths:
            prompts = [build_grid_prompt(tokenizer, haystack, task=t, context_len=length, depth=d, sample=sample,
                                         seed=cfg.seed)
                       for t in cfg.tasks for d in cfg.depths]
            lens = [len(p.input_ids) for p in prompts]
            max_new = max(p.max_new_tokens for p in prompts)
            room = max(lens) + max_new + cfg.block_size  # what method_engine's RuntimeConfig.max_seq_len asks for
            if room > backend.shape.max_positions:
                raise ValueError(
                    f"GridConfig.lengths: {length} leaves no room for the answer within the model's "
                    f"{backend.shape.max_positions} positions (prompt {max(lens)} + {max_new} new tokens + one block "
                    f"of {cfg.block_size} = {room}); use a length <= "
                    f"{backend.shape.max_positions - max_new - cfg.block_size - (max(lens) - length)}"
                )
            cache.clear()  # the recordings of the last (round, length): other prompts
            for method, budget in cfg.variants():
                t0 = time.perf_counter()
                old = [done.get((method, budget, p.task, length, p.depth, p.sample)) for p in prompts]
                if all(r is not None for r in old):
                    records += [{**r, "reused": True} for r in old]
                    if log is not None:
                        log(f"[grid] s{sample} {length:>5} {method:<18} budget {budget if budget is not None else '-':<6} "
                            f"{sum(r['correct'] for r in old)}/{len(old)} correct (reused)")
                    continue
                if deadline is not None and t0 > deadline:
                    if log is not None:
                        log(f"[grid] deadline reached: stopped before sample {sample}, {length} {method} {budget}")
                    return records
                engine = method_engine(backend, method, budget, max_prompt_len=max(lens), min_prompt_len=min(lens),
                                       max_new_tokens=max_new, cfg=cfg, prefill_cache=cache)
                hits0 = cache.hits
                try:
                    params = [SamplingParams(max_new_tokens=p.max_new_tokens) for p in prompts]
                    results = engine.generate([p.input_ids for p in prompts], params)
                    stats = engine.stats().get("policy", {})
                finally:
                    engine.close()
                hits = cache.hits - hits0
                run = {"seconds": round(time.perf_counter() - t0, 2), "prefills_replayed": hits,
                       **{k: stats[k] for k in ("selected_block_fraction", "dense_layer_counts", "adaptive")
                          if k in stats}}
                for p, res in zip(prompts, results, strict=True):
                    text = tokenizer.decode(res.token_ids, skip_special_tokens=True)
                    records.append({
                        "task": p.task, "context_len": length, "prompt_tokens": len(p.input_ids), "depth": p.depth,
                        "sample": p.sample, "method": method, "budget": budget, "answers": list(p.answers),
                        "completion": text, "correct": p.is_correct(text), "run": run,
                    })
                ok = sum(r["correct"] for r in records[-len(prompts):])
                if log is not None:
                    frac = stats.get("selected_block_fraction")
                    extra = f", blocks read {frac:.3f}" if isinstance(frac, float) else ""
                    log(f"[grid] s{sample} {length:>5} {method:<18} budget {budget if budget is not None else '-':<6} "
                        f"{ok}/{len(prompts)} correct ({time.perf_counter() - t0:.1f} s, {hits} prefills replayed{extra}, "
                        f"dense layers {stats.get('dense_layer_counts', {})})")
                if on_records is not None:
                    on_records(records)
    return records


def summarize(records: Sequence[dict]) -> list[dict]:
    """Rows ``task, algorithm, budget, context_len, n, dense_correct, agree_with_dense, accuracy``.

    ``agree_with_dense``: of the prompts dense answers right, the fraction the method answers right
    (NaN -> None when dense answers none). ``algorithm`` is the method name (``algo[@preset]``)."""
    dense = {(r["task"], r["context_len"], r["depth"], r["sample"]): r["correct"]
             for r in records if r["method"] == "dense"}
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        groups.setdefault((r["task"], r["method"], r["budget"], r["context_len"]), []).append(r)
    rows = []
    for (task, method, budget, length), rs in groups.items():
        keyed = [(r, dense.get((r["task"], r["context_len"], r["depth"], r["sample"]))) for r in rs]
        if any(d is None for _, d in keyed):
            raise ValueError(f"records of {method} at {task}/{length} have prompts that dense did not answer")
        dense_ok = [r for r, d in keyed if d]
        agree = sum(r["correct"] for r in dense_ok) / len(dense_ok) if dense_ok else None
        rows.append({"task": task, "algorithm": method, "budget": budget, "context_len": length, "n": len(rs),
                     "dense_correct": len(dense_ok), "agree_with_dense": agree,
                     "accuracy": sum(r["correct"] for r in rs) / len(rs)})
    rows.sort(key=lambda x: (GRID_TASKS.index(x["task"]) if x["task"] in GRID_TASKS else 99, x["context_len"],
                             x["algorithm"] != "dense", x["algorithm"], x["budget"] or 0))
    return rows


def format_rows(rows: Sequence[dict]) -> str:
    """A plain-text table of :func:`summarize`'s rows."""
    head = f"{'task':<12} {'len':>5} {'algorithm':<20} {'budget':>6} {'n':>4} {'dense ok':>8} {'agree':>6}"
    lines = [head, "-" * len(head)]
    for r in rows:
        agree = "-" if r["agree_with_dense"] is None else f"{r['agree_with_dense']:.2f}"
        budget = "-" if r["budget"] is None else f"{r['budget']:g}"
        lines.append(f"{r['task']:<12} {r['context_len']:>5} {r['algorithm']:<20} {budget:>6} {r['n']:>4} "
                     f"{r['dense_correct']:>8} {agree:>6}")
    return "\n".join(lines)


def _klabel(n: int) -> str:
    return f"{n / 1024:g}K"


def format_matrix(rows: Sequence[dict]) -> str:
    """Compact plain text: per task, a line per method x budget, a column per context length; cells
    ``agree_with_dense`` (dense line: ``dense_correct/n``)."""
    out = []
    for task in [t for t in GRID_TASKS if any(r["task"] == t for r in rows)]:
        rs = [r for r in rows if r["task"] == task]
        lengths = sorted({r["context_len"] for r in rs})
        methods = sorted({(r["algorithm"], r["budget"]) for r in rs}, key=lambda m: (m[0] != "dense", m[0], m[1] or 0))
        out.append(f"{task:<22}" + "".join(f"{_klabel(n):>8}" for n in lengths))
        for algo, b in methods:
            cells = _grid_cells(rs, algo, b, lengths)
            label = algo if b is None else f"{algo} @{b:g}"
            out.append(f"  {label:<20}" + "".join(f"{c:>8}" for c in cells))
    return "\n".join(out)


def _grid_cells(rows: Sequence[dict], algo: str, budget: float | None, lengths: Sequence[int]) -> list[str]:
    """One table row's cells, a column per context length: ``dense_correct/n`` on the dense row, else
    ``agree_with_dense``; ``-`` where there is no row or no agreement."""
    cells = []
    for n in lengths:
        r = next((x for x in rows if x["algorithm"] == algo and x["budget"] == budget and x["context_len"] == n), None)
        if r is None:
            cells.append("-")
        elif algo == "dense":
            cells.append(f"{r['dense_correct']}/{r['n']}")
        else:
            cells.append("-" if r["agree_with_dense"] is None else f"{r['agree_with_dense']:.2f}")
    return cells


def markdown_grid(rows: Sequence[dict], *, budget: float | None = None) -> str:
    """Markdown: one table per task, a row per method (x budget), a column per context length; cell
    ``agree_with_dense`` (and ``dense_correct``/``n`` on the dense row). ``budget``: only that budget."""
    out = []
    for task in [t for t in GRID_TASKS if any(r["task"] == t for r in rows)]:
        rs = [r for r in rows if r["task"] == task and (budget is None or r["budget"] in (None, budget))]
        lengths = sorted({r["context_len"] for r in rs})
        methods = sorted({(r["algorithm"], r["budget"]) for r in rs},
                         key=lambda m: (m[0] != "dense", m[0], m[1] or 0))
        out.append(f"**{task}** — dense row: prompts dense answers right / prompts; other rows: agreement with "
                   "dense (of the prompts dense answers right, the fraction the method answers right)\n")
        out.append("| method | budget | " + " | ".join(_klabel(n) for n in lengths) + " |")
        out.append("|---|---|" + "---|" * len(lengths))
        for algo, b in methods:
            cells = _grid_cells(rs, algo, b, lengths)
            out.append(f"| {algo} | {'-' if b is None else f'{b:g}'} | " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out)


def plot_grid(rows: Sequence[dict], path: Any) -> None:
    """Agreement with dense vs context length, one panel per task, a line per method x budget."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = [t for t in GRID_TASKS if any(r["task"] == t for r in rows)]
    fig, axes = plt.subplots(1, len(tasks), figsize=(5 * len(tasks), 4), squeeze=False)
    for ax, task in zip(axes[0], tasks, strict=True):
        rs = [r for r in rows if r["task"] == task and r["algorithm"] != "dense" and r["agree_with_dense"] is not None]
        for algo, b in sorted({(r["algorithm"], r["budget"]) for r in rs}, key=lambda m: (m[0], m[1] or 0)):
            pts = sorted((r["context_len"], r["agree_with_dense"]) for r in rs
                         if r["algorithm"] == algo and r["budget"] == b)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"{algo} @{b:g}")
        ax.axhline(0.95, color="grey", ls="--", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_title(task)
        ax.set_xlabel("context tokens")
        ax.set_ylabel("agreement with dense")
        ax.set_ylim(-0.02, 1.02)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
