"""ESA (upstream ``ucm/sparse/esa``; ucm-upstream.md §2).

* Prefill end: mean-K representation of every prompt block of every layer, kept on the host in
  one :class:`~ucm_trt.sparse.batched.BlockRepStore` ``[L, Hkv, D, nb]`` (float32 on the host, or
  on the GPU with ``RetrievalConfig(representations="device")``, see ``_offload``).
  The first selection is retrieved synchronously from the last ``PrefillWindow.tokens`` prompt
  queries (:class:`~ucm_trt.config.PrefillWindow`; ``tokens=1``, the last prompt token's query, is
  upstream's, which uses the first decode step's query, one token later): each window query scores
  the blocks, the scores are averaged (or maxed) over the window (:func:`window_block_scores`), so the
  question's tokens at the end of the prompt choose the first blocks.
* Score: ``dot`` of the GQA-averaged query with each block's mean K (upstream, ``preset="ucm"``), or
  the per-head vote (``vote=True``: each query head softmaxes its own logits over the blocks, a block scores the
  mass it gets; docs/algorithms.md); summed over KV heads for a
  shared selection; budget from :class:`~ucm_trt.config.SparseConfig` (``Budget.ratio`` as
  upstream's ``sparse_ratio``), forced sink / local windows at the prompt's end.
* Decode-generated blocks are never sparsified: every block past the prompt is selected.
* Schedule with stride ``R = SparseConfig.retrieval_stride`` and decode step ``s`` (1-based), read
  as ``s + phase`` (the request's phase, ``RetrievalConfig.stagger``; 0 for a request alone, upstream's):
  after step ``s`` with ``s % R == 2 % R`` a retrieval is submitted with that step's queries;
  after step ``s`` with ``s % R == 0`` it is collected (waited for) and the next plan loads the
  blocks that changed. Steps in between run on the previous selection, as upstream.
  ``R = 1`` and ``R = 2`` degenerate to synchronous retrieval every ``R`` steps.
* A retrieval covers all layers: one batched matmul scores every layer and KV head, one batched
  selection picks the blocks (:mod:`ucm_trt.sparse.batched`; the requests of a step that have the
  same number of blocks in one pass, see ``_offload``); ``_select`` is the per-layer reference it
  must equal.
"""

from __future__ import annotations

from functools import partial

import torch

from ucm_trt.config import PrefillWindow
from ucm_trt.sparse.batched import BlockRepStore, batched_dot_scores, select_batched
from ucm_trt.sparse.policies._offload import OffloadPolicy, OffloadRequestState, RetrievalJob
from ucm_trt.sparse.policies._reps import host_layer_vote_scores, host_vote_scores
from ucm_trt.sparse.policies.base import PolicyRuntime, RequestView, select_from_scores
from ucm_trt.sparse.representations import block_lens_from_seq_lens, block_submeans
from ucm_trt.sparse.score import dot_scores

__all__ = [
    "ESAPolicy",
    "MeanKeyPolicy",
    "check_prefill_window",
    "sub_block_layer_scores",
    "sub_block_scores",
    "sub_blocks_per_block",
    "window_block_scores",
    "window_layer_scores",
]


def check_sub_block_tokens(sub_block_tokens: object) -> int | None:
    if sub_block_tokens is not None and (isinstance(sub_block_tokens, bool) or not isinstance(sub_block_tokens, int)
                                         or sub_block_tokens < 1):
        raise ValueError(f"sub_block_tokens must be None or an int >= 1, got {sub_block_tokens!r}")
    return sub_block_tokens


def sub_blocks_per_block(name: str, sub_block_tokens: int | None, block_size: int, retrieval) -> int:
    """Sub-blocks per block for ``sub_block_tokens`` (``None``: 1, the block mean); it must divide the
    block size, and query-drift calibration reads block means only."""
    if sub_block_tokens is None:
        return 1
    if block_size % sub_block_tokens:
        raise ValueError(f"{name} sub_block_tokens ({sub_block_tokens}) must divide SparseConfig.block_size "
                         f"({block_size})")
    if retrieval.query_drift is not None:
        raise ValueError(f"{name}: RetrievalConfig.query_drift calibrates on block means; it needs "
                         f"sub_block_tokens=None, got {sub_block_tokens}")
    return block_size // sub_block_tokens


