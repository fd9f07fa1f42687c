"""Configuration of ucm-trt: frozen, keyword-only dataclasses.

Every class validates itself in ``__post_init__`` and raises ``ValueError`` or
``TypeError`` with a message that names the field, the value and the rule.
Configs are plain data: no environment variables are read here, and nothing
is mutated after construction (use :func:`dataclasses.replace`).

Classes
-------
Budget              how many blocks a selection keeps (top-k, ratio, score threshold, score mass)
SparseConfig        block size, sink/local windows, budget, representation, scoring, stride
ReRoPEConfig        ReRoPE window, training length, log-n scaling
KVStarConfig        KVStar channel pruning, token merge, multi-query voting stride
BlendConfig         CacheBlend chunk reuse and selective recompute
GSAOnDeviceConfig   hash bits, gates, rollback layers and layer reuse of GSA On-Device
DenseLayers         layers a sparse policy runs dense: fixed, and detected per request (diffuse layers)
AdaptiveBudget      widen a retrieval's budget, or go dense, where the selection misses attention mass
PrefillWindow       the prompt queries ESA's / GSA's first retrieval scores with (the question's tokens)
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

__all__ = [
    "Budget",
    "SparseConfig",
    "ReRoPEConfig",
    "KVStarConfig",
    "BlendConfig",
    "GSAOnDeviceConfig",
    "DenseLayers",
    "AdaptiveBudget",
    "PrefillWindow",
    "HeadMerge",
    "REPRESENTATIONS",
    "SCORINGS",
    "SCORING_REPRESENTATIONS",
]

Representation = Literal["mean", "minmax", "hash", "first", "weighted_mean", "subblock"]
Scoring = Literal["dot", "quest", "hamming", "kvstar_vote"]
SelectionMode = Literal["shared", "per_head"]
BudgetKind = Literal["top_k", "ratio", "threshold", "mass"]

REPRESENTATIONS: tuple[str, ...] = ("mean", "minmax", "hash", "first", "weighted_mean", "subblock")
SCORINGS: tuple[str, ...] = ("dot", "quest", "hamming", "kvstar_vote")
# Which block representations each scoring function reads.
SCORING_REPRESENTATIONS: Mapping[str, tuple[str, ...]] = {
    "dot": ("mean", "first", "weighted_mean"),
    "quest": ("minmax",),
    "hamming": ("hash",),
    "kvstar_vote": ("subblock",),
}


def _int(cls: str, name: str, value: Any, *, minimum: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{cls}.{name} must be an int, got {value!r} ({type(value).__name__})")
    if minimum is not None and value < minimum:
        raise ValueError(f"{cls}.{name} must be >= {minimum}, got {value}")


def _number(cls: str, name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{cls}.{name} must be a number, got {value!r} ({type(value).__name__})")
    if not math.isfinite(value):
        raise ValueError(f"{cls}.{name} must be finite, got {value}")


def _choice(cls: str, name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{cls}.{name} must be one of {', '.join(choices)}; got {value!r}")


def _unit_interval(cls: str, name: str, value: Any, *, open_low: bool = True) -> None:
    _number(cls, name, value)
    low_ok = value > 0 if open_low else value >= 0
    if not (low_ok and value <= 1):
        interval = "(0, 1]" if open_low else "[0, 1]"
        raise ValueError(f"{cls}.{name} must be in {interval}, got {value}")


@dataclass(frozen=True, kw_only=True)
class Budget:
    """How many candidate blocks a selection keeps, besides the forced windows.

    Build one with the class methods:

    - ``Budget.top_k(k)``: the ``k`` best-scoring candidate blocks;
    - ``Budget.ratio(r)``: ``floor(r * num_candidates)`` blocks (at least one when there are candidates),
      as upstream ESA's ``sparse_ratio``;
    - ``Budget.threshold(t)``: every candidate whose score is ``>= t`` (higher is better);
    - ``Budget.mass(m)``: adaptive — the smallest set of candidates whose softmax score mass
      covers ``m`` of the candidates' total.
    """

    kind: BudgetKind
    value: float

    def __post_init__(self) -> None:
        _choice("Budget", "kind", self.kind, ("top_k", "ratio", "threshold", "mass"))
        if self.kind == "top_k":
            _int("Budget", "value", self.value, minimum=1)
        elif self.kind in ("ratio", "mass"):
            _unit_interval("Budget", "value", self.value)
        else:
            _number("Budget", "value", self.value)

    @classmethod
    def top_k(cls, k: int) -> Budget:
        return cls(kind="top_k", value=k)

    @classmethod
    def ratio(cls, r: float) -> Budget:
        return cls(kind="ratio", value=r)

    @classmethod
    def threshold(cls, t: float) -> Budget:
        return cls(kind="threshold", value=t)

    @classmethod
    def mass(cls, m: float) -> Budget:
        return cls(kind="mass", value=m)

    def num_blocks(self, num_candidates: int) -> int | None:
        """Blocks kept out of ``num_candidates`` for the count-based kinds; ``None`` for
        score-dependent kinds (threshold, mass), which are resolved by the selector."""
        if self.kind == "top_k":
            return min(int(self.value), num_candidates)
        if self.kind == "ratio":
            if num_candidates == 0:
                return 0
            return max(1, min(num_candidates, int(math.floor(self.value * num_candidates + 1e-9))))
        return None


@dataclass(frozen=True, kw_only=True)
class SparseConfig:
    """Block-sparse attention settings shared by every UCM algorithm.

    Attributes
    ----------
    block_size:
        Tokens per KV block; a power of two (the kernels tile by it).
    sink_blocks:
        Leading blocks always selected (attention sinks; upstream ``init_window_sz``).
    local_blocks:
        Trailing blocks always selected, counting the partial last block (upstream
        ``local_window_sz``); at least 1 so the newest tokens are always visible.
    budget:
        How many of the remaining (candidate) blocks are selected.
    min_blocks:
        Sequences with fewer blocks than this run dense (upstream ``min_blocks``).
    representation:
        Block representation used for scoring: ``mean`` (ESA/GSA), ``minmax`` (Quest bound),
        ``hash`` (GSA On-Device), ``first`` (first token), ``weighted_mean`` (attention-weighted
        mean of K), ``subblock`` (KVStar channel-pruned merged tokens).
    scoring:
        ``dot`` (GQA-averaged query . representation), ``quest`` (upper bound over min/max),
        ``hamming`` (hash codes; smaller distance is better), ``kvstar_vote`` (softmax-mass voting).
    selection:
        ``shared`` (default): one selection for all KV heads (scores reduced over heads; upstream ESA /
        GSA); ``per_head``: each KV head selects its own blocks. Per head keeps the answer's block in
        more layers (docs/quality.md: 53/79 vs 38/65 layer-prompts where the oracle keeps it, and the
        ``make demo`` passkey that shared ESA loses; the chat and the demo use it), but the offload
        path then loads the union of the heads' blocks per layer (pool sizing, bytes moved).
    retrieval_stride:
        Decode steps between retrievals (upstream ``retrieval_stride``); 1 retrieves every step.
    """

    block_size: int = 128
    sink_blocks: int = 1
    local_blocks: int = 2
    budget: Budget = field(default_factory=lambda: Budget.ratio(0.25))
    min_blocks: int = 4
    representation: Representation = "mean"
    scoring: Scoring = "dot"
    selection: SelectionMode = "shared"
    retrieval_stride: int = 1

    def __post_init__(self) -> None:
        c = "SparseConfig"
        _int(c, "block_size", self.block_size, minimum=1)
        if self.block_size & (self.block_size - 1):
            raise ValueError(f"{c}.block_size must be a power of two, got {self.block_size}")
        _int(c, "sink_blocks", self.sink_blocks, minimum=0)
        _int(c, "local_blocks", self.local_blocks, minimum=1)
        if not isinstance(self.budget, Budget):
            raise TypeError(
                f"{c}.budget must be a Budget (e.g. Budget.ratio(0.25)), got {self.budget!r}"
            )
        _int(c, "min_blocks", self.min_blocks, minimum=1)
        _choice(c, "representation", self.representation, REPRESENTATIONS)
        _choice(c, "scoring", self.scoring, SCORINGS)
        _choice(c, "selection", self.selection, ("shared", "per_head"))
        _int(c, "retrieval_stride", self.retrieval_stride, minimum=1)
        allowed = SCORING_REPRESENTATIONS[self.scoring]
        if self.representation not in allowed:
            raise ValueError(
                f"{c}.scoring={self.scoring!r} reads representation(s) {', '.join(allowed)}; "
                f"got representation={self.representation!r}"
            )

    @property
    def forced_blocks(self) -> int:
        """Blocks always selected (sink + local) once a sequence is long enough."""
        return self.sink_blocks + self.local_blocks

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True, kw_only=True)
class ReRoPEConfig:
    """ReRoPE position extrapolation (Su, 2023), as upstream UCM's fused kernel.

    Inside ``window`` (query position minus key position < window) the logit uses the real
    relative position; outside it the relative position is clamped to ``window``.
    With ``logn`` the query is scaled by ``max(1, log(pos + 1) / log(training_length))``.
    """

    window: int
    training_length: int
    logn: bool = True

    def __post_init__(self) -> None:
        c = "ReRoPEConfig"
        _int(c, "window", self.window, minimum=1)
        _int(c, "training_length", self.training_length, minimum=2)
        if not isinstance(self.logn, bool):
            raise TypeError(f"{c}.logn must be a bool, got {self.logn!r}")
        if self.window > self.training_length:
            raise ValueError(
                f"{c}.window ({self.window}) must be <= training_length ({self.training_length}): "
                "positions inside the window must have been seen in training"
            )

    @property
    def logn_training_length(self) -> int | None:
        """The ``logn_training_length`` argument of the ReRoPE attention functions."""
        return self.training_length if self.logn else None


@dataclass(frozen=True, kw_only=True)
class KVStarConfig:
    """KVStar multi-step retrieval (upstream ``KVStarMultiStep``).

    Attributes
    ----------
    channel_ratio:
        Fraction of head-dim channels kept per KV head (largest mean |K|); upstream
        ``blk_repre_dim_prune_ratio`` (0.25). 1.0 keeps all channels. ``None`` (the default): the
        preset's where the policy comes from ``runtime.algorithms.make_policy``
        (``KVSTAR_CHANNEL_RATIO``: ``default`` 0.5, ``ucm`` 0.25), else upstream's 0.25
        (:attr:`kept_ratio`).
    token_merge:
        Consecutive tokens averaged into one sub-block representation (upstream
        ``blk_repre_inner_token_merge``); must divide the block size.
    retrieval_stride:
        Queries per vote and decode steps between retrievals (upstream 8). The selection
        computed from steps [1..R] is used in steps [2R+1..3R] (one-stride lag).
    """

    channel_ratio: float | None = None
    token_merge: int = 2
    retrieval_stride: int = 8

    #: upstream's channel ratio: what ``channel_ratio=None`` keeps outside a preset
    UPSTREAM_CHANNEL_RATIO: ClassVar[float] = 0.25

    def __post_init__(self) -> None:
        c = "KVStarConfig"
        if self.channel_ratio is not None:
            _unit_interval(c, "channel_ratio", self.channel_ratio)
        _int(c, "token_merge", self.token_merge, minimum=1)
        _int(c, "retrieval_stride", self.retrieval_stride, minimum=1)

    def check_block_size(self, block_size: int) -> None:
        if block_size % self.token_merge:
            raise ValueError(
                f"KVStarConfig.token_merge ({self.token_merge}) must divide block_size ({block_size})"
            )

    @property
    def kept_ratio(self) -> float:
        """The channel ratio in effect: :attr:`channel_ratio`, or upstream's 0.25 where it is ``None``."""
        return self.UPSTREAM_CHANNEL_RATIO if self.channel_ratio is None else self.channel_ratio

    def kept_channels(self, head_dim: int) -> int:
        return max(1, round(head_dim * self.kept_ratio))


