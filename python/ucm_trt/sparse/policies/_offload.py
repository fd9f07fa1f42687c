"""Shared machinery of the CPU-retrieval (offload) policies: ESA, GSA and KVStar.

A retrieval is ONE task on the runtime's :class:`~ucm_trt.runtime.worker.RetrievalWorker` per
request, covering every layer (the worker's threads split requests, not layers); it returns the
selections of all layers as one int32 ``[L, Hkv, S]`` tensor (sorted, -1 padded). Everything a
task reads is an immutable CPU snapshot taken when it is submitted (query copies, append-only
representation stores), so a task never races the model step.

Per-layer hook: each policy keeps its per-layer reference retrieval ``_select(..., layer)``
(the functions of :mod:`ucm_trt.sparse.score` / :func:`~ucm_trt.sparse.policies.base.select_from_scores`).
A subclass that overrides ``_select`` gets it called layer by layer inside the one task (slow,
for tests and experiments); otherwise the batched path of :mod:`ucm_trt.sparse.batched` runs.

``plan`` extends each request's ``[L, Hkv, S]`` selection with the decode-generated blocks using
tensor ops, once per change (new selection or a new block), and hands out per-layer views.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ucm_trt.runtime.worker import RetrievalTicket
from ucm_trt.sparse.batched import extend_selections
from ucm_trt.sparse.policies.base import Policy, RequestView

__all__ = ["OffloadPolicy", "PendingRetrieval", "stack_layer_selections"]


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


class PendingRetrieval:
    """The one task of a retrieval submitted at ``step``; its selection covers ``num_blocks`` blocks."""

    def __init__(self, ticket: RetrievalTicket, step: int, num_blocks: int) -> None:
        self.ticket = ticket
        self.step = step
        self.num_blocks = num_blocks

    def result(self) -> torch.Tensor:
        """Wait; int32 ``[L, Hkv, S]``. A failed task raises :class:`~ucm_trt.runtime.worker.RetrievalError`."""
        return self.ticket.result()

    def peek(self) -> torch.Tensor | None:
        """The result if the task has finished successfully, else None; never waits and leaves the
        collection (and its accounting, and the surfacing of a failure) to :meth:`result`."""
        fut = self.ticket.future
        if not fut.done() or fut.exception() is not None:
            return None
        return fut.result()[0]


class OffloadPolicy(Policy):
    """Base of policies whose KV lives in the host store and whose selections come from CPU tasks."""

    offload = True

    def __init__(self) -> None:
        super().__init__()
        self._state: dict[str, dict] = {}
        self.retrievals = 0
        self.selected_blocks = 0
        self.candidate_blocks = 0

    def _layerwise(self, base: type) -> bool:
        """True when a subclass overrides ``base``'s per-layer ``_select`` hook."""
        return type(self)._select is not base._select  # type: ignore[attr-defined]

    def _submit(self, rid: str, step: int, num_blocks: int, fn: Callable[[], torch.Tensor]) -> PendingRetrieval:
        """Submit ``fn() -> [L, Hkv, S]`` (every layer of request ``rid``) as one worker task."""
        L = self.shape.num_layers
        what = f"{self.name} request {rid!r} layers 0-{L - 1} step {step}"
        return PendingRetrieval(self.rt.worker.submit(fn, what=what), step, num_blocks)

    def _per_layer(self, fn: Callable[[int], torch.Tensor]) -> Callable[[], torch.Tensor]:
        """A task running the per-layer hook ``fn(layer) -> [Hkv, S]`` over every layer."""
        L = self.shape.num_layers
        return lambda: stack_layer_selections([fn(layer) for layer in range(L)])

    def _collect(self, st: dict, pending: PendingRetrieval) -> None:
        sel = pending.result()
        L, h = self.shape.num_layers, self.shape.num_kv_heads
        if sel.dim() != 3 or tuple(sel.shape[:2]) != (L, h) or sel.dtype != torch.int32:
            raise RuntimeError(
                f"{self.name}: retrieval returned {sel.dtype} {tuple(sel.shape)}, want int32 [L={L}, Hkv={h}, S]"
            )
        st["sel"] = sel
        st["sel_nb"] = pending.num_blocks
        st["ext"] = None  # plan's cached extension is stale
        self.retrievals += 1

    def _num_blocks(self, tokens: int) -> int:
        bs = self.sparse.block_size
        return (tokens + bs - 1) // bs

    @staticmethod
    def _row_queries(queries: list[torch.Tensor], row: int) -> torch.Tensor:
        """A copy of batch row ``row`` of every layer's query: ``[L, Hq, D]`` (the runtime reuses its buffer)."""
        return torch.stack([q[row] for q in queries])

    def plan(self, reqs: list[RequestView]) -> list[list[torch.Tensor | None]]:
        L = self.shape.num_layers
        h = self.shape.num_kv_heads
        out: list[list[torch.Tensor | None]] = [[None] * len(reqs) for _ in range(L)]
        for row, req in enumerate(reqs):
            st = self._state.get(req.rid)
            if st is None:
                raise RuntimeError(f"{self.name}: request {req.rid!r} has no state (prefill did not finish)")
            if st["dense"]:
                continue
            nb_new = self._num_blocks(req.new_len)
            ext = st.get("ext")
            if ext is None or ext[0] != nb_new:
                full = extend_selections(st["sel"], st["sel_nb"], nb_new)  # [L, Hkv, S']
                ext = (nb_new, full.unbind(0), int((full >= 0).sum()))
                st["ext"] = ext
            _, layers, count = ext
            for layer in range(L):
                out[layer][row] = layers[layer]
            self.selected_blocks += count
            self.candidate_blocks += nb_new * h * L
        return out

    def prefetch(self, reqs: list[RequestView]) -> list[list[torch.Tensor | None]] | None:
        """The selection of a retrieval that has finished but is not collected yet (it is due at a
        later step of the schedule), so the runtime can load its blocks ahead of time."""
        L, h = self.shape.num_layers, self.shape.num_kv_heads
        out = None
        for row, req in enumerate(reqs):
            st = self._state.get(req.rid)
            pending = None if st is None or st["dense"] else st.get("pending")
            if pending is None:
                continue
            cached = st.get("peeked")
            if cached is None or cached[0] is not pending:
                sel = pending.peek()
                if sel is None or sel.dim() != 3 or tuple(sel.shape[:2]) != (L, h) or sel.dtype != torch.int32:
                    continue  # not ready (or malformed: collecting it will raise)
                cached = (pending, sel.unbind(0))
                st["peeked"] = cached
            if out is None:
                out = [[None] * len(reqs) for _ in range(L)]
            for layer in range(L):
                out[layer][row] = cached[1][layer]
        return out

    def on_request_end(self, rid: str) -> None:
        st = self._state.pop(rid, None)
        if st is not None and st.get("pending") is not None:
            # drain (and surface failures of) a retrieval that is still in flight
            st["pending"].result()

    def stats(self) -> dict:
        frac = self.selected_blocks / self.candidate_blocks if self.candidate_blocks else None
        return {"retrievals": self.retrievals, "selected_block_fraction": frac}
