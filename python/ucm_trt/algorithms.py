"""The algorithm registry: every UCM algorithm, what builds it, what it scores with, what it supports.

One :class:`AlgorithmSpec` per algorithm, in :data:`REGISTRY` (in the spirit of vLLM's
attention-backend registry: a name, a lazily imported class, declared capabilities). Every layer
that names algorithms reads it: the CLI (``ucm-trt rewrite/run`` choices), the rewriter
(``graph.driver.RewriteConfig``), the runtime (``runtime.algorithms.make_policy``, ``Engine``), the
chat (``chat._names``) and the graph backends (ONNX Runtime, TensorRT).

An incompatible combination (an algorithm with a backend, a config option, a rewritten model or a
query window it cannot serve) is refused in one place, :func:`refuse`, with one message naming the
algorithm, the option and the rule: ``algorithm 'X' cannot be combined with OPTION: RULE``.

This module imports nothing but the standard library (``ucm-trt --help`` stays instant); the
policy classes and the prefill runner are named as ``"module:attribute"`` and imported by
:meth:`AlgorithmSpec.load`.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal

__all__ = [
    "BACKENDS",
    "OPTIONS",
    "REGISTRY",
    "AlgorithmSpec",
    "IncompatibleAlgorithmError",
    "check_backend",
    "check_graph_model",
    "check_options",
    "check_query_window",
    "runs_on_rewrite",
    "get",
    "budgeted_names",
    "names",
    "refuse",
]

#: the backends an algorithm may run on (``Backend.kind``)
BACKENDS: tuple[str, ...] = ("torch", "onnxruntime", "tensorrt")

Kind = Literal["policy", "prefill"]
Retrieval = Literal["none", "cpu", "gpu"]
GraphOp = Literal["dense", "sparse", "rerope"]

#: the per-algorithm settings ``make_policy`` takes, and the rule that says who takes each
OPTIONS: dict[str, str] = {
    "kvstar=": "a KVStarConfig configures the kvstar policy only",
    "gsa_on_device=": "a GSAOnDeviceConfig configures the gsa-on-device policy only",
    "rerope=": "ReRoPE attention runs as the rerope policy or over the selection of a block-selecting "
               "policy (esa, gsa, gsa-on-device, kvstar)",
    "retrieval=": "a RetrievalConfig configures the CPU-retrieval (offload) policies esa, gsa and kvstar only",
    "dense_layers=": "dense layers apply to the block-selecting policies; this one runs every layer dense already",
    "adaptive=": "adaptive= is implemented for esa and gsa (their block scores are logit estimates)",
    "head_merge=": "a HeadMerge sets what each KV head attends of a per-head retrieval of esa, gsa, gsa-on-device "
                   "and kvstar only",
    "prefill_window=": "a PrefillWindow sets the first retrieval's prompt queries of esa and gsa only (kvstar "
                       "votes with its retrieval stride's queries, gsa-on-device selects per step inside the layer)",
}
#: the rule of an option an algorithm cannot run without
_REQUIRED: dict[str, str] = {
    "rerope=": "it needs rerope=ReRoPEConfig(window=..., training_length=...)",
}


@dataclass(frozen=True, kw_only=True)
class AlgorithmSpec:
    """One algorithm.

    name:            the name every command and config takes.
    kind:            ``policy`` (a per-step :class:`~ucm_trt.sparse.policies.base.Policy`, built by
                     ``runtime.algorithms.make_policy``) or ``prefill`` (a prefill method run by its own
                     runner over an engine whose policy decodes).
    entry:           ``"module:attribute"`` of the policy class or the prefill runner.
    representation, scoring: the block representation / scoring it reads (``SparseConfig`` fields).
    graph_op:        the attention the rewriter emits: ``dense`` (every block, no selection input),
                     ``sparse`` (UcmPagedSparseAttention, or its SplitK variant, with per-layer selection
                     inputs), ``rerope`` (UcmPagedReRoPEAttention[SplitK] over un-rotated K).
    retrieval:       where blocks are chosen: ``none`` (every block), ``cpu`` (scored on the host from
                     the step's queries, ``Policy.after_step``), ``gpu`` (inside each layer's attention,
                     ``Policy.layer_selection``).
    needs_queries:   the policy reads the step's queries on the host (``Policy.after_step``).
    cuda_graph:      its decode step may be captured in a CUDA graph (``RuntimeConfig.cuda_graph``).
    offload:         its KV lives on the host with a device working set (``Policy.offload``).
    budgeted:        ``SparseConfig.budget`` decides how many blocks it keeps.
    backends:        the backends (:data:`BACKENDS`) it runs on; ``backend_rule`` says why not the others.
    options:         the ``make_policy`` settings (:data:`OPTIONS`) it takes; ``required`` those it needs.
    preset_scoring:  its block scoring follows the preset (``runtime.algorithms.BLOCK_SCORING``).
    summary:         one line for ``--help``.
    """

    name: str
    kind: Kind
    entry: str
    representation: str
    scoring: str
    graph_op: GraphOp
    retrieval: Retrieval
    needs_queries: bool
    cuda_graph: bool
    offload: bool
    budgeted: bool
    backends: tuple[str, ...]
    backend_rule: str = ""
    options: frozenset[str] = frozenset()
    required: frozenset[str] = frozenset()
    preset_scoring: bool = False
    summary: str = ""

    def __post_init__(self) -> None:
        bad = set(self.backends) - set(BACKENDS)
        if bad:
            raise ValueError(f"AlgorithmSpec {self.name!r}: backends {sorted(bad)} are not in {BACKENDS}")
        bad = set(self.options) - set(OPTIONS)
        if bad:
            raise ValueError(f"AlgorithmSpec {self.name!r}: options {sorted(bad)} are not in {tuple(OPTIONS)}")
        if not self.required <= self.options or not self.required <= set(_REQUIRED):
            raise ValueError(f"AlgorithmSpec {self.name!r}: required {sorted(self.required)} not all in options")
        if set(self.backends) != set(BACKENDS) and not self.backend_rule:
            raise ValueError(f"AlgorithmSpec {self.name!r}: runs on {self.backends} only, but gives no backend_rule")

    @property
    def selects_blocks(self) -> bool:
        """The rewritten graph takes a per-layer ``selection.{i}`` input by default."""
        return self.graph_op == "sparse"

    def load(self) -> Any:
        """The policy class or prefill runner (imported now)."""
        module, _, attr = self.entry.partition(":")
        return getattr(importlib.import_module(module), attr)


_ALL = BACKENDS
_ON_DEVICE_ONLY = ("it selects blocks inside each layer's attention (GPU retrieval, Policy.layer_selection), "
                   "which only the PyTorch backend runs; a graph backend takes selections as inputs")
_SPARSE_OPTIONS = frozenset({"rerope=", "dense_layers="})
# what the CPU-retrieval (offload) policies esa, gsa and kvstar share
_CPU_RETRIEVAL = dict(kind="policy", graph_op="sparse", retrieval="cpu", needs_queries=True, cuda_graph=True,
                      offload=True, budgeted=True, backends=_ALL)
# what the policies that attend to every block share (dense, rerope)
_EVERY_BLOCK = dict(kind="policy", representation="mean", scoring="dot", retrieval="none", needs_queries=False,
                    cuda_graph=True, offload=False, budgeted=False, backends=_ALL)

REGISTRY: dict[str, AlgorithmSpec] = {s.name: s for s in (
    AlgorithmSpec(name="dense", entry="ucm_trt.sparse.policies.dense:DensePolicy", graph_op="dense",
                  summary="every block, no selection inputs", **_EVERY_BLOCK),
    AlgorithmSpec(name="esa", entry="ucm_trt.sparse.policies.esa:ESAPolicy", representation="mean", scoring="dot",
                  options=_SPARSE_OPTIONS | {"retrieval=", "adaptive=", "prefill_window=", "head_merge="}, preset_scoring=True,
                  **_CPU_RETRIEVAL,
                  summary="mean-K dot scoring on the CPU, retrieval every stride, offloaded KV"),
    AlgorithmSpec(name="gsa", entry="ucm_trt.sparse.policies.gsa:GSAPolicy", representation="mean", scoring="dot",
                  options=_SPARSE_OPTIONS | {"retrieval=", "adaptive=", "prefill_window=", "head_merge="}, preset_scoring=True,
                  **_CPU_RETRIEVAL,
                  summary="mean-K dot scoring on the CPU with a one-step lag and prefetch, offloaded KV"),
    AlgorithmSpec(
        name="gsa-on-device", kind="policy", entry="ucm_trt.sparse.policies.gsa_on_device:GSAOnDevicePolicy",
        representation="hash", scoring="hamming", graph_op="sparse", retrieval="gpu", needs_queries=False,
        cuda_graph=True, offload=False, budgeted=True, backends=("torch",), backend_rule=_ON_DEVICE_ONLY,
        options=_SPARSE_OPTIONS | {"gsa_on_device=", "head_merge="},
        summary="hashed-K Hamming scoring inside each layer on the device",
    ),
    AlgorithmSpec(name="kvstar", entry="ucm_trt.sparse.policies.kvstar:KVStarPolicy", representation="subblock",
                  scoring="kvstar_vote", options=_SPARSE_OPTIONS | {"retrieval=", "kvstar=", "head_merge="}, **_CPU_RETRIEVAL,
                  summary="sub-block multi-query voting on the CPU, offloaded KV"),
    AlgorithmSpec(
        name="blend", kind="prefill", entry="ucm_trt.runtime.blend:BlendRunner",
        representation="mean", scoring="dot", graph_op="sparse", retrieval="none", needs_queries=False,
        cuda_graph=True, offload=False, budgeted=False, backends=("torch",),
        backend_rule="its prefill drops token rows mid-network (selective recompute), which only the "
                     "PyTorch backend runs",
        summary="prefill that reuses the KV of cached document chunks; the engine's policy decodes",
    ),
    AlgorithmSpec(name="rerope", entry="ucm_trt.sparse.policies.rerope:ReRoPEPolicy", graph_op="rerope",
                  options=frozenset({"rerope="}), required=frozenset({"rerope="}), **_EVERY_BLOCK,
                  summary="ReRoPE attention over un-rotated K (every block), beyond the trained context"),
)}


def names(kind: Kind | None = None) -> tuple[str, ...]:
    """Every algorithm name (registry order), or those of one ``kind``."""
    return tuple(n for n, s in REGISTRY.items() if kind is None or s.kind == kind)


def budgeted_names() -> tuple[str, ...]:
    """The algorithms whose ``SparseConfig.budget`` decides how many blocks they keep (registry order):
    the block-selecting decode policies esa, gsa, gsa-on-device, kvstar."""
    return tuple(n for n, s in REGISTRY.items() if s.budgeted)


def get(algorithm: object) -> AlgorithmSpec:
    """The spec of ``algorithm``; a ValueError listing the names for an unknown one."""
    if not isinstance(algorithm, str) or algorithm not in REGISTRY:
        raise ValueError(f"algorithm must be one of {', '.join(REGISTRY)}; got {algorithm!r}")
    return REGISTRY[algorithm]


class IncompatibleAlgorithmError(ValueError):
    """An algorithm combined with something it cannot serve (see :func:`refuse`)."""

    def __init__(self, algorithm: str, option: str, rule: str) -> None:
        super().__init__(f"algorithm {algorithm!r} cannot be combined with {option}: {rule}")
        self.algorithm, self.option, self.rule = algorithm, option, rule


def refuse(algorithm: str, option: str, rule: str) -> IncompatibleAlgorithmError:
    """The one refusal: ``algorithm 'X' cannot be combined with OPTION: RULE`` (raise it)."""
    return IncompatibleAlgorithmError(algorithm, option, rule)


def check_backend(algorithm: str, backend: str, *, in_layer_selection: bool | None = None) -> AlgorithmSpec | None:
    """Refuse ``algorithm`` on a backend (``Backend.kind``) it does not run on. A policy outside the
    registry (a user's subclass with its own name) is judged by ``in_layer_selection`` (it overrides
    ``Policy.layer_selection``): only the PyTorch backend runs selections made inside a layer."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}; got {backend!r}")
    if algorithm not in REGISTRY and in_layer_selection is not None:
        if in_layer_selection and backend != "torch":
            raise refuse(algorithm, f"the {backend} backend", _ON_DEVICE_ONLY)
        return None
    spec = get(algorithm)
    if backend not in spec.backends:
        raise refuse(algorithm, f"the {backend} backend", spec.backend_rule)
    return spec