@dataclass(frozen=True, kw_only=True)
class BlendConfig:
    """CacheBlend-style non-prefix KV reuse (upstream ``Blend``).

    Attributes
    ----------
    chunk_end_token_id:
        Token id that ends each reusable chunk (chunks are padded to a block boundary);
        ``None`` means chunk boundaries are given explicitly by the caller.
    recompute_layer:
        Layer at which the most-deviating tokens are chosen; every layer before it recomputes
        all tokens (upstream ``compute_meta``'s layer, 1 in the example).
    recompute_ratio:
        Fraction of reused tokens recomputed from ``recompute_layer`` on (upstream 0.2).
    min_reused_blocks:
        Below this many reused chunk blocks the request falls back to plain prefill
        (upstream ``min_blend_threshold`` = 16). The fallback is reported, never silent.
    """

    chunk_end_token_id: int | None = None
    recompute_layer: int = 1
    recompute_ratio: float = 0.2
    min_reused_blocks: int = 1

    def __post_init__(self) -> None:
        c = "BlendConfig"
        if self.chunk_end_token_id is not None:
            _int(c, "chunk_end_token_id", self.chunk_end_token_id, minimum=0)
        _int(c, "recompute_layer", self.recompute_layer, minimum=0)
        _unit_interval(c, "recompute_ratio", self.recompute_ratio, open_low=False)
        _int(c, "min_reused_blocks", self.min_reused_blocks, minimum=1)

    def check_num_layers(self, num_layers: int) -> None:
        if self.recompute_layer >= num_layers:
            raise ValueError(
                f"BlendConfig.recompute_layer must be < num_layers ({num_layers}), "
                f"got {self.recompute_layer}"
            )