def sub_block_scores(q: torch.Tensor, reps: torch.Tensor, sub_blocks: int, vote: bool) -> torch.Tensor:
    """Block scores of every layer ``[L, Hkv, nb]`` from ``q [L, Hq, D]`` and a store of ``nb * sub_blocks``
    sub-block means ``[L, Hkv, D, nb * sub_blocks]`` (block-major, :func:`~ucm_trt.sparse.representations.block_submeans`).

    ``vote=False``: upstream's dot product of the group-averaged query with every sub-block mean, a block
    scoring its best sub-block (the max; ``sub_blocks = 1``: the block mean's dot product, upstream ESA).
    ``vote=True``: each query head softmaxes its logit estimates over every sub-block of every block
    (:func:`~ucm_trt.sparse.policies._reps.host_vote_scores`); a block scores the mass of its sub-blocks."""
    s = host_vote_scores(q, reps) if vote else batched_dot_scores(q, reps)  # [L, Hkv, nb * S]
    if sub_blocks == 1:
        return s
    s = s.reshape(*s.shape[:-1], -1, sub_blocks)
    return s.sum(-1) if vote else s.amax(-1)


def sub_block_layer_scores(q: torch.Tensor, rep: torch.Tensor, sub_blocks: int, vote: bool) -> torch.Tensor:
    """Per-layer reference of :func:`sub_block_scores`: ``q [Hq, D]``, ``rep [nb * sub_blocks, Hkv, D]``
    -> ``[Hkv, nb]``, with the functions of :mod:`ucm_trt.sparse.score`."""
    s = host_layer_vote_scores(q, rep) if vote else dot_scores(q[None], rep)[0]  # [Hkv, nb * S]
    s = s.reshape(s.shape[0], -1, sub_blocks)
    return s.sum(-1) if vote else s.amax(-1)


def check_prefill_window(prefill_window: object) -> PrefillWindow:
    """``None`` -> ``PrefillWindow()`` (one query, upstream's); a :class:`PrefillWindow` as it is."""
    if prefill_window is None:
        return PrefillWindow()
    if not isinstance(prefill_window, PrefillWindow):
        raise TypeError(f"prefill_window must be a PrefillWindow or None, got {type(prefill_window).__name__}")
    return prefill_window


def window_block_scores(q: torch.Tensor, reps: torch.Tensor, sub_blocks: int, vote: bool,
                        reduce: str = "mean") -> torch.Tensor:
    """Block scores ``[L, Hkv, nb]`` of one query per layer ``q [L, Hq, D]`` (:func:`sub_block_scores`), or
    of a window of queries ``q [L, Hq, W, D]``: every window query scores the blocks as one query does,
    and the ``W`` score vectors are combined by ``reduce`` (``mean``: each query one unit of vote;
    ``max``: a block scores its best query)."""
    if q.dim() == 3:
        return sub_block_scores(q, reps, sub_blocks, vote)
    if q.dim() != 4 or q.shape[2] < 1:
        raise ValueError(f"q must be [L, Hq, D] or [L, Hq, W, D] with W >= 1, got shape {tuple(q.shape)}")
    per = torch.stack([sub_block_scores(q[:, :, i], reps, sub_blocks, vote) for i in range(q.shape[2])])
    return _reduce_window(per, reduce)


