"""Asynchronous CPU retrieval: a thread pool that runs block scoring / top-k between steps.

Offload policies submit the retrievals a decode step starts together, one task per thread (each
covering its share of the step's requests, all layers, batched: ``ucm_trt.sparse.batched`` and
``OffloadPolicy._submit_batch``), and collect each request's result at the step their schedule
names. A task that raised makes :meth:`RetrievalTicket.result`
raise :class:`RetrievalError` naming the policy, request, layers and step; the generation loop
lets it propagate, so no request continues on a stale selection. The PyTorch ops used for
scoring release the GIL, so several tasks do run in parallel.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from ucm_trt._validation import check_positive_int

__all__ = ["RetrievalError", "RetrievalTicket", "RetrievalWorker"]


class RetrievalError(RuntimeError):
    """A retrieval task failed or the worker is gone; generation stops with this error."""


@dataclass
class RetrievalTicket:
    """A submitted retrieval task."""

    future: Future
    what: str  # human-readable: policy, request, layers, step
    submitted_at: float
    worker: RetrievalWorker

    def done(self) -> bool:
        return self.future.done()

    def result(self) -> Any:
        """Wait for the task and return its value; re-raise its failure as :class:`RetrievalError`."""
        t0 = time.perf_counter()
        try:
            value, seconds = self.future.result()
        except Exception as exc:  # noqa: BLE001 - any worker failure must reach the caller
            raise RetrievalError(f"retrieval task failed ({self.what}): {type(exc).__name__}: {exc}") from exc
        waited = time.perf_counter() - t0
        self.worker._account(seconds, waited)
        return value


class RetrievalWorker:
    """Thread pool for CPU retrieval tasks plus latency/overlap accounting.

    ``busy_seconds`` sums the time tasks ran; ``wait_seconds`` sums the time the generation loop
    blocked collecting them. ``overlap = 1 - wait / busy`` is the fraction of retrieval time hidden
    behind model steps (1.0 = fully hidden; synchronous retrieval gives about 0).
    """

    def __init__(self, num_threads: int = 2) -> None:
        check_positive_int("num_threads", num_threads)
        self.num_threads = num_threads
        self._pool: ThreadPoolExecutor | None = ThreadPoolExecutor(
            max_workers=num_threads, thread_name_prefix="ucm-retrieval"
        )
        self.tasks = 0
        self.busy_seconds = 0.0
        self.wait_seconds = 0.0
        self.max_task_seconds = 0.0

    def submit(self, fn: Callable[[], Any], *, what: str) -> RetrievalTicket:
        if self._pool is None:
            raise RetrievalError(f"retrieval worker is shut down; cannot run {what}")

        def timed() -> tuple[Any, float]:
            t0 = time.perf_counter()
            value = fn()
            return value, time.perf_counter() - t0

        self.tasks += 1
        return RetrievalTicket(self._pool.submit(timed), what, time.perf_counter(), self)

    def _account(self, seconds: float, waited: float) -> None:
        self.busy_seconds += seconds
        self.wait_seconds += waited
        self.max_task_seconds = max(self.max_task_seconds, seconds)

    @property
    def overlap(self) -> float | None:
        if self.busy_seconds <= 0:
            return None
        return max(0.0, 1.0 - self.wait_seconds / self.busy_seconds)

    def shutdown(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def stats(self) -> dict[str, float | int | None]:
        return {
            "retrieval_tasks": self.tasks,
            "retrieval_busy_ms": 1e3 * self.busy_seconds,
            "retrieval_wait_ms": 1e3 * self.wait_seconds,
            "retrieval_mean_ms": (1e3 * self.busy_seconds / self.tasks) if self.tasks else None,
            "retrieval_max_ms": 1e3 * self.max_task_seconds,
            "retrieval_overlap": self.overlap,
        }
