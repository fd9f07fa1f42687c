"""GSA with CPU top-k and a prefetch engine (upstream ``ucm/sparse/gsa``; ucm-upstream.md §3).

* Block representation: mean K of every *completed* block, computed when the block fills (at the
  end of prefill for the prompt, after the decode step that fills it later), kept on the host in
  one append-only :class:`~ucm_trt.sparse.batched.BlockRepStore` ``[L, Hkv, D, nb]`` (float32 on the
  host, or on the GPU with ``RetrievalConfig(representations="device")``, see ``_offload``).
* Score: ``dot`` of the GQA-averaged query with the block means, summed over KV heads
  (``score = sum_h q_h . kpre_h``, upstream's one-representation case; ``preset="ucm"``), or the
  per-head vote (``vote=True``, see ESA); candidates are every
  block of the current sequence outside the sink / local windows, so decode blocks are
  retrievable too. ``prefetch_blocks`` extra candidates (upstream ``NUM_PREFETCH_BLOCKS = 1``)
  are kept beyond the budget.
* First retrieval (prefill end): from the last ``PrefillWindow.tokens`` prompt queries, as ESA's.
* Cadence with ``R = SparseConfig.retrieval_stride`` (upstream 3): after decode step ``s`` with
  ``(s + phase) % R == 0`` (the request's phase, ``RetrievalConfig.stagger``; 0 for a request alone,
  upstream's) and no retrieval in flight a retrieval is submitted; it is collected after
  step ``s + 1`` and used from step ``s + 2`` on — the selection always lags one step, so the
  retrieval overlaps a whole model step. This is deterministic (upstream consumes whatever has
  finished, which makes the lag timing-dependent).
* A retrieval covers all layers (one batched matmul, one batched selection;
  :mod:`ucm_trt.sparse.batched`; a step's retrievals share the worker's tasks, see ``_offload``);
  ``_select`` is the per-layer reference it must equal.
* The prefetch engine: the runtime's working set diffs each new selection against the resident
  blocks of every layer and loads only the misses (delta prefetch), keeping an LRU cache.
"""

from __future__ import annotations

from functools import partial

import torch

from ucm_trt._validation import check_non_negative_int
from ucm_trt.config import PrefillWindow
from ucm_trt.sparse.batched import BlockRepStore, select_batched
from ucm_trt.sparse.policies._offload import OffloadRequestState, RetrievalConfig, RetrievalJob
from ucm_trt.sparse.policies.base import RequestView, select_from_scores
from ucm_trt.sparse.policies.esa import (
    MeanKeyPolicy,
    first_queries,
    window_block_scores,
    window_layer_scores,
)
from ucm_trt.sparse.representations import block_submeans

__all__ = ["GSAPolicy"]