def check_options(algorithm: str, given: Iterable[str]) -> AlgorithmSpec:
    """Refuse ``make_policy`` settings (``"kvstar="`` ...) the algorithm does not take, or one it needs
    and lacks. A prefill method takes none: it is no policy."""
    spec = get(algorithm)
    if spec.kind == "prefill":
        raise refuse(algorithm, "make_policy", (
            f"{algorithm!r} is not a per-step policy but a prefill method ({spec.summary}); build the engine with "
            "a policy that decodes, e.g. make_policy('dense'), and run the request through "
            f"{spec.entry.replace(':', '.')}(engine, BlendConfig(...)), as `ucm-trt run --algorithm {algorithm}` does"
        ))
    given = list(given)
    for option in given:
        if option not in OPTIONS:
            raise ValueError(f"option must be one of {', '.join(OPTIONS)}; got {option!r}")
        if option not in spec.options:
            raise refuse(algorithm, option, OPTIONS[option])
    for option in sorted(spec.required - set(given)):
        raise refuse(algorithm, f"a missing {option}", _REQUIRED[option])
    return spec


def check_query_window(algorithm: str, window: int, *, backend: str, most: int | None,
                       prefill_chunk: int) -> None:
    """Refuse a policy whose retrieval reads the queries of the last ``window`` prompt tokens when the
    backend returns at most ``most`` of them, or a prefill chunk is shorter than ``window``."""
    if most is not None and window > most:
        raise refuse(algorithm, f"the {backend} backend", (
            f"the {algorithm} policy needs the queries of the last {window} prompt tokens; the {backend} backend returns "
            f"at most {most}"
        ))
    if window > prefill_chunk:
        raise refuse(algorithm, f"RuntimeConfig.prefill_chunk={prefill_chunk}", (
            f"the {algorithm} policy needs the queries of the last {window} prompt tokens, more than one prefill chunk; "
            "raise prefill_chunk"
        ))


