"""Algorithm names -> policies and the SparseConfig each one scores with (used by ``ucm-trt run``)."""

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
)

__all__ = ["ALGORITHMS", "make_policy", "sparse_config_for"]

ALGORITHMS: tuple[str, ...] = ("dense", "esa", "gsa", "gsa-on-device", "kvstar", "rerope")

# representation / scoring each algorithm reads
_SCORING = {
    "dense": ("mean", "dot"),
    "esa": ("mean", "dot"),
    "gsa": ("mean", "dot"),
    "gsa-on-device": ("hash", "hamming"),
    "kvstar": ("subblock", "kvstar_vote"),
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
) -> Policy:
    """A fresh policy for ``algorithm`` (one of :data:`ALGORITHMS`)."""
    if algorithm not in ALGORITHMS:
        raise ValueError(f"algorithm must be one of {', '.join(ALGORITHMS)}; got {algorithm!r}")
    extra = {"kvstar": kvstar, "gsa_on_device": gsa_on_device, "rerope": rerope}
    wanted = {"kvstar": "kvstar", "gsa-on-device": "gsa_on_device", "rerope": "rerope"}.get(algorithm)
    for key, val in extra.items():
        if val is not None and key != wanted:
            raise ValueError(f"{key}= config given for algorithm {algorithm!r}, which does not use it")
    if algorithm == "dense":
        return DensePolicy()
    if algorithm == "esa":
        return ESAPolicy()
    if algorithm == "gsa":
        return GSAPolicy()
    if algorithm == "gsa-on-device":
        return GSAOnDevicePolicy(gsa_on_device)
    if algorithm == "kvstar":
        return KVStarPolicy(kvstar)
    if rerope is None:
        raise ValueError("algorithm 'rerope' needs rerope=ReRoPEConfig(window=..., training_length=...)")
    return ReRoPEPolicy(rerope)