class GSAPolicy(MeanKeyPolicy):
    name = "gsa"

    def __init__(self, *, prefetch_blocks: int = 1, vote: bool = False, sub_block_tokens: int | None = None,
                 prefill_window: PrefillWindow | None = None, retrieval: RetrievalConfig | None = None,
                 dense_layers=None, adaptive=None, head_merge=None) -> None:
        """``vote``: per-head softmax vote scoring; ``sub_block_tokens``: a mean K per run of that many
        tokens, a block scoring its best sub-block (``None``: upstream's block mean); ``prefill_window``:
        the prompt queries the first retrieval scores with (``None``: the last one); see ESA."""
        super().__init__(vote=vote, sub_block_tokens=sub_block_tokens, prefill_window=prefill_window,
                         retrieval=retrieval, dense_layers=dense_layers, adaptive=adaptive, head_merge=head_merge)
        self.prefetch_blocks = check_non_negative_int("prefetch_blocks", prefetch_blocks)

    def _update_reps(self, rid: str, st: OffloadRequestState, tokens: int) -> None:
        bs = self.sparse.block_size
        store: BlockRepStore = st.store
        sb = self.sub_blocks
        full = tokens // bs
        done = store.num_blocks // sb  # the store holds sub_blocks vectors per block
        if full <= done:
            return
        kv = self.rt.kv
        blocks = list(range(done, full))
        lens = torch.full((len(blocks),), bs, dtype=torch.int32, device=kv.layout.device)
        store.append(torch.stack([block_submeans(kv.gather_keys(rid, layer, blocks), lens, sb).to(store.device)
                                  for layer in range(self.shape.num_layers)]))

    def on_prefill_end(self, req: RequestView, queries: list[torch.Tensor]) -> None:
        nb = self._num_blocks(req.prompt_len)
        store = self._new_rep_store(max(nb, 16) * self.sub_blocks)
        st = OffloadRequestState(dense=False, store=store, phase=self._new_phase())
        self._state[req.rid] = st
        # diffuse layers judged from the last prompt query, as before the window (ESA)
        self._decide_dense_layers(req, [q[:, -1:] for q in queries])
        self._update_reps(req.rid, st, req.prompt_len)
        q_last = torch.stack([q[:, -1] for q in queries])  # [L, Hq, D], a copy
        self._start_drift(req.rid, st, q_last)  # RetrievalConfig.query_drift only
        q_first = first_queries(queries, self.prefill_window.tokens)  # [L, Hq, D] or [L, Hq, W, D]
        if self.prefill_window.persist > 0:
            # the window's block scores, added (times persist) to every later retrieval of this request
            reps = st.store.reps()
            self._priors[req.rid] = window_block_scores(q_first.to(reps.device), reps, self.sub_blocks, self.vote,
                                                        self.prefill_window.reduce)
        self._collect(st, self._retrieve(req.rid, st, nb, q_first, 0))

    def on_request_end(self, rid: str) -> None:
        self._priors.pop(rid, None)
        super().on_request_end(rid)

    def _retrieve(self, rid: str, st: OffloadRequestState, nb: int, q: torch.Tensor, step: int):
        return self._submit_batch([self._job(rid, st, nb, q, step)])[0]

    def _job(self, rid: str, st: OffloadRequestState, nb: int, q: torch.Tensor, step: int) -> RetrievalJob:
        """The retrieval of request ``rid`` as a job of the step's batch (``OffloadPolicy._submit_batch``)."""
        store: BlockRepStore = st.store
        # snapshot: the store is append-only, so this view of the blocks so far never changes
        reps = store.reps()
        prior = self._priors.get(rid)
        if self._layerwise(GSAPolicy):
            per = [reps[layer].permute(2, 0, 1) for layer in range(self.shape.num_layers)]
            # prior passed only when set: a subclass's _select hook with the plain signature keeps working
            extra = {} if prior is None else {"prior": prior}
            return RetrievalJob(rid=rid, step=step, num_blocks=nb,
                                task=self._per_layer(partial(self._select, per, nb, list(q), **extra)))
        batched = self.adaptive is None and self._stream is None
        return RetrievalJob(rid=rid, step=step, num_blocks=nb,
                            task=self._on_device(partial(self._select_all, reps, nb, q, prior)),
                            scores=partial(self._scores_all, reps, nb, q, prior) if batched else None,
                            extra=self.prefetch_blocks)

    def _add_prior(self, scores: torch.Tensor, q: torch.Tensor, prior: torch.Tensor | None) -> torch.Tensor:
        """``scores [..., nb]`` plus ``persist`` times the first retrieval's scores of the prompt blocks
        (a decode step's query only: ``q`` without a window axis)."""
        if prior is None or q.dim() == scores.dim() + 1:
            return scores
        n = prior.shape[-1]
        scores[..., :n] += self.prefill_window.persist * prior.to(scores.device)
        return scores

    def _scores_all(self, reps: torch.Tensor, nb: int, q: torch.Tensor,
                    prior: torch.Tensor | None = None) -> torch.Tensor:
        """Per-KV-head scores ``[L, Hkv, nb]`` (blocks without a representation yet score 0) from ``q [L, Hq, D]``
        (or the prefill window ``[L, Hq, W, D]``), plus ``prior`` (the first retrieval's scores,
        :attr:`PrefillWindow.persist`)."""
        scores = torch.zeros(self.shape.num_layers, self.shape.num_kv_heads, nb, device=reps.device)
        if reps.shape[-1]:
            qd = q.to(reps.device)
            scores[..., : reps.shape[-1] // self.sub_blocks] = window_block_scores(
                qd, reps, self.sub_blocks, self.vote, self.prefill_window.reduce)
        return self._add_prior(scores, q, prior)

    def _select_all(self, reps: torch.Tensor, nb: int, q: torch.Tensor,
                    prior: torch.Tensor | None = None) -> torch.Tensor:
        """Every layer at once: ``reps [L, Hkv, D, n_rep]``, ``q [L, Hq, D]`` or ``[L, Hq, W, D]``, ``prior``
        (:meth:`_scores_all`) -> ``[L, Hkv, S]``."""
        scores = self._scores_all(reps, nb, q, prior)
        if self.adaptive is not None:
            return self._adaptive_select(scores, nb, self._full_block_lens(nb), extra=self.prefetch_blocks)
        return select_batched(scores, nb, self.sparse, "dot", self.shape.num_kv_heads, extra=self.prefetch_blocks)

    def _select(self, reps: list[torch.Tensor], nb: int, qs: list[torch.Tensor], layer: int, *,
                prior: torch.Tensor | None = None) -> torch.Tensor:
        """Per-layer reference (and hook): ``reps[layer] [n_rep * sub_blocks, Hkv, D]``, ``qs[layer] [Hq, D]``
        (or the prefill window ``[Hq, W, D]``)."""
        r = reps[layer]
        scores = torch.zeros(self.shape.num_kv_heads, nb)
        if r.shape[0]:
            scores[:, : r.shape[0] // self.sub_blocks] = window_layer_scores(qs[layer], r, self.sub_blocks,
                                                                             self.vote, self.prefill_window.reduce)
        scores = self._add_prior(scores, qs[layer], None if prior is None else prior[layer])
        if self.adaptive is not None:
            return self._adaptive_select(scores[None], nb, self._full_block_lens(nb), extra=self.prefetch_blocks)[0]
        return select_from_scores(scores, nb, self.sparse, "dot", self.shape.num_kv_heads,
                                  extra=self.prefetch_blocks)

    def collect(self, reqs: list[RequestView]) -> None:
        """The collection due after step ``s``: the retrieval submitted after step ``s - 1``."""
        for req in reqs:
            st = self._state[req.rid]
            pending = st.pending
            if pending is not None and pending.step == req.step - 1:
                self._collect(st, pending)
                st.pending = None

    def after_step(self, reqs: list[RequestView], queries) -> None:
        """Per request (after :meth:`collect`): new block representations; the step's new retrievals
        are submitted as one batch (``OffloadPolicy._submit_batch``)."""
        r = self.sparse.retrieval_stride
        submit: list[tuple[int, RequestView, OffloadRequestState]] = []
        for row, req in enumerate(reqs):
            st = self._state[req.rid]
            s = req.step
            self._update_reps(req.rid, st, req.new_len)
            if (s + st.phase) % r == 0 and st.pending is None:
                submit.append((row, req, st))
        if submit:
            fills: list = []  # the synthetic query draws (QueryDrift), made on the worker threads
            qs = self._batch_queries(queries, [row for row, _, _ in submit], [req for _, req, _ in submit], fills=fills)
            jobs = self._with_fills([self._job(req.rid, st, self._num_blocks(req.new_len), q, req.step)
                                     for (_, req, st), q in zip(submit, qs, strict=True)], fills)
            for (_, _, st), pending in zip(submit, self._submit_batch(jobs), strict=True):
                st.pending = pending