def runs_on_rewrite(algorithm: str, model_algorithm: str) -> bool:
    """Whether the graph backends run ``algorithm`` over a model rewritten for ``model_algorithm``: the
    algorithm runs on them at all (``onnxruntime`` in its backends) and its attention op
    (:attr:`AlgorithmSpec.graph_op`) is one the rewrite's op serves (a ``sparse`` rewrite takes any selection,
    every block included: ``dense`` and ``sparse``; a ``dense`` or ``rerope`` rewrite only its own op).
    The query window and the ReRoPE settings are checked when the engine is built
    (:func:`check_query_window`, :func:`check_graph_model`)."""
    spec, model = get(algorithm), get(model_algorithm)
    serves = {"sparse": ("dense", "sparse"), "dense": ("dense",), "rerope": ("rerope",)}[model.graph_op]
    return spec.kind == "policy" and "onnxruntime" in spec.backends and spec.graph_op in serves


def check_graph_model(algorithm: str, *, model_algorithm: str | None, model_rerope: object,
                      policy_rerope: object) -> None:
    """Refuse a policy on a graph backend whose model was rewritten for what the policy cannot run:
    a ReRoPE model needs ReRoPE attention with the same settings, a ``dense`` model has no selection
    inputs. ``model_algorithm`` is ``None`` for a backend whose attention is not fixed by a rewrite."""
    if model_algorithm is None:
        return
    if model_rerope is not None and policy_rerope is None:
        raise refuse(algorithm, f"a model rewritten for ReRoPE ({model_rerope})",
                     "its attention is ReRoPE over un-rotated K; use the rerope policy")
    if policy_rerope is not None and policy_rerope != model_rerope:
        raise refuse(algorithm, f"a model rewritten with rerope={model_rerope}", (
            f"ReRoPE attention ({policy_rerope}) needs a model rewritten for ReRoPE with the same settings"
        ))
    spec = REGISTRY.get(algorithm)
    if model_algorithm == "dense" and (spec is None or spec.graph_op != "dense") and policy_rerope is None:
        raise refuse(algorithm, "a model rewritten for 'dense'", (
            "that model has no selection inputs; rewrite it for a block-selecting algorithm"
        ))
