"""Shared machinery of the CPU-retrieval (offload) policies: ESA, GSA and KVStar.

A request's retrieval covers every layer and returns the selections of all layers as one int32
``[L, Hkv, S]`` tensor (sorted, -1 padded). The retrievals a decode step starts are submitted
together (:meth:`OffloadPolicy._submit_batch`): one task per thread of the runtime's
:class:`~ucm_trt.runtime.worker.RetrievalWorker` (at most), each covering a contiguous share of the
step's requests, with the scores of its requests that have the same number of blocks selected in
one batched pass (:class:`RetrievalJob`), and one copy of the step's query rows — not a task, a
query copy and a selection pass per request. The selections equal the per-request path's
(``tests/runtime/test_step_batch.py``). Everything a task reads is an immutable CPU snapshot taken
when it is submitted (query copies, append-only representation stores), so a task never races the
model step.

Per-layer hook: each policy keeps its per-layer reference retrieval ``_select(..., layer)``
(the functions of :mod:`ucm_trt.sparse.score` / :func:`~ucm_trt.sparse.policies.base.select_from_scores`).
A subclass that overrides ``_select`` gets it called layer by layer inside the one task (slow,
for tests and experiments); otherwise the batched path of :mod:`ucm_trt.sparse.batched` runs.

``plan`` extends each request's ``[L, Hkv, S]`` selection with the decode-generated blocks using
tensor ops, once per change (new selection or a new block), and hands out per-layer views.

:class:`RetrievalConfig` (a constructor option of ESA, GSA and KVStar) chooses where the block
representations live and which queries score them:

* ``representations="host"`` (default, UCM's design): a float32 host store; scoring and top-k run
  on the retrieval worker's CPU threads.
* ``representations="device"``: the store lives on the runtime's device (the GPU; ESA's / GSA's
  mean K is 1/block_size of K, KVStar's float16 sub-blocks ``channel_ratio / token_merge`` of it, 1/8 at
  its defaults); the task uploads the query, scores and selects there on its own CUDA
  stream (after the step that wrote the representations) and brings back only the selected ids.
  The KV blocks stay in the host store either way. Same selections as the host path for the same
  scores (the scores themselves may differ in the last bits: another summation order).
* ``query_drift``: score with :class:`~ucm_trt.sparse.turnover.QueryDrift` queries instead of the
  model's (benchmarks on random weights that need a realistic selection turnover).

Every collected retrieval is compared with the request's previous one
(:func:`~ucm_trt.sparse.turnover.turnover_counts`, on the worker thread); ``stats()`` reports the turnover of all
selected blocks and of the top-k part alone.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from functools import partial

import torch

from ucm_trt.sparse.batched import BlockRepStore, extend_selections, select_batched
from ucm_trt.sparse.policies.base import Policy, PolicyRuntime, RequestView, RetrievalTicket
from ucm_trt.sparse.select import union_kv_heads
from ucm_trt.sparse.turnover import DriftingQuery, QueryDrift, calibrate_persistence, turnover_counts

__all__ = [
    "REP_PLACEMENTS",
    "OffloadPolicy",
    "OffloadRequestState",
    "PendingRetrieval",
    "RetrievalConfig",
    "RetrievalJob",
    "device_task",
    "stack_layer_selections",
]

#: where an offload policy keeps its block representations (:class:`RetrievalConfig`)
REP_PLACEMENTS: tuple[str, ...] = ("host", "device")
_REP_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@dataclass(frozen=True, kw_only=True)
class RetrievalConfig:
    """How an offload policy retrieves (module docstring).

    Attributes
    ----------
    representations:
        ``"host"``: representations in host memory, scoring and top-k on the CPU worker threads;
        ``"device"``: representations on the runtime's device (GPU), scoring and top-k there.
    rep_dtype:
        Storage dtype of the representations: ``torch.float32`` (default; the selections of the
        per-layer reference), ``torch.float16`` or ``torch.bfloat16`` (half the bytes; scores are
        computed in float32 from the rounded values, so selections can differ where scores are close).
    query_drift:
        ``None``: the model's queries. A :class:`~ucm_trt.sparse.turnover.QueryDrift`: synthetic
        drifting queries (started at the prefill retrieval's query), for benchmarks that need a given turnover.
    stagger:
        ``True``: each request's retrieval schedule is shifted by a phase in ``[0, R)`` (``R`` the policy's
        retrieval stride), the phase the fewest live requests have when its prefill ends, so the retrievals
        of requests that decode together spread over the stride's steps instead of all falling on one of
        them (every ``R`` steps each request still retrieves once; only the steps differ; a request alone
        gets phase 0, upstream's schedule). ``False`` (default): phase 0 for every request (a request's
        tokens then do not depend on which other requests run beside it). Off by default because it did
        not pay on the H100 (8B shape, 2026-12-07): the retrieval waits vanished (ESA 128K batch 6: 0.4 ms
        per step), but every step then carries some request's new selection, and the plan of such a step
        costs nearly what it costs for all of them (ESA 32K batch 27: plan 37.6 ms per step, 537.8 tok/s
        vs 673-752 unstaggered).
    """

    representations: str = "host"
    rep_dtype: torch.dtype = torch.float32
    query_drift: QueryDrift | None = None
    stagger: bool = False

    def __post_init__(self) -> None:
        if self.representations not in REP_PLACEMENTS:
            raise ValueError(
                f"RetrievalConfig.representations must be one of {', '.join(REP_PLACEMENTS)}, "
                f"got {self.representations!r}"
            )
        if self.rep_dtype not in _REP_DTYPES:
            raise ValueError(
                f"RetrievalConfig.rep_dtype must be torch.float32, torch.float16 or torch.bfloat16, got {self.rep_dtype!r}"
            )
        if self.query_drift is not None and not isinstance(self.query_drift, QueryDrift):
            raise TypeError(
                f"RetrievalConfig.query_drift must be a QueryDrift or None, got {type(self.query_drift).__name__}"
            )
        if not isinstance(self.stagger, bool):
            raise TypeError(f"RetrievalConfig.stagger must be a bool, got {self.stagger!r}")


def stack_layer_selections(sels: list[torch.Tensor]) -> torch.Tensor:
    """Per-layer selections ``[Hkv, S_l]`` (int32, sorted, -1 padded) -> ``[L, Hkv, max S_l]``, -1 padded."""
    if not sels:
        raise ValueError("sels must hold one selection per layer, got an empty list")
    for i, s in enumerate(sels):
        if not isinstance(s, torch.Tensor) or s.dim() != 2 or s.dtype != torch.int32:
            got = f"shape {tuple(s.shape)}, dtype {s.dtype}" if isinstance(s, torch.Tensor) else type(s).__name__
            raise ValueError(f"sels[{i}] must be an int32 tensor [Hkv, S], got {got}")
    h = sels[0].shape[0]
    width = max(s.shape[1] for s in sels)
    out = torch.full((len(sels), h, width), -1, dtype=torch.int32)
    for i, s in enumerate(sels):
        if s.shape[0] != h:
            raise ValueError(f"sels[{i}] has {s.shape[0]} rows, sels[0] has {h}: every layer needs [Hkv, S]")
        out[i, :, : s.shape[1]] = s
    return out


class _SharedTicket:
    """The worker ticket of one task that covers several requests' retrievals: its value (a list of
    ``(selection, turnover counts)``, one per request) is fetched once, so the worker accounts the
    task's time and the wait for it once, however many requests collect from it."""

    def __init__(self, ticket: RetrievalTicket) -> None:
        self.ticket = ticket
        self._value: list | None = None

    @property
    def future(self):
        """The worker's future of the task (its value: ``(list, seconds)``)."""
        return self.ticket.future

    def result(self) -> list:
        if self._value is None:
            self._value = self.ticket.result()  # a failed task raises here, for every request collecting it
        return self._value

    def peek(self) -> list | None:
        """The value if the task has finished successfully, else None; never waits."""
        if self._value is not None:
            return self._value
        fut = self.ticket.future
        if not fut.done() or fut.exception() is not None:
            return None
        return fut.result()[0]