def window_layer_scores(q: torch.Tensor, rep: torch.Tensor, sub_blocks: int, vote: bool,
                        reduce: str = "mean") -> torch.Tensor:
    """Per-layer reference of :func:`window_block_scores`: ``q [Hq, D]`` or ``[Hq, W, D]``,
    ``rep [nb * sub_blocks, Hkv, D]`` -> ``[Hkv, nb]``."""
    if q.dim() == 2:
        return sub_block_layer_scores(q, rep, sub_blocks, vote)
    per = torch.stack([sub_block_layer_scores(q[:, i], rep, sub_blocks, vote) for i in range(q.shape[1])])
    return _reduce_window(per, reduce)


def _reduce_window(per: torch.Tensor, reduce: str) -> torch.Tensor:
    if reduce == "mean":
        return per.mean(0)
    if reduce == "max":
        return per.amax(0)
    raise ValueError(f"reduce must be 'mean' or 'max', got {reduce!r}")


def first_queries(queries: list[torch.Tensor], window: int) -> torch.Tensor:
    """The first retrieval's queries from the prefill's per-layer ``[Hq, w, D]``: the last prompt query
    ``[L, Hq, D]`` for a window of 1, else the last ``window`` ones ``[L, Hq, W, D]`` (a copy; fewer when
    the prompt is shorter than the window)."""
    if window == 1:
        return torch.stack([q[:, -1] for q in queries])
    return torch.stack([q[:, -window:] for q in queries])


class MeanKeyPolicy(OffloadPolicy):
    """What ESA and GSA share: mean-K (sub-)block representations scored with a dot product or the
    per-head vote, and the first retrieval's prompt-query window. Subclasses set ``name``."""

    def __init__(self, *, vote: bool = False, sub_block_tokens: int | None = None,
                 prefill_window: PrefillWindow | None = None, retrieval=None, dense_layers=None,
                 adaptive=None, head_merge=None) -> None:
        super().__init__(retrieval=retrieval, dense_layers=dense_layers, adaptive=adaptive, head_merge=head_merge)
        if not isinstance(vote, bool):
            raise TypeError(f"vote must be a bool, got {vote!r}")
        self.vote = vote
        self.sub_block_tokens = check_sub_block_tokens(sub_block_tokens)
        self.sub_blocks = 1  # per block, set at bind from the block size
        self.prefill_window = check_prefill_window(prefill_window)
        self.query_window = self.prefill_window.tokens
        # PrefillWindow.persist: the first retrieval's block scores [L, Hkv, nb_prompt], per request
        self._priors: dict[str, torch.Tensor] = {}

    def bind(self, rt: PolicyRuntime) -> None:
        super().bind(rt)
        s = rt.sparse
        label = self.name.upper()
        if s.scoring != "dot" or s.representation != "mean":
            raise ValueError(
                f"{label} scores mean-K block representations with a dot product: SparseConfig must have "
                f"scoring='dot' and representation='mean', got scoring={s.scoring!r}, "
                f"representation={s.representation!r}"
            )
        self.sub_blocks = sub_blocks_per_block(label, self.sub_block_tokens, s.block_size, self.retrieval)


