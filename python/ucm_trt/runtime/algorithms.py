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

from ucm_trt.config import GSAOnDeviceConfig, KVStarConfig, ReRoPEConfig, SparseConfig
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

__all__ = ["ALGORITHMS", "POLICY_ALGORITHMS", "PREFILL_ALGORITHMS", "make_policy", "sparse_config_for"]

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

# representation / scoring each algorithm reads
_SCORING = {
    "dense": ("mean", "dot"),
    "esa": ("mean", "dot"),
    "gsa": ("mean", "dot"),
    "gsa-on-device": ("hash", "hamming"),
    "kvstar": ("subblock", "kvstar_vote"),
    "blend": ("mean", "dot"),  # Blend prefill, then the engine's (dense) policy decodes
    "rerope": ("mean", "dot"),
}


def sparse_config_for(algorithm: str, base: SparseConfig | None = None) -> SparseConfig:
    """``base`` (default ``SparseConfig()``) with the representation / scoring of ``algorithm``."""
    if algorithm not in ALGORITHMS:
        raise ValueError(f"algorithm must be one of {', '.join(ALGORITHMS)}; got {algorithm!r}")
    base = SparseConfig() if base is None else base
    rep, scoring = _SCORING[algorithm]
    return dataclasses.replace(base, representation=rep, scoring=scoring)


def make_policy(
    algorithm: str,
    *,
    kvstar: KVStarConfig | None = None,
    gsa_on_device: GSAOnDeviceConfig | None = None,
    rerope: ReRoPEConfig | None = None,
    retrieval: RetrievalConfig | None = None,
) -> Policy:
    """A fresh policy for ``algorithm`` (one of :data:`POLICY_ALGORITHMS`; ``blend`` is refused with
    a ValueError that says how to run it). ``retrieval``: the offload policies' (esa, gsa, kvstar)
    :class:`~ucm_trt.sparse.policies.RetrievalConfig` (representations on the host or the device,
    query drift); refused for the others."""
    if algorithm in PREFILL_ALGORITHMS:
        raise ValueError(_BLEND_IS_NO_POLICY)
    if algorithm not in POLICY_ALGORITHMS:
        raise ValueError(f"algorithm must be one of {', '.join(POLICY_ALGORITHMS)}; got {algorithm!r}")
    extra = {"kvstar": kvstar, "gsa_on_device": gsa_on_device, "rerope": rerope}
    wanted = {"kvstar": "kvstar", "gsa-on-device": "gsa_on_device", "rerope": "rerope"}.get(algorithm)
    for key, val in extra.items():
        if val is not None and key != wanted:
            raise ValueError(f"{key}= config given for algorithm {algorithm!r}, which does not use it")
    if retrieval is not None and algorithm not in ("esa", "gsa", "kvstar"):
        raise ValueError(f"retrieval= config given for algorithm {algorithm!r}; only esa, gsa and kvstar use it")
    if algorithm == "dense":
        return DensePolicy()
    if algorithm == "esa":
        return ESAPolicy(retrieval=retrieval)
    if algorithm == "gsa":
        return GSAPolicy(retrieval=retrieval)
    if algorithm == "gsa-on-device":
        return GSAOnDevicePolicy(gsa_on_device)
    if algorithm == "kvstar":
        return KVStarPolicy(kvstar, retrieval=retrieval)
    if rerope is None:
        raise ValueError("algorithm 'rerope' needs rerope=ReRoPEConfig(window=..., training_length=...)")
    return ReRoPEPolicy(rerope)
