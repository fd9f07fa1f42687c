"""Asynchronous CPU retrieval: a thread pool that runs block scoring / top-k between steps.

Offload policies submit the retrievals a decode step starts together, one task per thread (each
covering its share of the step's requests, all layers, batched: ``ucm_trt.sparse.batched`` and
``OffloadPolicy._submit_batch``), and collect each request's result at the step their schedule
names. A task that raised makes :meth:`RetrievalTicket.result`
raise :class:`RetrievalError` naming the policy, request, layers and step; the generation loop
lets it propagate, so no request continues on a stale selection. The PyTorch ops used for
scoring release the GIL, so several tasks do run in parallel. Each worker thread runs its torch
ops on ``intra_op_threads`` threads (default: the creating thread's ``torch.get_num_threads()``
divided by ``num_threads``, at least 1): without it every concurrent task would start a full-size
OpenMP team and ``num_threads`` tasks would oversubscribe the cores ``num_threads``-fold.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch

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


def _set_intra_op_threads(n: int) -> None:
    """Worker thread initializer: its own torch intra-op thread count (OpenMP and MKL keep it per
    thread once the thread has run ``torch.get_num_threads``)."""
    torch.set_num_threads(n)
    torch.get_num_threads()  # initialise this thread's count now, while the process-wide value is n


class RetrievalWorker:
    """Thread pool for CPU retrieval tasks plus latency/overlap accounting.

    ``busy_seconds`` sums the time tasks ran; ``wait_seconds`` sums the time the generation loop
    blocked collecting them. ``overlap = 1 - wait / busy`` is the fraction of retrieval time hidden
    behind model steps (1.0 = fully hidden; synchronous retrieval gives about 0).
    """

    def __init__(self, num_threads: int = 2, *, intra_op_threads: int | None = None) -> None:
        check_positive_int("num_threads", num_threads)
        own = torch.get_num_threads()  # also fixes this thread's own intra-op count before the workers start
        if intra_op_threads is None:
            intra_op_threads = max(1, own // num_threads)
        check_positive_int("intra_op_threads", intra_op_threads)
        self.num_threads = num_threads
        #: torch intra-op threads of each worker thread (default: the caller's count / ``num_threads``,
        #: at least 1), so ``num_threads`` concurrent tasks do not oversubscribe the cores
        self.intra_op_threads = intra_op_threads
        self._pool: ThreadPoolExecutor | None = ThreadPoolExecutor(
            max_workers=num_threads, thread_name_prefix="ucm-retrieval",
            initializer=_set_intra_op_threads, initargs=(intra_op_threads,)
        )
        # start every worker thread now (each blocks until all have started), then restore the
        # process-wide count torch hands to threads started later (torch.set_num_threads sets it too)
        started = threading.Barrier(num_threads)
        for f in [self._pool.submit(started.wait) for _ in range(num_threads)]:
            f.result()
        torch.set_num_threads(own)
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
