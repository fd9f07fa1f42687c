"""Shared machinery of the CPU-retrieval (offload) policies: ESA, GSA and KVStar.

Retrieval tasks run on the runtime's :class:`~ucm_trt.runtime.worker.RetrievalWorker`; the layers
of one request are split into ``worker.num_threads`` tasks. Everything a task reads is an
immutable CPU snapshot taken when it is submitted, so a task never races the model step.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch

from ucm_trt.runtime.worker import RetrievalTicket
from ucm_trt.sparse.policies.base import Policy, RequestView, extend_selection

__all__ = ["OffloadPolicy", "PendingRetrieval"]


class PendingRetrieval:
    """Tickets of one retrieval (one per layer chunk) submitted at ``step``."""

    def __init__(self, tickets: list[tuple[range, RetrievalTicket]], step: int) -> None:
        self.tickets = tickets
        self.step = step

    def result(self, num_layers: int) -> list[torch.Tensor]:
        out: list[torch.Tensor | None] = [None] * num_layers
        for layers, t in self.tickets:
            sels = t.result()
            for layer, sel in zip(layers, sels, strict=True):
                out[layer] = sel
        return out  # type: ignore[return-value]


class OffloadPolicy(Policy):
    """Base of policies whose KV lives in the host store and whose selections come from CPU tasks."""

    offload = True

    def __init__(self) -> None:
        super().__init__()
        self._state: dict[str, dict] = {}
        self.retrievals = 0
        self.selected_blocks = 0
        self.candidate_blocks = 0

    # a retrieval: fn(layer) -> selection [Hkv, S]; run over layer chunks on the worker
    def _submit(self, rid: str, step: int, fn: Callable[[int], torch.Tensor]) -> PendingRetrieval:
        rt = self.rt
        n = self.shape.num_layers
        per = -(-n // rt.worker.num_threads)
        tickets = []
        for start in range(0, n, per):
            layers = range(start, min(n, start + per))
            task = partial(_run_layers, fn, layers)
            what = f"{self.name} request {rid!r} layers {layers.start}-{layers.stop - 1} step {step}"
            tickets.append((layers, rt.worker.submit(task, what=what)))
        return PendingRetrieval(tickets, step)

    def _collect(self, st: dict, pending: PendingRetrieval) -> None:
        st["sel"] = pending.result(self.shape.num_layers)
        self.retrievals += 1

    def _num_blocks(self, tokens: int) -> int:
        bs = self.sparse.block_size
        return (tokens + bs - 1) // bs

    def plan(self, reqs: list[RequestView]) -> list[list[torch.Tensor | None]]:
        L = self.shape.num_layers
        out: list[list[torch.Tensor | None]] = [[None] * len(reqs) for _ in range(L)]
        for row, req in enumerate(reqs):
            st = self._state.get(req.rid)
            if st is None:
                raise RuntimeError(f"{self.name}: request {req.rid!r} has no state (prefill did not finish)")
            if st["dense"]:
                continue
            nb_new = self._num_blocks(req.new_len)
            for layer in range(L):
                sel = extend_selection(st["sel"][layer], st["sel_nb"], nb_new)
                out[layer][row] = sel
                self.selected_blocks += int((sel >= 0).sum())
                self.candidate_blocks += nb_new * sel.shape[0]
        return out

    def on_request_end(self, rid: str) -> None:
        st = self._state.pop(rid, None)
        if st is not None and st.get("pending") is not None:
            # drain (and surface failures of) a retrieval that is still in flight
            st["pending"].result(self.shape.num_layers)

    def stats(self) -> dict:
        frac = self.selected_blocks / self.candidate_blocks if self.candidate_blocks else None
        return {"retrievals": self.retrievals, "selected_block_fraction": frac}


def _run_layers(fn: Callable[[int], torch.Tensor], layers: range) -> list[torch.Tensor]:
    return [fn(layer) for layer in layers]
