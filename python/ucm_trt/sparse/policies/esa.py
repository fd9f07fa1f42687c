"""ESA (upstream ``ucm/sparse/esa``; ucm-upstream.md §2).

* Prefill end: mean-K representation of every prompt block of every layer, kept on the host in
  one :class:`~ucm_trt.sparse.batched.BlockRepStore` ``[L, Hkv, D, nb]`` (float32 on the host, or
  on the GPU with ``RetrievalConfig(representations="device")``, see ``_offload``).
  The first selection is retrieved synchronously from the last prompt token's query (upstream uses
  the first decode step's query; ours is one token older, which lets the runtime prefetch the
  blocks before the first decode step).
* Score: ``dot`` of the GQA-averaged query with each block's mean K (upstream, ``preset="ucm"``), or
  the per-head vote (``vote=True``: each query head softmaxes its own logits over the blocks, a block scores the
  mass it gets; docs/algorithms.md); summed over KV heads for a
  shared selection; budget from :class:`~ucm_trt.config.SparseConfig` (``Budget.ratio`` as
  upstream's ``sparse_ratio``), forced sink / local windows at the prompt's end.
* Decode-generated blocks are never sparsified: every block past the prompt is selected.
* Schedule with stride ``R = SparseConfig.retrieval_stride`` and decode step ``s`` (1-based):
  after step ``s`` with ``s % R == 2 % R`` a retrieval is submitted with that step's queries;
  after step ``s`` with ``s % R == 0`` it is collected (waited for) and the next plan loads the
  blocks that changed. Steps in between run on the previous selection, as upstream.
  ``R = 1`` and ``R = 2`` degenerate to synchronous retrieval every ``R`` steps.
* A retrieval is one worker task for all layers: one batched matmul scores every layer and KV
  head, one batched selection picks the blocks (:mod:`ucm_trt.sparse.batched`); ``_select`` is the
  per-layer reference it must equal.
"""

from __future__ import annotations

from functools import partial

import torch

from ucm_trt.sparse.batched import BlockRepStore, batched_dot_scores, select_batched
from ucm_trt.sparse.policies._offload import OffloadPolicy
from ucm_trt.sparse.policies._reps import host_layer_vote_scores, host_vote_scores
from ucm_trt.sparse.policies.base import PolicyRuntime, RequestView, select_from_scores
from ucm_trt.sparse.repr import block_lens_from_seq_lens, block_mean
from ucm_trt.sparse.score import dot_scores

__all__ = ["ESAPolicy"]


class ESAPolicy(OffloadPolicy):
    """ESA. ``vote``: score blocks by the per-head softmax vote
    (:func:`~ucm_trt.sparse.policies._reps.host_vote_scores`; off by default)
    instead of upstream's dot product of the group-averaged query."""

    name = "esa"

    def __init__(self, *, vote: bool = False, retrieval=None, dense_layers=None, adaptive=None) -> None:
        super().__init__(retrieval=retrieval, dense_layers=dense_layers, adaptive=adaptive)
        if not isinstance(vote, bool):
            raise TypeError(f"vote must be a bool, got {vote!r}")
        self.vote = vote

    def bind(self, rt: PolicyRuntime) -> None:
        super().bind(rt)
        s = rt.sparse
        if s.scoring != "dot" or s.representation != "mean":
            raise ValueError(
                "ESA scores mean-K block representations with a dot product: SparseConfig must have "
                f"scoring='dot' and representation='mean', got scoring={s.scoring!r}, "
                f"representation={s.representation!r}"
            )

    def on_prefill_end(self, req: RequestView, queries: list[torch.Tensor]) -> None:
        nbp = self._num_blocks(req.prompt_len)
        st = {"dense": nbp < self.sparse.min_blocks, "sel_nb": nbp, "pending": None}
        self._state[req.rid] = st
        if st["dense"]:
            return
        self._decide_dense_layers(req, queries)
        kv = self.rt.kv
        shape = self.shape
        lens = block_lens_from_seq_lens(torch.tensor(req.prompt_len), nbp, self.sparse.block_size)
        lens = lens.to(kv.layout.device)
        store = self._new_rep_store(nbp)
        # each layer's means move to the store's device (host or GPU) as they are made
        store.append(torch.stack([block_mean(kv.gather_keys(req.rid, layer, list(range(nbp))), lens).to(store.device)
                                  for layer in range(shape.num_layers)]))
        st["store"] = store
        q_last = torch.stack([q[:, -1] for q in queries])  # [L, Hq, D], a copy
        self._start_drift(req.rid, st, q_last)  # RetrievalConfig.query_drift only
        self._collect(st, self._submit(req.rid, 0, nbp, self._task(store, nbp, q_last)))

    def _task(self, store: BlockRepStore, nbp: int, q: torch.Tensor):
        """The retrieval of every layer from queries ``q [L, Hq, D]``: batched, or the per-layer hook."""
        if self._layerwise(ESAPolicy):
            reps = [store.layer(layer) for layer in range(self.shape.num_layers)]
            return self._per_layer(partial(self._select, reps, nbp, list(q)))
        return self._on_device(partial(self._select_all, store.reps(), nbp, q))

    def _select_all(self, reps: torch.Tensor, nbp: int, q: torch.Tensor) -> torch.Tensor:
        """Every layer at once: ``reps [L, Hkv, D, nbp]``, ``q [L, Hq, D]`` -> ``[L, Hkv, S]``."""
        qd = q.to(reps.device)
        scores = host_vote_scores(qd, reps) if self.vote else batched_dot_scores(qd, reps)  # [L, Hkv, nbp]
        if self.adaptive is not None:
            return self._adaptive_select(scores, nbp, self._full_block_lens(nbp))
        return select_batched(scores, nbp, self.sparse, "dot", self.shape.num_kv_heads)

    def _select(self, reps: list[torch.Tensor], nbp: int, qs: list[torch.Tensor], layer: int) -> torch.Tensor:
        """Per-layer reference (and hook): ``reps[layer] [nbp, Hkv, D]``, ``qs[layer] [Hq, D]`` -> ``[Hkv, S]``."""
        if self.vote:
            scores = host_layer_vote_scores(qs[layer], reps[layer])
        else:
            scores = dot_scores(qs[layer][None], reps[layer])[0]  # [Hkv, nbp]
        if self.adaptive is not None:
            return self._adaptive_select(scores[None], nbp, self._full_block_lens(nbp))[0]
        return select_from_scores(scores, nbp, self.sparse, "dot", self.shape.num_kv_heads)

    def after_step(self, reqs: list[RequestView], queries: list[torch.Tensor]) -> None:
        r = self.sparse.retrieval_stride
        for row, req in enumerate(reqs):
            st = self._state[req.rid]
            if st["dense"]:
                continue
            s = req.step
            if s % r == 2 % r:
                q = self._step_queries(queries, row, req)
                st["pending"] = self._submit(req.rid, s, st["sel_nb"], self._task(st["store"], st["sel_nb"], q))
            if s % r == 0:
                if st["pending"] is None:
                    raise RuntimeError(f"esa: request {req.rid!r} step {s}: no retrieval to collect")
                self._collect(st, st["pending"])
                st["pending"] = None
