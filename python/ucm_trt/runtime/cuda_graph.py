"""CUDA-graph capture of the decode forward (PyTorch backend on CUDA).

A decode step launches a few hundred small kernels (the model's eager ops, the KV append, the
paged attention of every layer, on-device retrieval); at batch 1 their launch cost, not the GPU
work, sets the step time. :class:`DecodeGraphs` captures the backend's forward once per *key*
and replays it for later steps with the same key.

Why a replay is valid: every input of the forward lives in a buffer the engine allocated once
(token ids, positions, sequence lengths, KV slots, block tables, selections, the KV pools, the
query capture), and the plan rewrites those buffers in place before each step. What a capture
bakes in is the launch configuration, which depends only on

* the batch rows ``b``,
* the width of each layer's selection (``None`` = every block), which the engine rounds up to
  a multiple of :data:`SELECTION_WIDTH_BUCKET` blocks (padding is ``-1``, which the kernels skip),
* the policy's :meth:`~ucm_trt.sparse.policies.base.Policy.graph_key` (host-side decisions of its
  per-layer hooks, e.g. the GSA On-Device gate).

The first step of a key runs eagerly (it is the real step, and it compiles the Triton kernels),
then the same forward is captured without executing it; later steps replay. Waits for block copies
(:meth:`~ucm_trt.runtime.kv.KVManager.layer_waits`) are not captured: an eager step waits per layer,
a replay waits for every layer's copies before it starts. Graphs share one
memory pool; at most ``max_graphs`` are kept (least recently used dropped first).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable

import torch

__all__ = ["SELECTION_WIDTH_BUCKET", "DecodeGraphs"]

#: selection widths are rounded up to a multiple of this many blocks (fewer distinct graphs)
SELECTION_WIDTH_BUCKET = 16


class DecodeGraphs:
    """Captured decode forwards of one engine, keyed by (batch, selection widths, policy key)."""

    def __init__(self, backend, *, max_graphs: int = 32) -> None:
        if not torch.cuda.is_available() or backend.device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA backend device, got {backend.device}")
        if isinstance(max_graphs, bool) or not isinstance(max_graphs, int) or max_graphs < 1:
            raise ValueError(f"max_graphs must be an int >= 1, got {max_graphs!r}")
        self.backend = backend
        self.max_graphs = max_graphs
        self._graphs: OrderedDict[Hashable, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = OrderedDict()
        self._pool = torch.cuda.graph_pool_handle()
        self.captures = 0
        self.replays = 0

    def run(self, key: Hashable, input_ids: torch.Tensor, positions: torch.Tensor, step) -> torch.Tensor:
        """Logits ``[B, vocab]`` of this step: replayed from the graph of ``key`` or, on the first
        step of ``key``, computed eagerly and then captured."""
        hit = self._graphs.get(key)
        if hit is not None:
            self._graphs.move_to_end(key)
            graph, logits = hit
            step.wait_for_loads()  # the step's copy events, all before the replay (not per layer)
            graph.replay()
            self.replays += 1
            return logits
        logits = self.backend.forward(input_ids, positions, step)
        step.reset_for_capture()
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, pool=self._pool):
                out = self.backend.forward(input_ids, positions, step)
        except RuntimeError as exc:
            raise RuntimeError(
                "capturing the decode step in a CUDA graph failed (an op in the model or in a policy hook "
                f"reads device values on the host or is not capturable): {exc}. "
                "Run with RuntimeConfig(cuda_graph=False)."
            ) from exc
        self._graphs[key] = (graph, out)
        self.captures += 1
        while len(self._graphs) > self.max_graphs:
            self._graphs.popitem(last=False)
        # the eager logits are this step's; the captured output buffer is refilled on replay
        return logits

    def stats(self) -> dict:
        return {"cuda_graphs": len(self._graphs), "cuda_graph_captures": self.captures,
                "cuda_graph_replays": self.replays}