class ESAPolicy(MeanKeyPolicy):
    """ESA. ``vote``: score blocks by the per-head softmax vote
    (:func:`~ucm_trt.sparse.policies._reps.host_vote_scores`; off in the class, on in the ``default`` preset)
    instead of upstream's dot product of the group-averaged query. ``sub_block_tokens``: keep the mean K
    of every run of that many tokens (it must divide the block size) and score a block by its best
    sub-block, or with the vote by the mass of its sub-blocks (:func:`sub_block_scores`); ``None`` is
    upstream's one mean per block. The store then holds ``block_size / sub_block_tokens`` vectors per
    block (``1 / sub_block_tokens`` of the K elements; ``block_size / sub_block_tokens`` times the
    store and scoring work of one mean per block). ``prefill_window``: the prompt queries the first
    retrieval scores with (:class:`~ucm_trt.config.PrefillWindow`; ``None``: the last one, upstream's)."""

    name = "esa"

    def on_prefill_end(self, req: RequestView, queries: list[torch.Tensor]) -> None:
        nbp = self._num_blocks(req.prompt_len)
        st = OffloadRequestState(dense=nbp < self.sparse.min_blocks, sel_nb=nbp)
        st.phase = 0 if st.dense else self._new_phase()
        self._state[req.rid] = st
        if st.dense:
            return
        # diffuse layers are judged from the last prompt query (as before the window), so that the window
        # changes the first selection only
        self._decide_dense_layers(req, [q[:, -1:] for q in queries])
        kv = self.rt.kv
        shape = self.shape
        lens = block_lens_from_seq_lens(torch.tensor(req.prompt_len), nbp, self.sparse.block_size)
        lens = lens.to(kv.layout.device)
        sb = self.sub_blocks
        store = self._new_rep_store(nbp * sb)
        # each layer's (sub-)block means move to the store's device (host or GPU) as they are made
        store.append(torch.stack([block_submeans(kv.gather_keys(req.rid, layer, list(range(nbp))), lens, sb)
                                  .to(store.device) for layer in range(shape.num_layers)]))
        st.store = store
        q_last = torch.stack([q[:, -1] for q in queries])  # [L, Hq, D], a copy
        self._start_drift(req.rid, st, q_last)  # RetrievalConfig.query_drift only
        q_first = first_queries(queries, self.prefill_window.tokens)  # [L, Hq, D] or [L, Hq, W, D]
        if self.prefill_window.persist > 0:
            # the window's block scores, added (times persist) to every later retrieval of this request
            self._priors[req.rid] = window_block_scores(q_first.to(store.device), store.reps(), sb, self.vote,
                                                          self.prefill_window.reduce)
        self._collect(st, self._submit(req.rid, 0, nbp, self._task(store, nbp, q_first, self._priors.get(req.rid))))

    def on_request_end(self, rid: str) -> None:
        self._priors.pop(rid, None)
        super().on_request_end(rid)

    def _task(self, store: BlockRepStore, nbp: int, q: torch.Tensor, prior: torch.Tensor | None):
        """The retrieval of every layer from queries ``q [L, Hq, D]`` (or a prefill window ``[L, Hq, W, D]``)
        and the request's :attr:`PrefillWindow.persist` scores ``prior``: batched, or the per-layer hook."""
        if self._layerwise(ESAPolicy):
            reps = [store.layer(layer) for layer in range(self.shape.num_layers)]
            # prior passed only when set: a subclass's _select hook with the plain signature keeps working
            extra = {} if prior is None else {"prior": prior}
            return self._per_layer(partial(self._select, reps, nbp, list(q), **extra))
        return self._on_device(partial(self._select_all, store.reps(), nbp, q, prior))

    def _job(self, rid: str, step: int, store: BlockRepStore, nbp: int, q: torch.Tensor) -> RetrievalJob:
        """The retrieval of request ``rid`` as a job of the step's batch (``OffloadPolicy._submit_batch``):
        its scores are selected together with the other requests' where the batched path applies."""
        batched = self.adaptive is None and self._stream is None and not self._layerwise(ESAPolicy)
        prior = self._priors.get(rid)
        return RetrievalJob(rid=rid, step=step, num_blocks=nbp, task=self._task(store, nbp, q, prior),
                            scores=partial(self._scores, q, store.reps(), prior) if batched else None)

    def _scores(self, q: torch.Tensor, reps: torch.Tensor, prior: torch.Tensor | None) -> torch.Tensor:
        """Block scores of every layer ``[L, Hkv, nbp]``: the window's or the step query's, plus
        ``persist`` times the first retrieval's scores ``prior`` (a decode step's query, ``q [L, Hq, D]``)."""
        scores = window_block_scores(q.to(reps.device), reps, self.sub_blocks, self.vote, self.prefill_window.reduce)
        if prior is not None and q.dim() == 3:
            scores = scores + self.prefill_window.persist * prior.to(scores.device)
        return scores

    def _select_all(self, reps: torch.Tensor, nbp: int, q: torch.Tensor,
                    prior: torch.Tensor | None = None) -> torch.Tensor:
        """Every layer at once: ``reps [L, Hkv, D, nbp]``, ``q [L, Hq, D]`` or ``[L, Hq, W, D]`` (``prior``:
        :attr:`PrefillWindow.persist`'s first-retrieval scores ``[L, Hkv, nbp]``) -> ``[L, Hkv, S]``."""
        scores = self._scores(q, reps, prior)  # [L, Hkv, nbp]
        if self.adaptive is not None:
            return self._adaptive_select(scores, nbp, self._full_block_lens(nbp))
        return select_batched(scores, nbp, self.sparse, "dot", self.shape.num_kv_heads)

    def _select(self, reps: list[torch.Tensor], nbp: int, qs: list[torch.Tensor], layer: int, *,
                prior: torch.Tensor | None = None) -> torch.Tensor:
        """Per-layer reference (and hook): ``reps[layer] [nbp * sub_blocks, Hkv, D]``, ``qs[layer] [Hq, D]``
        (or a prefill window ``[Hq, W, D]``) -> ``[Hkv, S]``."""
        scores = window_layer_scores(qs[layer], reps[layer], self.sub_blocks, self.vote,
                                     self.prefill_window.reduce)  # [Hkv, nbp]
        if prior is not None and qs[layer].dim() == 2:
            scores = scores + self.prefill_window.persist * prior[layer].to(scores.device)
        if self.adaptive is not None:
            return self._adaptive_select(scores[None], nbp, self._full_block_lens(nbp))[0]
        return select_from_scores(scores, nbp, self.sparse, "dot", self.shape.num_kv_heads)

    def collects_ahead(self) -> bool:
        """At stride >= 3 a collection (after ``s % R == 0``) never falls on a submitting step
        (``s % R == 2``); at stride 1-2 it collects the retrieval that step's ``after_step`` submits."""
        return self.sparse.retrieval_stride >= 3

    def collect(self, reqs: list[RequestView]) -> None:
        if self.collects_ahead():
            self._collect_due(reqs)

    def after_step(self, reqs: list[RequestView], queries) -> None:
        """The step's retrievals are submitted as one batch (``OffloadPolicy._submit_batch``: one task
        per worker thread, not one per request); the due ones are collected by :meth:`collect`
        (at stride 1-2, here, after the submission: they are this step's)."""
        r = self.sparse.retrieval_stride
        submit: list[tuple[int, RequestView, OffloadRequestState]] = []
        for row, req in enumerate(reqs):
            st = self._state[req.rid]
            if not st.dense and (req.step + st.phase) % r == 2 % r:
                submit.append((row, req, st))
        if submit:
            fills: list = []  # the synthetic query draws (QueryDrift), made on the worker threads
            qs = self._batch_queries(queries, [row for row, _, _ in submit], [req for _, req, _ in submit], fills=fills)
            jobs = self._with_fills([self._job(req.rid, req.step, st.store, st.sel_nb, q)
                                     for (_, req, st), q in zip(submit, qs, strict=True)], fills)
            for (_, _, st), pending in zip(submit, self._submit_batch(jobs), strict=True):
                st.pending = pending
        if not self.collects_ahead():
            self._collect_due(reqs)

    def _collect_due(self, reqs: list[RequestView]) -> None:
        """Collect the retrievals due after step ``reqs`` (``(s + phase) % R == 0``, from the step whose
        retrieval was submitted at step 1 or later: ``s >= R - 1``), request by request."""
        r = self.sparse.retrieval_stride
        for req in reqs:
            st = self._state[req.rid]
            if st.dense or (req.step + st.phase) % r or req.step < r - 1:
                continue
            if st.pending is None:
                raise RuntimeError(f"esa: request {req.rid!r} step {req.step}: no retrieval to collect")
            self._collect(st, st.pending)
            st.pending = None
