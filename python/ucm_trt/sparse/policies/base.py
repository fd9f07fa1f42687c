"""One interface for every UCM algorithm (the runtime drives it; policies never touch a model).

Lifecycle of a request, as the runtime calls the hooks::

    bind(runtime)                       once, when the generator is built (validates the config
                                        against the model shape)
    on_request_start(rid, prompt_len)
    ... prefill chunks (dense, every block resident) ...
    on_prefill_end(req, queries)        queries: per layer, CPU float32 [Hq, W, D], the last
                                        W = query_window prompt tokens (post-RoPE)
    loop per decode step:
        plan(reqs) -> selections        per layer, per batch row: int32 [Hkv, S] logical block ids
                                        (sorted, -1 padded) this step attends to, or None = all
                                        blocks. The runtime prefetches exactly these blocks.
                                        A tensor handed out is never written afterwards: a changed
                                        selection is a new tensor (the runtime caches by identity).
        prefetch(reqs) -> coming | None (optional, RuntimeConfig.early_prefetch) blocks a later
                                        selection will need, loaded ahead without being attended
        graph_key()                     what a CUDA-graph capture of this step's hooks depends on
        layer_selection(layer, q, step) per-layer hook inside the forward, on the KV's device;
                                        NotImplemented = use plan()'s selection
        on_append(layer, ...)           per-layer hook when new K/V lands in the pool
        after_step(reqs, queries)       queries: per layer, CPU float32 [B, Hq, D] of this step's
                                        token; the place for retrieval schedules (submit / collect)
    on_request_end(rid)

Selections always contain the sink and local windows (and, for offload algorithms, every block
generated during decode); the current chunk's tokens are visible regardless.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

import torch

from ucm_trt.config import DenseLayers, ReRoPEConfig, SparseConfig
from ucm_trt.sparse.score import reduce_scores
from ucm_trt.sparse.select import budget_counts, candidate_mask, select_blocks, select_blocks_by_count

__all__ = [
    "KVAccess",
    "ModelShape",
    "Policy",
    "PolicyRuntime",
    "RequestView",
    "RetrievalTicket",
    "TaskRunner",
    "extend_selection",
    "select_from_scores",
]


@dataclass(frozen=True, kw_only=True)
class ModelShape:
    num_layers: int
    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float
    max_positions: int


@dataclass(frozen=True, kw_only=True)
class RequestView:
    """One batch row of a step, as policies see it."""

    rid: str
    prompt_len: int
    seq_len: int  # tokens in the KV cache before this step
    new_len: int  # tokens after this step's tokens are appended
    step: int  # decode step index: 1 for the first decode step


class KVAccess(Protocol):
    """What a policy reads of the runtime's KV manager (``ucm_trt.runtime.kv.KVManager`` is one):
    declared here so the policies depend on no runtime module (docs/architecture.md)."""

    layout: Any  # ucm_trt.runtime.kv.KVLayout: block_size, device, dtype, ...
    pools: Sequence[torch.Tensor]  # per layer [num_blocks, 2, Hkv, block_size, D]
    guard: Any  # the kernels' IndexGuard, or None

    @property
    def block_bytes(self) -> int: ...

    def gather_keys(self, rid: str, layer: int, blocks: list[int] | None = None) -> torch.Tensor: ...


class RetrievalTicket(Protocol):
    """A submitted retrieval task (``ucm_trt.runtime.worker.RetrievalTicket`` is one)."""

    future: Future

    def done(self) -> bool: ...

    def result(self) -> Any: ...


class TaskRunner(Protocol):
    """Runs retrieval tasks off the generation loop (``ucm_trt.runtime.worker.RetrievalWorker`` is one)."""

    def submit(self, fn: Callable[[], Any], *, what: str) -> RetrievalTicket: ...


@dataclass(frozen=True, kw_only=True)
class PolicyRuntime:
    """What the runtime lends a policy at bind time."""

    shape: ModelShape
    sparse: SparseConfig
    kv: KVAccess
    worker: TaskRunner
    device: torch.device


def extend_selection(sel: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """Append logical blocks ``start .. stop-1`` (all larger than every id in ``sel``) to every
    row of ``sel`` [Hkv, S] (sorted, -1 padded) -> [Hkv, S'] sorted, -1 padded."""
    extra = torch.arange(start, stop, dtype=torch.int32)
    rows = [torch.cat([r[r >= 0], extra]) for r in sel]
    width = max(1, max(len(r) for r in rows))
    out = torch.full((len(rows), width), -1, dtype=torch.int32)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
    return out


def select_from_scores(
    scores: torch.Tensor, num_blocks: int, sparse: SparseConfig, scoring: str, num_kv_heads: int,
    *, extra: int = 0,
) -> torch.Tensor:
    """Per-KV-head scores ``[Hkv, nb]`` -> selection ``[Hkv, S]`` under ``sparse`` (shared or per
    head), forced sink/local windows at ``num_blocks``. ``extra`` adds that many candidates beyond
    the budget (GSA's prefetch block)."""
    s = scores[None].float()
    if sparse.selection == "shared":
        s = reduce_scores(s, scoring)
    nb = torch.tensor([num_blocks], dtype=torch.int32)
    if extra == 0:
        sel = select_blocks(s, nb, sparse, num_kv_heads=num_kv_heads)
    else:
        cand = candidate_mask(nb, s.shape[-1], sink_blocks=sparse.sink_blocks,
                              local_blocks=sparse.local_blocks, min_blocks=sparse.min_blocks)
        counts = budget_counts(sparse.budget, cand[:, None, :].expand_as(s), s) + extra
        sel = select_blocks_by_count(s, nb, counts, sink_blocks=sparse.sink_blocks,
                                     local_blocks=sparse.local_blocks, min_blocks=sparse.min_blocks,
                                     num_kv_heads=num_kv_heads)
    return sel[0]


class Policy:
    """Base class: dense attention, no retrieval. Subclasses override the hooks they need."""

    name: ClassVar[str] = "base"
    #: KV offloaded to the host block store; only the working set stays on the device.
    offload: ClassVar[bool] = False
    #: prompt tokens whose queries ``on_prefill_end`` receives
    query_window: int = 1
    #: ReRoPE attention path (un-rotated K in the pool); ``None`` = ordinary RoPE
    rerope: ReRoPEConfig | None = None

    def __init__(self, *, dense_layers: DenseLayers | None = None) -> None:
        self.rt: PolicyRuntime | None = None
        if dense_layers is None:
            dense_layers = DenseLayers()
        if not isinstance(dense_layers, DenseLayers):
            raise TypeError(f"dense_layers must be a DenseLayers or None, got {type(dense_layers).__name__}")
        self.dense_rule = dense_layers
        self._dense: dict[str, frozenset[int]] = {}  # per request: the layers that run dense
        self.dense_layer_counts: dict[int, int] = {}  # layer -> requests that ran it dense
        self.dense_requests = 0  # requests whose dense layers were decided

    # -- lifecycle ---------------------------------------------------------------------------
    def bind(self, rt: PolicyRuntime) -> None:
        if not isinstance(rt, PolicyRuntime):
            raise TypeError(f"rt must be a PolicyRuntime, got {type(rt).__name__}")
        self.dense_rule.check_num_layers(rt.shape.num_layers)
        self.rt = rt

    def _decide_dense_layers(self, req: RequestView, queries: list[torch.Tensor]) -> frozenset[int]:
        """At prefill end: the request's dense layers (:class:`~ucm_trt.config.DenseLayers`: the fixed
        ones, plus the diffuse ones detected from the prefill's attention when ``auto``)."""
        from ucm_trt.sparse.dense_layers import detect_dense_layers

        rule = self.dense_rule
        if rule.auto:
            nb = -(-req.prompt_len // self.sparse.block_size)
            kv = self.rt.kv
            dense, _ = detect_dense_layers(queries, lambda layer: kv.gather_keys(req.rid, layer, list(range(nb))),
                                           req.prompt_len, self.sparse, rule)
        else:
            dense = frozenset(rule.layers)
        self._dense[req.rid] = dense
        self.dense_requests += 1
        for layer in dense:
            self.dense_layer_counts[layer] = self.dense_layer_counts.get(layer, 0) + 1
        return dense

    def dense_layers_of(self, rid: str) -> frozenset[int]:
        """The layers request ``rid`` runs dense (empty before its prefill ends)."""
        return self._dense.get(rid, frozenset())

    def _end_dense(self, rid: str) -> None:
        self._dense.pop(rid, None)

    def _dense_stats(self) -> dict[str, Any]:
        return {"dense_layers_auto": self.dense_rule.auto,
                "dense_layer_counts": dict(sorted(self.dense_layer_counts.items())),
                "dense_layer_requests": self.dense_requests}

    def on_request_start(self, rid: str, prompt_len: int) -> None:
        pass

    def on_prefill_end(self, req: RequestView, queries: list[torch.Tensor]) -> None:
        pass

    def plan(self, reqs: list[RequestView]) -> list[list[torch.Tensor | None]]:
        """Per layer, per row: the selection ``[Hkv, S]`` of this step, or None (every block). A tensor
        returned here (or by :meth:`prefetch`) must never be written afterwards; return a new tensor
        when a selection changes (the runtime recognises an unchanged selection by its identity)."""
        return [[None] * len(reqs) for _ in range(self.shape.num_layers)]

    def layer_selection(self, layer: int, q: torch.Tensor, step: Any) -> Any:
        return NotImplemented

    def prefetch(self, reqs: list[RequestView]) -> list[list[torch.Tensor | None]] | None:
        """Blocks a *coming* selection will need, when already known (e.g. a retrieval that has
        finished but is not due yet): per layer, per row ``[Hkv, S]`` or None; ``None`` = nothing.
        The runtime loads them early (offload policies), without waiting for them this step;
        attention keeps reading only ``plan``'s selections, so the algorithm's schedule is unchanged."""
        return None

    def on_append(self, layer: int, phys_blocks: torch.Tensor, offsets: torch.Tensor, k: torch.Tensor) -> None:
        pass

    def collect(self, reqs: list[RequestView]) -> None:
        """What is due after decode step ``reqs`` and needs none of that step's queries: collecting
        the retrievals submitted at earlier steps. The runtime calls it once per step, before
        :meth:`after_step` of the same step; when :meth:`collects_ahead` is True it may call it
        before the step's forward has finished (it plans the next step meanwhile,
        ``RuntimeConfig.plan_ahead``), so it must not read anything the step computes."""

    def collects_ahead(self) -> bool:
        """True when :meth:`collect` never needs a retrieval submitted by :meth:`after_step` of the
        same step (then the next step can be planned while this one runs; see :meth:`collect`)."""
        return True

    def after_step(self, reqs: list[RequestView], queries: list[torch.Tensor]) -> None:
        """After decode step ``reqs`` (and its :meth:`collect`): the step's queries, per layer
        ``[B, Hq, D]`` (the runtime passes one ``[L, B, Hq, D]`` tensor, a view of a buffer it reuses:
        copy what is kept), e.g. to submit retrievals."""

    def on_request_end(self, rid: str) -> None:
        pass

    def graph_key(self) -> Any:
        """Hashable key of the host-side decisions this step's per-layer hooks took (``()`` when
        they take none), or ``None`` when the decode forward cannot be captured in a CUDA graph.

        A captured decode step is replayed for later steps with the same key, batch and selection
        widths, so hooks may launch device work only: no host reads of device values, no shapes
        or branches that depend on anything outside the key. Host-side counters updated inside
        the hooks would run at capture only; keep such counters on the device or in ``plan``.
        """
        return ()

    def stats(self) -> dict[str, Any]:
        return {}

    # -- helpers -----------------------------------------------------------------------------
    @property
    def shape(self) -> ModelShape:
        if self.rt is None:
            raise RuntimeError(f"policy {self.name!r} is not bound to a runtime (call bind first)")
        return self.rt.shape

    @property
    def sparse(self) -> SparseConfig:
        if self.rt is None:
            raise RuntimeError(f"policy {self.name!r} is not bound to a runtime (call bind first)")
        return self.rt.sparse