@dataclass(frozen=True, kw_only=True)
class GSAOnDeviceConfig:
    """GSA On-Device: hash codes of K, Hamming block scores and top-k on the GPU (HATA-style).

    Attributes
    ----------
    hash_bits:
        Bits per hash code; a multiple of 8 (packed into uint8). ``None``: ``hash_bits_per_dim`` x head_dim.
    hash_bits_per_dim:
        With ``hash_bits=None``, the code has this many bits per head-dim channel. ``None`` = 1 (head_dim bits,
        as upstream); :func:`ucm_trt.runtime.algorithms.make_policy` fills it from its preset (``default``: 4,
        chosen on tuning prompts, docs/quality.md; ``ucm``: 1). Random projections need more bits than trained
        ones (upstream's HATA weights) to rank blocks alike: more bits cost code memory and retrieval bytes
        (4 x head_dim bits: 1/8 of a token's K+V in fp16/bf16, against 1/32).
    top_k_tokens:
        Tokens kept per sequence (sink + local + selected), upstream ``vllm_hash_attention_topk``.
    seq_len_threshold, concurrency_threshold:
        Sparse decode is enabled for a step only when at least ``concurrency_threshold``
        sequences have ``seq_len >= seq_len_threshold`` (upstream gate).
    rollback_layers:
        Layers that always run dense.
    layer_reuse:
        ``{layer: source_layer}``: the layer reuses ``source_layer``'s selection instead of
        hashing (upstream skip layers); the source must be an earlier computing layer.
    hash_seed:
        Seed of the random orthogonal projection (``hash_weights_path`` overrides it).
    hash_weights_path:
        Optional ``.pt``/``.safetensors`` file with trained projection weights per layer.
    """

    hash_bits: int | None = None
    hash_bits_per_dim: int | None = None
    top_k_tokens: int = 2048
    seq_len_threshold: int = 2048
    concurrency_threshold: int = 1
    rollback_layers: tuple[int, ...] = ()
    layer_reuse: Mapping[int, int] = field(default_factory=dict)
    hash_seed: int = 0
    hash_weights_path: str | None = None

    def __post_init__(self) -> None:
        c = "GSAOnDeviceConfig"
        if self.hash_bits is not None:
            _int(c, "hash_bits", self.hash_bits, minimum=8)
            if self.hash_bits % 8:
                raise ValueError(f"{c}.hash_bits must be a multiple of 8, got {self.hash_bits}")
        if self.hash_bits_per_dim is not None:
            _int(c, "hash_bits_per_dim", self.hash_bits_per_dim, minimum=1)
            if self.hash_bits is not None:
                raise ValueError(f"{c}: give hash_bits ({self.hash_bits}) or hash_bits_per_dim "
                                 f"({self.hash_bits_per_dim}), not both")
        _int(c, "top_k_tokens", self.top_k_tokens, minimum=1)
        _int(c, "seq_len_threshold", self.seq_len_threshold, minimum=0)
        _int(c, "concurrency_threshold", self.concurrency_threshold, minimum=1)
        if not isinstance(self.rollback_layers, tuple):
            raise TypeError(f"{c}.rollback_layers must be a tuple of ints, got {self.rollback_layers!r}")
        for layer in self.rollback_layers:
            _int(c, "rollback_layers[...]", layer, minimum=0)
        if len(set(self.rollback_layers)) != len(self.rollback_layers):
            raise ValueError(f"{c}.rollback_layers must not repeat a layer, got {self.rollback_layers}")
        if not isinstance(self.layer_reuse, Mapping):
            raise TypeError(f"{c}.layer_reuse must be a mapping layer -> source layer, got {self.layer_reuse!r}")
        # Freeze the mapping so the config stays immutable and hashable by value.
        object.__setattr__(self, "layer_reuse", dict(sorted(self.layer_reuse.items())))
        for layer, src in self.layer_reuse.items():
            _int(c, "layer_reuse key", layer, minimum=0)
            _int(c, "layer_reuse value", src, minimum=0)
            if src >= layer:
                raise ValueError(
                    f"{c}.layer_reuse[{layer}] = {src}: a layer may only reuse an earlier layer"
                )
            if src in self.layer_reuse:
                raise ValueError(
                    f"{c}.layer_reuse[{layer}] = {src}: layer {src} itself reuses layer "
                    f"{self.layer_reuse[src]}; point at a computing layer"
                )
            if layer in self.rollback_layers or src in self.rollback_layers:
                raise ValueError(
                    f"{c}.layer_reuse[{layer}] = {src}: rollback (dense) layers neither reuse "
                    "nor provide selections"
                )
        _int(c, "hash_seed", self.hash_seed, minimum=0)
        if self.hash_weights_path is not None and not isinstance(self.hash_weights_path, str):
            raise TypeError(f"{c}.hash_weights_path must be a str path, got {self.hash_weights_path!r}")

    def resolved_hash_bits(self, head_dim: int) -> int:
        if self.hash_bits is not None:
            return self.hash_bits
        return head_dim * (self.hash_bits_per_dim or 1)  # GSAOnDevicePolicy.bind refuses a width not in bytes

    def check_num_layers(self, num_layers: int) -> None:
        for layer in (*self.rollback_layers, *self.layer_reuse):
            if layer >= num_layers:
                raise ValueError(
                    f"GSAOnDeviceConfig names layer {layer}, but the model has {num_layers} layers"
                )

    def gate_open(self, seq_lens: list[int] | tuple[int, ...]) -> bool:
        """Whether sparse decode runs this step (upstream's batch-level gate)."""
        long_enough = sum(1 for n in seq_lens if n >= self.seq_len_threshold)
        return long_enough >= self.concurrency_threshold


