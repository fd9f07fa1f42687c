"""Policies and the SparseConfig each algorithm scores with (used by ``ucm-trt run``, the chat, the eval).

The algorithms themselves -- names, policy classes, representation / scoring, capabilities -- are
declared once, in :mod:`ucm_trt.algorithms` (the registry); this module builds from it.
:data:`ALGORITHMS` is the registry's names. All but ``blend`` are per-step policies
(:data:`POLICY_ALGORITHMS`, built by :func:`make_policy`). ``blend`` is a prefill method, not a
policy (:class:`ucm_trt.runtime.blend.BlendRunner` over an engine whose policy decodes, e.g.
``dense``), so :func:`make_policy` refuses it with a message saying how to run it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from types import MappingProxyType

from ucm_trt import algorithms as registry
from ucm_trt.config import (
    AdaptiveBudget,
    DenseLayers,
    GSAOnDeviceConfig,
    HeadMerge,
    KVStarConfig,
    PrefillWindow,
    ReRoPEConfig,
    SparseConfig,
)
from ucm_trt.sparse.policies import Policy, RetrievalConfig

__all__ = [
    "ALGORITHMS",
    "POLICY_ALGORITHMS",
    "PREFILL_ALGORITHMS",
    "PRESETS",
    "GSA_ON_DEVICE_HASH_BITS_PER_DIM",
    "KVSTAR_CHANNEL_RATIO",
    "default_dense_layers",
    "default_head_merge",
    "grid_gsa_on_device_config",
    "gsa_on_device_for_preset",
    "kvstar_for_preset",
    "make_policy",
    "sparse_config_for",
]

ALGORITHMS: tuple[str, ...] = registry.names()
#: the prefill methods: they run through their own runner, not as an engine policy
PREFILL_ALGORITHMS: tuple[str, ...] = registry.names("prefill")
#: the per-step policies :func:`make_policy` builds (what an engine, the chat and the eval can run)
POLICY_ALGORITHMS: tuple[str, ...] = registry.names("policy")

#: named settings: ``default`` (ucm-trt's, chosen from the retrieval grids, docs/quality.md) and
#: ``ucm`` (upstream UCM's representations and scoring, to reproduce upstream behaviour)
PRESETS: tuple[str, ...] = ("default", "ucm")

#: ucm-trt's default: diffuse layers detected per request at prefill end (oracle recall at the
#: budget below the threshold) run dense. Upstream (``ucm``) has no automatic dense layers.
DEFAULT_DENSE_LAYERS = DenseLayers(auto=True, threshold=0.7)


#: the first retrieval's prompt queries of ESA / GSA under the ``default`` preset (docs/quality.md: chosen
#: on a tuning set of grid prompts, seed 1, separate from the reported ones)
DEFAULT_PREFILL_WINDOW = PrefillWindow(tokens=8, reduce="max")

#: ESA / GSA block scoring per preset (docs/quality.md): ``default`` keeps the mean K of every 8 tokens,
#: scores a block by the per-head softmax vote over those sub-blocks and makes the first selection from
#: the last :data:`DEFAULT_PREFILL_WINDOW` prompt queries; ``ucm`` is upstream's one mean per block scored
#: with the group-averaged query, the first selection from the last prompt query (the algorithms whose
#: spec has ``preset_scoring``)
BLOCK_SCORING: Mapping[str, Mapping[str, object]] = MappingProxyType({
    "default": MappingProxyType({"vote": True, "sub_block_tokens": 8, "prefill_window": DEFAULT_PREFILL_WINDOW}),
    "ucm": MappingProxyType({"vote": False, "sub_block_tokens": None, "prefill_window": PrefillWindow()}),
})

#: what each KV head of a per-head retrieval attends (esa, gsa, kvstar; :class:`HeadMerge`) per preset:
#: ``default`` the union of its layer's heads' blocks (docs/quality.md: chosen on tuning prompts, seed 1,
#: reported on seed 0); ``ucm`` each head its own (upstream's per-head top-k; upstream selects shared anyway)
DEFAULT_HEAD_MERGE = HeadMerge(mode="union")
HEAD_MERGE: Mapping[str, HeadMerge] = MappingProxyType({"default": DEFAULT_HEAD_MERGE, "ucm": HeadMerge()})
#: the algorithms whose heads keep their own blocks under every preset unless ``head_merge`` says otherwise:
#: GSA On-Device's union (session 12, seed 0, 1K + 2K, 1/8) kept 23 of dense's 28 answers against 22 for its
#: own selections, 3 answers won and 2 lost: no evidence worth the blocks it adds (docs/quality.md)
HEAD_MERGE_OWN: frozenset[str] = frozenset({"gsa-on-device"})


def default_head_merge(algorithm: str, preset: str = "default") -> HeadMerge:
    """The :class:`HeadMerge` ``make_policy`` gives ``algorithm`` under ``preset`` when none is given:
    :data:`HEAD_MERGE` of the preset, or each head its own for the algorithms in :data:`HEAD_MERGE_OWN`."""
    return HeadMerge() if algorithm in HEAD_MERGE_OWN else HEAD_MERGE[_check_preset(preset)]


#: GSA On-Device's hash bits per head-dim channel when its config leaves them open
#: (``GSAOnDeviceConfig.hash_bits_per_dim=None``), per preset: ``default`` 4 (chosen on tuning prompts,
#: docs/quality.md), ``ucm`` 1 (head_dim bits, upstream's)
GSA_ON_DEVICE_HASH_BITS_PER_DIM: Mapping[str, int] = MappingProxyType({"default": 4, "ucm": 1})


#: KVStar's channel ratio when its config leaves it open (``KVStarConfig.channel_ratio=None``), per preset:
#: ``default`` 0.5 (chosen on tuning prompts: 25 of dense's 29 answers vs 20 at 0.25 and 26 at 1.0, docs/quality.md),
#: ``ucm`` 0.25 (upstream's ``blk_repre_dim_prune_ratio``)
KVSTAR_CHANNEL_RATIO: Mapping[str, float] = MappingProxyType({"default": 0.5, "ucm": 0.25})


def kvstar_for_preset(config: KVStarConfig | None, preset: str = "default") -> KVStarConfig:
    """``config`` (default: ``KVStarConfig()``) with the channel ratio ``preset`` gives where it leaves it open."""
    _check_preset(preset)
    if config is None:
        config = KVStarConfig()
    if not isinstance(config, KVStarConfig):
        raise TypeError(f"kvstar must be a KVStarConfig, got {type(config).__name__}")
    if config.channel_ratio is None:
        config = dataclasses.replace(config, channel_ratio=KVSTAR_CHANNEL_RATIO[preset])
    return config


def gsa_on_device_for_preset(config: GSAOnDeviceConfig | None, preset: str = "default") -> GSAOnDeviceConfig:
    """``config`` (default: ``GSAOnDeviceConfig()``) with the hash width ``preset`` gives where it leaves it
    open (neither ``hash_bits`` nor ``hash_bits_per_dim`` set)."""
    _check_preset(preset)
    if config is None:
        config = GSAOnDeviceConfig()
    if not isinstance(config, GSAOnDeviceConfig):
        raise TypeError(f"gsa_on_device must be a GSAOnDeviceConfig, got {type(config).__name__}")
    if config.hash_bits is None and config.hash_bits_per_dim is None:
        config = dataclasses.replace(config, hash_bits_per_dim=GSA_ON_DEVICE_HASH_BITS_PER_DIM[preset])
    return config


def default_dense_layers(preset: str = "default") -> DenseLayers:
    """The :class:`DenseLayers` rule a policy gets under ``preset`` when none is given."""
    return DEFAULT_DENSE_LAYERS if _check_preset(preset) == "default" else DenseLayers()


def _check_preset(preset: object) -> str:
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {', '.join(PRESETS)}; got {preset!r}")
    return preset  # type: ignore[return-value]


def sparse_config_for(algorithm: str, base: SparseConfig | None = None, *, preset: str = "default") -> SparseConfig:
    """``base`` (default ``SparseConfig()``) with the representation / scoring of ``algorithm`` under
    ``preset`` (:data:`PRESETS`): ``ucm`` also sets upstream's shared selection; ``default`` keeps
    ``base.selection`` (``SparseConfig``'s default is shared; the chat, ``make demo`` and the retrieval
    grid pass ``per_head``)."""
    spec = registry.get(algorithm)
    _check_preset(preset)
    base = SparseConfig() if base is None else base
    rep, scoring = spec.representation, spec.scoring  # both presets read the same representations
    if preset == "ucm":
        # upstream ESA / GSA reduce the scores over the KV heads (one selection for all heads)
        return dataclasses.replace(base, representation=rep, scoring=scoring, selection="shared")
    return dataclasses.replace(base, representation=rep, scoring=scoring)


def grid_gsa_on_device_config(sparse: SparseConfig, prompt_len: int, *, preset: str = "default",
                              **overrides) -> GSAOnDeviceConfig:
    """A :class:`GSAOnDeviceConfig` keeping as many blocks as ``sparse.budget`` keeps of a ``prompt_len``
    prompt (``top_k_tokens`` = forced windows + budget blocks), gate open (``seq_len_threshold=0``)."""
    _check_preset(preset)
    if isinstance(prompt_len, bool) or not isinstance(prompt_len, int) or prompt_len < 1:
        raise ValueError(f"prompt_len must be an int >= 1, got {prompt_len!r}")
    bs, forced = sparse.block_size, sparse.forced_blocks
    candidates = max(0, -(-prompt_len // bs) - forced)
    keep = max(1, sparse.budget.num_blocks(candidates) or 1)
    kw = {"top_k_tokens": (forced + keep) * bs, "seq_len_threshold": 0, **overrides}
    return gsa_on_device_for_preset(GSAOnDeviceConfig(**kw), preset)


def make_policy(
    algorithm: str,
    *,
    preset: str = "default",
    kvstar: KVStarConfig | None = None,
    gsa_on_device: GSAOnDeviceConfig | None = None,
    rerope: ReRoPEConfig | None = None,
    dense_layers: DenseLayers | None = None,
    adaptive: AdaptiveBudget | None = None,
    retrieval: RetrievalConfig | None = None,
    prefill_window: PrefillWindow | None = None,
    head_merge: HeadMerge | None = None,
) -> Policy:
    """A fresh policy for ``algorithm`` (one of :data:`POLICY_ALGORITHMS`; ``blend`` is refused with
    a ValueError that says how to run it), with ``preset``'s settings (:data:`PRESETS`). ``retrieval``:
    the offload policies' (esa, gsa, kvstar) :class:`~ucm_trt.sparse.policies.RetrievalConfig`
    (representations on the host or the device, query drift); refused for the others.

    ``dense_layers``: the layers the sparse policies (esa, gsa, gsa-on-device, kvstar) run dense;
    default :func:`default_dense_layers` of ``preset`` (``default``: detected per request).
    ``adaptive``: an adaptive budget for the CPU-scored policies (esa, gsa); default off.
    ESA / GSA score as :data:`BLOCK_SCORING` of ``preset`` says, except that a ``retrieval`` with
    ``query_drift`` (the speed benchmarks' synthetic drift, calibrated on block means) keeps one mean
    per block. ``prefill_window``: the prompt queries ESA's / GSA's first retrieval scores with (default:
    the preset's, :data:`BLOCK_SCORING`); a graph backend's model must return that many
    (``RewriteConfig.query_window``, default 64). ``head_merge``: what each KV head of esa's / gsa's /
    gsa-on-device's / kvstar's per-head selections attends (default: :func:`default_head_merge`)."""
    _check_preset(preset)
    given = {"kvstar=": kvstar, "gsa_on_device=": gsa_on_device, "rerope=": rerope, "retrieval=": retrieval,
             "dense_layers=": dense_layers, "adaptive=": adaptive, "prefill_window=": prefill_window,
             "head_merge=": head_merge}
    spec = registry.check_options(algorithm, [k for k, v in given.items() if v is not None])
    if rerope is not None and not isinstance(rerope, ReRoPEConfig):
        raise TypeError(f"rerope must be a ReRoPEConfig, got {type(rerope).__name__}")
    cls = spec.load()
    if algorithm == "dense":
        return cls()
    if algorithm == "rerope":
        return cls(rerope)
    rule = default_dense_layers(preset) if dense_layers is None else dense_layers
    kwargs = {"dense_layers": rule}
    if "retrieval=" in spec.options:
        kwargs["retrieval"] = retrieval
    if "adaptive=" in spec.options:
        kwargs["adaptive"] = adaptive
    if "head_merge=" in spec.options:
        kwargs["head_merge"] = default_head_merge(algorithm, preset) if head_merge is None else head_merge
    if spec.preset_scoring:
        kwargs.update(BLOCK_SCORING[preset])
        if retrieval is not None and getattr(retrieval, "query_drift", None) is not None:
            # the synthetic query drift of the speed benchmarks is calibrated on one mean per block
            kwargs["sub_block_tokens"] = None
        if prefill_window is not None:
            kwargs["prefill_window"] = prefill_window

    if algorithm == "gsa-on-device":
        gsa_on_device = gsa_on_device_for_preset(gsa_on_device, preset)
    if algorithm == "kvstar":
        kvstar = kvstar_for_preset(kvstar, preset)
    config = {"kvstar": kvstar, "gsa-on-device": gsa_on_device}
    policy = cls(config[algorithm], **kwargs) if algorithm in config else cls(**kwargs)
    if rerope is not None:
        # the pool holds un-rotated K and the queries the policy sees are un-rotated too: the
        # selection scores content (no position), attention is ReRoPE over the selected blocks
        policy.rerope = rerope
    return policy
