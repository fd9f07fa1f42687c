"""Algorithm names -> policies and the SparseConfig each one scores with (used by ``ucm-trt run``).

:data:`ALGORITHMS` names every UCM algorithm of the runtime, the same list as
``ucm_trt.graph.driver.ALGORITHMS`` and ``ucm-trt run --algorithm``. All but ``blend`` are per-step
policies (:data:`POLICY_ALGORITHMS`, built by :func:`make_policy`). ``blend`` is a prefill method,
not a policy: it reuses the KV of document chunks cached by earlier requests
(:class:`ucm_trt.runtime.blend.BlendRunner` over an engine whose policy decodes, e.g. ``dense``),
so :func:`make_policy` refuses it with a message saying how to run it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from types import MappingProxyType

from ucm_trt.config import (
    AdaptiveBudget,
    DenseLayers,
    GSAOnDeviceConfig,
    KVStarConfig,
    ReRoPEConfig,
    SparseConfig,
)
from ucm_trt.sparse.policies import (
    DensePolicy,
    ESAPolicy,
    GSAOnDevicePolicy,
    GSAPolicy,
    KVStarPolicy,
    Policy,
    ReRoPEPolicy,
    RetrievalConfig,
)

__all__ = [
    "ALGORITHMS",
    "POLICY_ALGORITHMS",
    "PREFILL_ALGORITHMS",
    "PRESETS",
    "default_dense_layers",
    "grid_gsa_on_device_config",
    "make_policy",
    "sparse_config_for",
]

ALGORITHMS: tuple[str, ...] = ("dense", "esa", "gsa", "gsa-on-device", "kvstar", "blend", "rerope")
#: the prefill methods: they run through their own runner, not as an engine policy
PREFILL_ALGORITHMS: tuple[str, ...] = ("blend",)
#: the per-step policies :func:`make_policy` builds (what an engine, the chat and the eval can run)
POLICY_ALGORITHMS: tuple[str, ...] = tuple(a for a in ALGORITHMS if a not in PREFILL_ALGORITHMS)

_BLEND_IS_NO_POLICY = (
    "algorithm 'blend' is not a per-step policy but a prefill method (it reuses the KV of cached document "
    "chunks); build the engine with a policy that decodes, e.g. make_policy('dense'), and run the request "
    "through ucm_trt.runtime.blend.BlendRunner(engine, BlendConfig(...)), as `ucm-trt run --algorithm blend` does"
)

#: named settings: ``default`` (ucm-trt's, chosen from the retrieval grids, docs/quality.md) and
#: ``ucm`` (upstream UCM's representations and scoring, to reproduce upstream behaviour)
PRESETS: tuple[str, ...] = ("default", "ucm")

# representation / scoring each algorithm reads (upstream UCM's, both presets)
_SCORING = {
    "dense": ("mean", "dot"),
    "esa": ("mean", "dot"),
    "gsa": ("mean", "dot"),
    "gsa-on-device": ("hash", "hamming"),
    "kvstar": ("subblock", "kvstar_vote"),
    "blend": ("mean", "dot"),  # Blend prefill, then the engine's (dense) policy decodes
    "rerope": ("mean", "dot"),
}

# block-selecting policies that also run with ReRoPE attention (make_policy(..., rerope=...))
_REROPE_SPARSE = ("esa", "gsa", "gsa-on-device", "kvstar")

#: ucm-trt's default: diffuse layers detected per request at prefill end (oracle recall at the
#: budget below the threshold) run dense. Upstream (``ucm``) has no automatic dense layers.
DEFAULT_DENSE_LAYERS = DenseLayers(auto=True, threshold=0.7)

#: ESA / GSA block scoring per preset (docs/quality.md): ``default`` keeps the mean K of every 8 tokens
#: and scores a block by the per-head softmax vote over those sub-blocks; ``ucm`` is upstream's one mean
#: per block scored with the group-averaged query
BLOCK_SCORING: Mapping[str, Mapping[str, object]] = MappingProxyType({
    "default": MappingProxyType({"vote": True, "sub_block_tokens": 8}),
    "ucm": MappingProxyType({"vote": False, "sub_block_tokens": None}),
})


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
    if algorithm not in ALGORITHMS:
        raise ValueError(f"algorithm must be one of {', '.join(ALGORITHMS)}; got {algorithm!r}")
    _check_preset(preset)
    base = SparseConfig() if base is None else base
    rep, scoring = _SCORING[algorithm]  # both presets read the same representations
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
    return GSAOnDeviceConfig(**kw)


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
    per block."""
    _check_preset(preset)
    if algorithm in PREFILL_ALGORITHMS:
        raise ValueError(_BLEND_IS_NO_POLICY)
    if algorithm not in POLICY_ALGORITHMS:
        raise ValueError(f"algorithm must be one of {', '.join(POLICY_ALGORITHMS)}; got {algorithm!r}")
    extra = {"kvstar": kvstar, "gsa_on_device": gsa_on_device, "rerope": rerope}
    wanted = {"kvstar": "kvstar", "gsa-on-device": "gsa_on_device", "rerope": "rerope"}.get(algorithm)
    for key, val in extra.items():
        # rerope= also combines with the block-selecting policies: ReRoPE attention over their selection
        if val is not None and key != wanted and not (key == "rerope" and algorithm in _REROPE_SPARSE):
            raise ValueError(f"{key}= config given for algorithm {algorithm!r}, which does not use it")
    if retrieval is not None and algorithm not in ("esa", "gsa", "kvstar"):
        raise ValueError(f"retrieval= config given for algorithm {algorithm!r}; only esa, gsa and kvstar use it")
    sparse_algo = algorithm in ("esa", "gsa", "gsa-on-device", "kvstar")
    if dense_layers is not None and not sparse_algo:
        raise ValueError(f"dense_layers= given for algorithm {algorithm!r}, which runs every layer dense already")
    if adaptive is not None and algorithm not in ("esa", "gsa"):
        raise ValueError(f"adaptive= is implemented for esa and gsa (their block scores are logit estimates); "
                         f"got algorithm {algorithm!r}")
    rule = default_dense_layers(preset) if dense_layers is None else dense_layers
    if algorithm == "dense":
        return DensePolicy()
    policy: Policy | None = None
    scoring = dict(BLOCK_SCORING[preset])
    if retrieval is not None and getattr(retrieval, "query_drift", None) is not None:
        # the synthetic query drift of the speed benchmarks is calibrated on one mean per block
        scoring["sub_block_tokens"] = None
    if algorithm == "esa":
        policy = ESAPolicy(dense_layers=rule, adaptive=adaptive, retrieval=retrieval, **scoring)
    elif algorithm == "gsa":
        policy = GSAPolicy(dense_layers=rule, adaptive=adaptive, retrieval=retrieval, **scoring)
    elif algorithm == "gsa-on-device":
        policy = GSAOnDevicePolicy(gsa_on_device, dense_layers=rule)
    elif algorithm == "kvstar":
        policy = KVStarPolicy(kvstar, dense_layers=rule, retrieval=retrieval)
    if policy is not None:
        if rerope is not None:
            if not isinstance(rerope, ReRoPEConfig):
                raise TypeError(f"rerope must be a ReRoPEConfig, got {type(rerope).__name__}")
            # the pool holds un-rotated K and the queries the policy sees are un-rotated too: the
            # selection scores content (no position), attention is ReRoPE over the selected blocks
            policy.rerope = rerope
        return policy
    if rerope is None:
        raise ValueError("algorithm 'rerope' needs rerope=ReRoPEConfig(window=..., training_length=...)")
    return ReRoPEPolicy(rerope)