@dataclass(frozen=True, kw_only=True)
class DenseLayers:
    """Layers a sparse policy runs dense (upstream "rollback layers"), fixed and/or detected.

    Attributes
    ----------
    layers:
        Layers that always run dense.
    auto:
        Detect diffuse layers per request at the end of its prefill, from the prefill's own
        attention: for each layer, the attention of the prompt's last queries (the ones the policy
        receives, :attr:`Policy.query_window`) over the prompt, and the mass the *oracle* selection
        (the true top blocks) keeps at the policy's budget. A layer where even the oracle keeps less
        than ``threshold`` cannot be served by any block selection at that budget: it runs dense
        for that request (:func:`ucm_trt.sparse.dense_layers.detect_dense_layers`).
    threshold:
        Oracle attention-mass recall below which a layer is diffuse, in [0, 1].
    """

    layers: tuple[int, ...] = ()
    auto: bool = False
    threshold: float = 0.8

    def __post_init__(self) -> None:
        c = "DenseLayers"
        if not isinstance(self.layers, tuple):
            raise TypeError(f"{c}.layers must be a tuple of ints, got {self.layers!r}")
        for layer in self.layers:
            _int(c, "layers[...]", layer, minimum=0)
        if len(set(self.layers)) != len(self.layers):
            raise ValueError(f"{c}.layers must not repeat a layer, got {self.layers}")
        if not isinstance(self.auto, bool):
            raise TypeError(f"{c}.auto must be a bool, got {self.auto!r}")
        _unit_interval(c, "threshold", self.threshold, open_low=False)

    def check_num_layers(self, num_layers: int) -> None:
        for layer in self.layers:
            if layer >= num_layers:
                raise ValueError(f"DenseLayers.layers names layer {layer}, but the model has {num_layers} layers")