class PendingRetrieval:
    """Request's retrieval submitted at ``step`` (item ``index`` of a task shared by the requests of
    that step, see :meth:`OffloadPolicy._submit_batch`); its selection covers ``num_blocks`` blocks."""

    def __init__(self, ticket: _SharedTicket, step: int, num_blocks: int, index: int = 0) -> None:
        self.ticket = ticket
        self.step = step
        self.num_blocks = num_blocks
        self.index = index
        #: turnover counts against the selection active at submission (``turnover_counts``), or None
        self.counts: tuple[int, int, int, int] | None = None

    def result(self) -> torch.Tensor:
        """Wait; int32 ``[L, Hkv, S]``. A failed task raises :class:`~ucm_trt.runtime.worker.RetrievalError`."""
        sel, self.counts = self.ticket.result()[self.index]
        return sel

    def peek(self) -> torch.Tensor | None:
        """The result if the task has finished successfully, else None; never waits and leaves the
        collection (and its accounting, and the surfacing of a failure) to :meth:`result`."""
        value = self.ticket.peek()
        return None if value is None else value[self.index][0]


@dataclass(frozen=True, eq=False, kw_only=True)
class RetrievalJob:
    """One request's retrieval in a step's batch (:meth:`OffloadPolicy._submit_batch`).

    ``task() -> [L, Hkv, S]`` computes it alone. ``scores``, when given, is the same retrieval split
    for batching: ``scores() -> [L, Hkv, nb]`` per-KV-head scores, selected with
    :func:`~ucm_trt.sparse.batched.select_batched` (``scoring``, ``extra``) together with the other
    requests of the task that have the same ``num_blocks`` (one selection pass over all their
    layers); the result equals ``task()``'s (tested)."""

    rid: str
    step: int
    num_blocks: int
    task: Callable[[], torch.Tensor]
    scores: Callable[[], torch.Tensor] | None = None
    scoring: str = "dot"
    extra: int = 0
    #: run first, on the worker thread (fills the job's query: a QueryDrift draw, see ``_batch_queries``)
    prepare: Callable[[], None] | None = None


