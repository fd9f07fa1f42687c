"""Dense prefills kept by prompt and replayed by other engines over the same backend.

Every algorithm prefills densely (its policy selects from the first decode step on), so engines that
differ only in their policy compute the same prompt K/V, the same last-token logits and the same
captured queries. A :class:`PrefillCache` handed to several engines (``Engine(...,
prefill_cache=cache)``) records a prompt's prefill in the first engine that computes it and replays it
in the others: each chunk's K/V go into the pool through the step's own append path (so the policy's
``on_append`` hooks run as after a computed chunk: GSA On-Device's hash codes, offload write-backs),
``on_prefill_end`` gets the recorded queries (the policy's own query window of them) and the first
token is sampled from the recorded logits. What the retrieval grids (issue 15) need: one prefill per
prompt instead of one per method.

A recording is keyed by the prompt, its chunk boundaries and the pool dtype; an engine whose chunking
differs computes its own prefill. ReRoPE policies (their pool holds un-rotated K) cannot use a cache
(:class:`~ucm_trt.runtime.engine.Engine` refuses it), and neither can a prefill in which the policy
selected blocks (:meth:`Policy.layer_selection` returning a selection): such a recording is dropped.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch

__all__ = ["PrefillCache", "PrefillRecording"]


@dataclass(frozen=True)
class PrefillRecording:
    """One prompt's dense prefill: per chunk, per layer, the ``(k, v)`` ``[1, Hkv, T, D]`` the step
    appended; per layer the queries of the last ``query_window`` prompt tokens ``[Hq, W, D]`` (float32,
    host); the last token's logits (float32, as the backend returned them)."""

    kv: tuple[tuple[tuple[torch.Tensor, torch.Tensor], ...], ...]
    queries: tuple[torch.Tensor, ...]
    logits: torch.Tensor

    @property
    def nbytes(self) -> int:
        tensors = [t for chunk in self.kv for pair in chunk for t in pair] + [*self.queries, self.logits]
        return sum(t.numel() * t.element_size() for t in tensors)


class PrefillCache:
    """Recorded prefills of one backend, least recently used evicted past ``max_bytes``.

    Parameters
    ----------
    backend:
        The backend every engine using this cache runs (the recordings are its model's K/V).
    query_window:
        Prompt queries kept per layer (the engines capture this many; a policy whose query window is
        larger cannot use the cache).
    max_bytes:
        Bound on the recordings held (K/V on the backend's device, queries on the host); a recording
        larger than it is not kept.
    """

    def __init__(self, backend, *, query_window: int = 32, max_bytes: int = 4 << 30) -> None:
        from ucm_trt.runtime.backends.base import Backend

        if not isinstance(backend, Backend):
            raise TypeError(f"backend must be a ucm_trt Backend, got {type(backend).__name__}")
        if isinstance(query_window, bool) or not isinstance(query_window, int) or query_window < 1:
            raise ValueError(f"query_window must be an int >= 1, got {query_window!r}")
        if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 0:
            raise ValueError(f"max_bytes must be an int >= 0, got {max_bytes!r}")
        self.backend = backend
        self.query_window = query_window
        self.max_bytes = max_bytes
        self._entries: OrderedDict[tuple, PrefillRecording] = OrderedDict()
        self._bytes = 0
        self.hits = 0
        self.misses = 0

    @staticmethod
    def key(prompt: list[int], bounds: list[int], dtype: torch.dtype) -> tuple:
        return (tuple(prompt), tuple(bounds), str(dtype))

    def lookup(self, key: tuple) -> PrefillRecording | None:
        rec = self._entries.get(key)
        if rec is None:
            self.misses += 1
            return None
        self._entries.move_to_end(key)
        self.hits += 1
        return rec

    def store(self, key: tuple, rec: PrefillRecording) -> None:
        size = rec.nbytes
        if size > self.max_bytes:
            return
        old = self._entries.pop(key, None)
        if old is not None:
            self._bytes -= old.nbytes
        while self._entries and self._bytes + size > self.max_bytes:
            _, dropped = self._entries.popitem(last=False)
            self._bytes -= dropped.nbytes
        self._entries[key] = rec
        self._bytes += size

    def clear(self) -> None:
        self._entries.clear()
        self._bytes = 0

    def __len__(self) -> int:
        return len(self._entries)

    def stats(self) -> dict:
        return {"prefill_cache_entries": len(self._entries), "prefill_cache_bytes": self._bytes,
                "prefill_cache_hits": self.hits, "prefill_cache_misses": self.misses}