@dataclass(frozen=True, kw_only=True)
class AdaptiveBudget:
    """Widen a retrieval's budget where the selection is estimated to miss attention mass.

    At every retrieval (CPU policies: ESA, GSA), per layer and KV head, the block scores are read
    as logit estimates (mean K: the mean logit; min / max K: the Quest upper bound) scaled by
    ``1/sqrt(head_dim)``; the estimated mass outside the selection is ``sum_unselected n_b e^{s_b} /
    sum_all n_b e^{s_b}`` (``n_b`` tokens per block; the forced windows count as selected). Where
    it exceeds ``max_missed``, the selection grows by the best remaining blocks until the estimate
    is at most ``max_missed``, up to ``max_ratio`` of the candidates; a layer that would need more
    than that runs dense for that retrieval (``dense_fallback``) or keeps ``max_ratio``.
    """

    max_missed: float = 0.1
    max_ratio: float = 0.5
    dense_fallback: bool = True

    def __post_init__(self) -> None:
        c = "AdaptiveBudget"
        _unit_interval(c, "max_missed", self.max_missed)
        _unit_interval(c, "max_ratio", self.max_ratio)
        if not isinstance(self.dense_fallback, bool):
            raise TypeError(f"{c}.dense_fallback must be a bool, got {self.dense_fallback!r}")