@dataclass(eq=False, kw_only=True)
class OffloadRequestState:
    """What an offload policy keeps for one live request (made at its prefill end, dropped at its end).

    ``dense``: the prompt has fewer than ``SparseConfig.min_blocks`` blocks, so every step reads every
    block and nothing is retrieved. ``sel`` int32 ``[L, Hkv, S]`` (sorted, -1 padded) is the collected
    selection, covering the first ``sel_nb`` blocks; ``pending`` the retrieval in flight. ``ext`` caches
    ``plan``'s extension of ``sel`` by the decode-generated blocks: ``(blocks, per-layer views, selected
    count)``; ``peeked`` caches ``prefetch``'s look at a finished ``pending``: ``(pending, per-layer
    views)``. ``drift``: the request's synthetic query (``RetrievalConfig.query_drift`` only);
    ``store``: its block representations (ESA, GSA; KVStar keeps its own, ``KVStarRequestState.votes``).
    ``phase``: the shift of its retrieval schedule (``RetrievalConfig.stagger``): the policy's schedule
    reads decode step ``s`` as ``s + phase``.
    """

    dense: bool
    sel: torch.Tensor | None = None
    sel_nb: int | None = None
    pending: PendingRetrieval | None = None
    ext: tuple[int, tuple[torch.Tensor, ...], int] | None = None
    peeked: tuple[PendingRetrieval, tuple[torch.Tensor, ...]] | None = None
    drift: DriftingQuery | None = None
    store: BlockRepStore | None = None
    phase: int = 0

    @property
    def representation_bytes(self) -> int:
        """Bytes of the request's block representations (its store's; a policy with another layout says)."""
        return self.store.nbytes if isinstance(self.store, BlockRepStore) else 0


@dataclass(kw_only=True)
class AdaptiveCounts:
    """What :class:`~ucm_trt.config.AdaptiveBudget` selection did, summed over (layer, KV head) retrievals."""

    layer_retrievals: int = 0
    widened: int = 0
    dense: int = 0
    base_blocks: int = 0
    extra_blocks: int = 0


def device_task(fn: Callable[[], torch.Tensor], stream: torch.cuda.Stream) -> Callable[[], torch.Tensor]:
    """Wrap a device-side retrieval task for the worker thread: it runs on ``stream`` after the work
    queued so far on the calling thread's current stream (which wrote the representations), and
    returns its selection on the CPU. Call it on the submitting thread."""
    ready = torch.cuda.Event()
    ready.record()  # on the submitting thread's current stream

    def task() -> torch.Tensor:
        with torch.cuda.stream(stream):
            stream.wait_event(ready)
            return fn().cpu()  # waits for the task's kernels, so its inputs may be freed after

    return task