@dataclass(frozen=True, kw_only=True)
class PrefillWindow:
    """The prompt queries the first retrieval of ESA / GSA scores the blocks with (at prefill end).

    The question sits at the end of the prompt: its tokens' queries are what point at the needle,
    while the last token alone (upstream: ``tokens=1``) often attends elsewhere (SnapKV / ShadowKV use
    an observation window of the last 16-64 prompt queries for the same reason). The first retrieval
    scores every block with each of the last ``tokens`` prompt queries (the policy's own scoring, e.g.
    the per-head softmax vote) and combines the per-query scores with ``reduce``: ``mean`` (every
    query one unit of vote) or ``max`` (a block scores its best query). Later retrievals score with
    their decode step's query, plus ``persist`` times the first retrieval's scores (0: as before).

    Attributes
    ----------
    tokens:
        Prompt queries (the last ones) the first retrieval scores with; >= 1. The runtime must return
        that many (``Policy.query_window``): the PyTorch backend returns any number, a rewritten graph
        the number it was rewritten for (``RewriteConfig.query_window``).
    reduce:
        ``mean`` or ``max`` over the window's per-query block scores.
    persist:
        Weight, >= 0, of the window's block scores in every later retrieval of the request: a decode
        retrieval scores ``own + persist * window`` (the question keeps pulling its blocks in while the
        answer is generated one token at a time; the budget is unchanged). 0: the first retrieval only.
    """

    tokens: int = 1
    reduce: Literal["mean", "max"] = "mean"
    persist: float = 0.0

    def __post_init__(self) -> None:
        c = "PrefillWindow"
        _int(c, "tokens", self.tokens, minimum=1)
        _choice(c, "reduce", self.reduce, ("mean", "max"))
        _number(c, "persist", self.persist)
        if self.persist < 0:
            raise ValueError(f"{c}.persist must be >= 0, got {self.persist}")


@dataclass(frozen=True, kw_only=True)
class HeadMerge:
    """What each KV head attends of a per-KV-head retrieval (ESA, GSA, KVStar with
    ``SparseConfig(selection="per_head")``; a shared selection is the same for every head already).

    Per-head top-k lets every KV head keep its own best blocks; the offload path then loads, per
    layer, the *union* of the heads' blocks (a block holds every head's K/V). ``own``: each head attends
    its own blocks only (upstream's per-head behaviour). ``union``: each head attends every block any
    head of the layer selected -- the blocks already loaded, so no extra host-to-device bytes, only
    more attention reads (at most ``num_kv_heads`` times a head's own). On SmolLM2 the heads that copy
    the key (retrieval heads) often miss the needle's block that another head of the same layer kept
    (docs/quality.md, "Selected and still wrong").

    Attributes
    ----------
    mode:
        ``"own"`` or ``"union"``.
    """

    mode: Literal["own", "union"] = "own"

    def __post_init__(self) -> None:
        _choice("HeadMerge", "mode", self.mode, ("own", "union"))