class OffloadPolicy(Policy):
    """Base of policies whose KV lives in the host store and whose selections come from CPU tasks."""

    offload = True

    def __init__(self, *, retrieval: RetrievalConfig | None = None, dense_layers=None, adaptive=None,
                 head_merge=None) -> None:
        super().__init__(dense_layers=dense_layers)
        from ucm_trt.config import AdaptiveBudget, HeadMerge

        if adaptive is not None and not isinstance(adaptive, AdaptiveBudget):
            raise TypeError(f"adaptive must be an AdaptiveBudget or None, got {type(adaptive).__name__}")
        self.adaptive = adaptive
        if head_merge is None:
            head_merge = HeadMerge()
        if not isinstance(head_merge, HeadMerge):
            raise TypeError(f"head_merge must be a HeadMerge or None, got {type(head_merge).__name__}")
        #: what each KV head attends of a per-head retrieval (HeadMerge: its own blocks, or the layer's union)
        self.head_merge = head_merge
        self._adaptive_lock = threading.Lock()
        self._adaptive_counts = AdaptiveCounts()
        if retrieval is None:
            retrieval = RetrievalConfig()
        if not isinstance(retrieval, RetrievalConfig):
            raise TypeError(f"retrieval must be a RetrievalConfig, got {type(retrieval).__name__}")
        self.retrieval = retrieval
        self._state: dict[str, OffloadRequestState] = {}
        self._stream = None  # CUDA stream of device-side retrieval tasks
        self.retrievals = 0
        self.selected_blocks = 0
        self.candidate_blocks = 0
        self.turnover_changed = 0  # blocks of a collected selection its predecessor lacked
        self.turnover_selected = 0
        self.topk_changed = 0  # the same for the top-k part (sink / local windows left out)
        self.topk_selected = 0
        drift = retrieval.query_drift
        #: the QueryDrift persistence in use (calibrated at the first drifting request for a target)
        self.drift_persistence: float | None = None if drift is None else drift.persistence
        self.drift_calibrated_turnover: float | None = None
        self.peak_representation_bytes = 0

    def bind(self, rt: PolicyRuntime) -> None:
        super().bind(rt)
        if self.retrieval.representations == "device" and rt.device.type == "cuda":
            self._stream = torch.cuda.Stream(device=rt.device)

    @property
    def rep_device(self) -> torch.device:
        """Where the block representations live: the CPU, or the runtime's device."""
        return self.rt.device if self.retrieval.representations == "device" else torch.device("cpu")

    def _new_rep_store(self, capacity: int) -> BlockRepStore:
        shape = self.shape
        return BlockRepStore(num_layers=shape.num_layers, num_kv_heads=shape.num_kv_heads, head_dim=shape.head_dim,
                             capacity=capacity, device=self.rep_device, dtype=self.retrieval.rep_dtype)

    def _on_device(self, fn: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]:
        """:func:`device_task` on the policy's CUDA stream; identity for host representations and on the CPU."""
        return fn if self._stream is None else device_task(fn, self._stream)

    def _layerwise(self, base: type) -> bool:
        """True when a subclass overrides ``base``'s per-layer ``_select`` hook."""
        return type(self)._select is not base._select  # type: ignore[attr-defined]

    def _submit(self, rid: str, step: int, num_blocks: int, fn: Callable[[], torch.Tensor]) -> PendingRetrieval:
        """Submit ``fn() -> [L, Hkv, S]`` (every layer of request ``rid``) as one worker task (see
        :meth:`_submit_batch`, of which this is the one-request case)."""
        return self._submit_batch([RetrievalJob(rid=rid, step=step, num_blocks=num_blocks, task=fn)])[0]

    def _submit_batch(self, jobs: list[RetrievalJob]) -> list[PendingRetrieval]:
        """Submit the retrievals of one step: the jobs are split into one contiguous chunk per worker
        thread (at most), each chunk ONE task that runs its requests' retrievals in order, with the
        scores of the requests that have the same number of blocks selected in one batched pass
        (:class:`RetrievalJob`). Returns one :class:`PendingRetrieval` per job, in order.

        Each task also counts every request's turnover against the request's selection active now (the
        one the new selection replaces when collected: every schedule collects its retrievals in
        submission order), off the main thread."""
        if not jobs:
            return []
        L = self.shape.num_layers
        threads = max(1, int(getattr(self.rt.worker, "num_threads", 1)))
        n_tasks = min(threads, len(jobs))
        bounds = [len(jobs) * i // n_tasks for i in range(n_tasks + 1)]
        out: list[PendingRetrieval] = []
        for t in range(n_tasks):
            chunk = jobs[bounds[t] : bounds[t + 1]]
            prev = []
            for job in chunk:
                st = self._state.get(job.rid)
                prev.append((None, None) if st is None else (st.sel, st.sel_nb))
            if len(chunk) == 1:
                what = f"{self.name} request {chunk[0].rid!r} layers 0-{L - 1} step {chunk[0].step}"
            else:
                what = (f"{self.name} requests " + ", ".join(f"{j.rid!r} (step {j.step})" for j in chunk)
                        + f" layers 0-{L - 1}")
            ticket = _SharedTicket(self.rt.worker.submit(partial(self._run_jobs, chunk, prev), what=what))
            out += [PendingRetrieval(ticket, job.step, job.num_blocks, i) for i, job in enumerate(chunk)]
        return out

    def _run_jobs(self, jobs: list[RetrievalJob], prev: list[tuple]) -> list[tuple]:
        """A task of :meth:`_submit_batch` (on a worker thread): ``[(selection, turnover counts)]``."""
        sels: list[torch.Tensor | None] = [None] * len(jobs)
        groups: dict[tuple, list[tuple[int, torch.Tensor]]] = {}
        for i, job in enumerate(jobs):
            try:
                if job.prepare is not None:
                    job.prepare()
                if job.scores is None:
                    sels[i] = job.task()
                else:
                    scores = job.scores()
                    groups.setdefault((job.num_blocks, job.scoring, job.extra, scores.device), []).append((i, scores))
            except Exception as exc:
                if len(jobs) == 1:
                    raise
                raise RuntimeError(f"request {job.rid!r} step {job.step}: {type(exc).__name__}: {exc}") from exc
        h = self.shape.num_kv_heads
        for (nb, scoring, extra, _), items in groups.items():
            rows = [s.shape[0] for _, s in items]
            cat = torch.cat([s for _, s in items]) if len(items) > 1 else items[0][1]
            try:
                sel = select_batched(cat, nb, self.sparse, scoring, h, extra=extra)
            except Exception:
                if len(jobs) == 1:
                    raise
                for i, scores in items:  # name the request whose scores the selection refused
                    try:
                        select_batched(scores, nb, self.sparse, scoring, h, extra=extra)
                    except Exception as exc:
                        job = jobs[i]
                        raise RuntimeError(f"request {job.rid!r} step {job.step}: {type(exc).__name__}: {exc}") from exc
                raise
            start = 0
            for (i, _), n in zip(items, rows, strict=True):
                part = sel[start : start + n]
                start += n
                if len(items) > 1:  # the width select_batched gives this request alone: its most selected
                    part = part[..., : max(1, int((part >= 0).sum(-1).max()))].contiguous()
                sels[i] = part
        out = []
        for sel, (old, old_nb), job in zip(sels, prev, jobs, strict=True):
            # a malformed selection is left to _collect, which names the problem
            if old is None or not isinstance(sel, torch.Tensor) or sel.dim() != 3 or sel.shape[:2] != old.shape[:2]:
                out.append((sel, None))
            else:
                out.append((sel, self._turnover(old, old_nb, sel, job.num_blocks)))
        return out

    def _per_layer(self, fn: Callable[[int], torch.Tensor]) -> Callable[[], torch.Tensor]:
        """A task running the per-layer hook ``fn(layer) -> [Hkv, S]`` over every layer."""
        L = self.shape.num_layers
        return lambda: stack_layer_selections([fn(layer) for layer in range(L)])

    def _collect(self, st: OffloadRequestState, pending: PendingRetrieval) -> None:
        sel = pending.result()
        L, h = self.shape.num_layers, self.shape.num_kv_heads
        if sel.dim() != 3 or tuple(sel.shape[:2]) != (L, h) or sel.dtype != torch.int32:
            raise RuntimeError(
                f"{self.name}: retrieval returned {sel.dtype} {tuple(sel.shape)}, want int32 [L={L}, Hkv={h}, S]"
            )
        counts = getattr(pending, "counts", None)  # counted by _submit's task; absent on hand-made pendings
        if counts is not None:
            c, n, kc, kn = counts
            self.turnover_changed += c
            self.turnover_selected += n
            self.topk_changed += kc
            self.topk_selected += kn
        if self.head_merge.mode == "union" and self.sparse.selection == "per_head":
            # every KV head attends the blocks any head of its layer selected (the blocks loaded anyway)
            sel = union_kv_heads(sel, pending.num_blocks)
        st.sel = sel
        st.sel_nb = pending.num_blocks
        st.ext = None  # plan's cached extension is stale
        self.retrievals += 1

    def _turnover(self, old: torch.Tensor, old_nb: int, new: torch.Tensor, new_nb: int) -> tuple[int, int, int, int]:
        """Turnover counts of ``new`` against ``old`` over every (layer, KV-head) row."""
        w = 1
        if self.sparse.selection == "shared":  # every KV-head row is the same selection
            old, new, w = old[:, :1], new[:, :1], self.shape.num_kv_heads
        return tuple(w * x for x in turnover_counts(old, old_nb, new, new_nb, self.sparse))

    def _adaptive_select(self, scores: torch.Tensor, nb: int, block_lens: torch.Tensor, *, extra: int = 0
                         ) -> torch.Tensor:
        """Selections ``[L, Hkv, S]`` from per-KV-head ``scores [L, Hkv, nb]`` under :attr:`adaptive`
        (:func:`ucm_trt.sparse.adaptive.adaptive_select`), counting what it did for :meth:`stats`.
        Scores are logit estimates of the GQA-averaged query; vote scores are estimated masses."""
        from ucm_trt.sparse.adaptive import adaptive_select

        shape = self.shape
        scores = scores.float().cpu()
        if getattr(self, "vote", False):
            # vote scores are already estimated masses: weight = score (log as logit, unit scale, n_b = 1)
            logits, scale = scores.clamp(min=1e-30).log(), 1.0
            block_lens = torch.ones_like(block_lens)
        else:
            logits, scale = scores, 1.0 / math.sqrt(shape.head_dim)
        sel, out = adaptive_select(logits, nb, block_lens, self.sparse, self.adaptive, scale=scale, extra=extra)
        with self._adaptive_lock:
            c = self._adaptive_counts
            c.layer_retrievals += int(out.dense.numel())
            c.widened += int(out.widened.sum())
            c.dense += int(out.dense.sum())
            c.base_blocks += out.base_blocks
            c.extra_blocks += out.extra_blocks
        return sel

    def _full_block_lens(self, nb: int) -> torch.Tensor:
        """Tokens per block for the adaptive estimate: every block counted full (a partial last block
        is a forced local block, always kept; it only enters the total)."""
        return torch.full((nb,), self.sparse.block_size, dtype=torch.int64)

    def _adaptive_stats(self) -> dict:
        if self.adaptive is None:
            return {}
        with self._adaptive_lock:
            c = asdict(self._adaptive_counts)
        kv = getattr(self.rt, "kv", None)
        per_head_block = kv.block_bytes / self.shape.num_kv_heads if kv is not None else None
        n = c["layer_retrievals"]
        return {"adaptive": {
            **c,
            "widened_fraction": c["widened"] / n if n else None,
            "dense_fraction": c["dense"] / n if n else None,
            "extra_block_fraction": c["extra_blocks"] / c["base_blocks"] if c["base_blocks"] else None,
            # bytes of K/V the added (layer, KV head, block) entries read per use of the selections
            "extra_bytes_per_use": None if per_head_block is None else c["extra_blocks"] * per_head_block,
        }}

    @property
    def retrieval_stride(self) -> int:
        """Decode steps between two retrievals of a request (``SparseConfig.retrieval_stride``; KVStar its own)."""
        return self.sparse.retrieval_stride

    def _new_phase(self) -> int:
        """The schedule phase of a request whose prefill ends now (``RetrievalConfig.stagger``): the one
        the fewest live retrieving requests have (the lowest of those), 0 without staggering."""
        r = self.retrieval_stride
        if not self.retrieval.stagger or r == 1:
            return 0
        used = [0] * r
        for st in self._state.values():
            if not st.dense:
                used[st.phase % r] += 1
        return used.index(min(used))

    def _num_blocks(self, tokens: int) -> int:
        bs = self.sparse.block_size
        return (tokens + bs - 1) // bs

    @staticmethod
    def _row_queries(queries, row: int) -> torch.Tensor:
        """A copy of batch row ``row`` of every layer's query: ``[L, Hq, D]`` (the runtime reuses its buffer)."""
        return torch.stack([q[row] for q in queries])

    def _step_queries(self, queries, row: int, req: RequestView) -> torch.Tensor:
        """The retrieval query ``[L, Hq, D]`` of ``req``'s decode step: the model's (a copy), or the
        request's :class:`~ucm_trt.sparse.turnover.QueryDrift` query when configured (started at the
        prefill retrieval's query by :meth:`_start_drift`)."""
        return self._batch_queries(queries, [row], [req])[0]

    def _batch_queries(self, queries, rows: list[int], reqs: list[RequestView], *,
                       fills: list | None = None) -> list[torch.Tensor]:
        """The retrieval queries ``[L, Hq, D]`` of the step's requests ``reqs`` at batch ``rows``:
        the model's, as ONE copy of those rows (``queries``: per layer ``[B, Hq, D]``, or one
        ``[L, B, Hq, D]`` tensor; the runtime reuses its buffer), or each request's
        :class:`~ucm_trt.sparse.turnover.QueryDrift` query when configured.

        ``fills`` (a list, for callers whose queries are read only by retrieval tasks): a drift query
        comes back as an empty buffer and ``fills`` gets, per request, the callable that draws it
        into the buffer (:attr:`RetrievalJob.prepare`, run on the worker thread), so the main
        thread does not pay for the draw; unused (left empty) for the model's queries."""
        if not rows:
            return []
        if self.retrieval.query_drift is None:
            q = queries if isinstance(queries, torch.Tensor) else torch.stack(list(queries))  # [L, B, Hq, D]
            idx = torch.tensor(rows, dtype=torch.int64, device=q.device)
            return list(q.transpose(0, 1).index_select(0, idx))  # [n, L, Hq, D], a fresh copy
        out = []
        for row, req in zip(rows, reqs, strict=True):
            st = self._state[req.rid]
            if st.drift is None:  # a policy that did not start it at prefill end: start here
                self._start_drift(req.rid, st, self._row_queries(queries, row), req.step)
            if fills is None:
                out.append(st.drift.at(req.step))
            else:
                buf = torch.empty(st.drift.shape, dtype=torch.float32)
                fills.append(partial(st.drift.fill, buf, req.step))
                out.append(buf)
        return out

    @staticmethod
    def _with_fills(jobs: list[RetrievalJob], fills: list) -> list[RetrievalJob]:
        """``jobs`` with the query draws of :meth:`_batch_queries` (``fills``, one per job, or none) as their
        :attr:`RetrievalJob.prepare`."""
        if not fills:
            return jobs
        return [replace(job, prepare=fill) for job, fill in zip(jobs, fills, strict=True)]

    def _start_drift(self, rid: str, st: OffloadRequestState, q: torch.Tensor, step: int = 0) -> None:
        """Start the request's :class:`~ucm_trt.sparse.turnover.QueryDrift` query at ``q [L, Hq, D]``:
        the query of its prefill retrieval (``step`` 0), so the first decode retrieval already differs
        from the prefill's by the drift alone (calibrating ``a`` first when a target is set). No-op
        without ``query_drift``."""
        drift = self.retrieval.query_drift
        if drift is None:
            return
        a = None
        if drift.target_turnover is not None:
            if self.drift_persistence is None:
                self._calibrate_drift(st, q)
            a = self.drift_persistence
        st.drift = drift.start(rid, step, q, persistence=a)

    def _calibrate_drift(self, st: OffloadRequestState, q: torch.Tensor) -> None:
        """Find the drift persistence of ``QueryDrift.target_turnover`` on this request's prompt
        representations and query (once per policy; ESA and GSA, whose stores hold mean K)."""
        store = st.store
        if not isinstance(store, BlockRepStore):
            raise ValueError(
                f"{self.name}: QueryDrift(target_turnover=...) needs mean-K block representations to "
                "calibrate on (ESA, GSA); give QueryDrift(persistence=...) instead"
            )
        target = self.retrieval.query_drift.target_turnover
        a, reached = calibrate_persistence(target, store.reps(), q, self.sparse, seed=self.retrieval.query_drift.seed)
        self.drift_persistence, self.drift_calibrated_turnover = a, reached

    def plan(self, reqs: list[RequestView]) -> list[list[torch.Tensor | None]]:
        L = self.shape.num_layers
        h = self.shape.num_kv_heads
        out: list[list[torch.Tensor | None]] = [[None] * len(reqs) for _ in range(L)]
        rep_bytes = 0
        stale: list[tuple[OffloadRequestState, int]] = []  # requests whose cached extension is out of date
        for req in reqs:
            st = self._state.get(req.rid)
            if st is None:
                raise RuntimeError(f"{self.name}: request {req.rid!r} has no state (prefill did not finish)")
            rep_bytes += st.representation_bytes
            if st.dense:
                continue
            nb_new = self._num_blocks(req.new_len)
            if st.ext is None or st.ext[0] != nb_new:
                stale.append((st, nb_new))
        if stale:
            self._extend_all(stale)
        for row, req in enumerate(reqs):
            st = self._state[req.rid]
            if st.dense:
                continue
            nb_new, layers, count = st.ext
            dense = self.dense_layers_of(req.rid)
            for layer in range(L):
                out[layer][row] = None if layer in dense else layers[layer]
            if dense:  # every block of a dense layer is read
                count += sum(nb_new * h - int((layers[layer] >= 0).sum()) for layer in dense)
            self.selected_blocks += count
            self.candidate_blocks += nb_new * h * L
        self.peak_representation_bytes = max(self.peak_representation_bytes, rep_bytes)
        return out

    @staticmethod
    def _extend_all(todo: list[tuple[OffloadRequestState, int]]) -> None:
        """Renew ``st.ext`` of every ``(state, blocks now)``: the selection extended with the
        decode-generated blocks (``extend_selections``), as per-layer views and the selected count.
        Requests whose selections have one shape and block counts are extended together (one
        ``extend_selections`` call); each keeps the width it would get alone (its longest row)."""
        groups: dict[tuple, list[OffloadRequestState]] = {}
        for st, nb_new in todo:
            groups.setdefault((tuple(st.sel.shape), st.sel_nb, nb_new), []).append(st)
        for (_, start, nb_new), sts in groups.items():
            if len(sts) == 1:
                full = extend_selections(sts[0].sel, start, nb_new)  # [L, Hkv, S']
                sts[0].ext = (nb_new, full.unbind(0), int((full >= 0).sum()))
                continue
            full = extend_selections(torch.stack([st.sel for st in sts]), start, nb_new)  # [n, L, Hkv, S']
            counts = (full >= 0).sum(-1).flatten(1)  # [n, L * Hkv]
            widths = counts.amax(1).clamp(min=1).tolist()
            totals = counts.sum(1).tolist()
            for i, st in enumerate(sts):
                st.ext = (nb_new, full[i, :, :, : widths[i]].unbind(0), totals[i])

    def prefetch(self, reqs: list[RequestView]) -> list[list[torch.Tensor | None]] | None:
        """The selection of a retrieval that has finished but is not collected yet (it is due at a
        later step of the schedule), so the runtime can load its blocks ahead of time."""
        L, h = self.shape.num_layers, self.shape.num_kv_heads
        out = None
        for row, req in enumerate(reqs):
            st = self._state.get(req.rid)
            pending = None if st is None or st.dense else st.pending
            if pending is None:
                continue
            cached = st.peeked
            if cached is None or cached[0] is not pending:
                sel = pending.peek()
                if sel is None or sel.dim() != 3 or tuple(sel.shape[:2]) != (L, h) or sel.dtype != torch.int32:
                    continue  # not ready (or malformed: collecting it will raise)
                cached = (pending, sel.unbind(0))
                st.peeked = cached
            if out is None:
                out = [[None] * len(reqs) for _ in range(L)]
            dense = self.dense_layers_of(req.rid)
            for layer in range(L):
                out[layer][row] = None if layer in dense else cached[1][layer]
        return out

    def on_request_end(self, rid: str) -> None:
        self._end_dense(rid)
        st = self._state.pop(rid, None)
        if st is not None and st.pending is not None:
            # drain (and surface failures of) a retrieval that is still in flight
            st.pending.result()

    def stats(self) -> dict:
        frac = self.selected_blocks / self.candidate_blocks if self.candidate_blocks else None
        turn = self.turnover_changed / self.turnover_selected if self.turnover_selected else None
        topk = self.topk_changed / self.topk_selected if self.topk_selected else None
        return {"retrievals": self.retrievals, "selected_block_fraction": frac,
                "selection_turnover": turn, "topk_turnover": topk,
                "representations": self.retrieval.representations,
                # most bytes the decoding requests' representation stores held at one step (on the
                # device with representations="device"; filled blocks, not the stores' spare capacity)
                "representation_bytes_peak": self.peak_representation_bytes,
                "query_drift_persistence": self.drift_persistence,
                "query_drift_target_turnover": None if self.retrieval.query_drift is None
                else self.retrieval.query_drift.target_turnover,
                "query_drift_calibrated_turnover": self.drift_calibrated_turnover,
                **self._dense_stats(), **self._adaptive_stats()}
