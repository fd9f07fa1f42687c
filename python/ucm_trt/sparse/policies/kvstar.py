"""KVStar multi-step retrieval (upstream ``ucm/sparse/kvstar``; ucm-upstream.md §6).

* Prefill end, per layer: channel pruning (the ``KVStarConfig.kept_channels(D)`` channels with the
  largest mean |K| over the prompt, per KV head) and token merge (every ``token_merge`` tokens of
  a block averaged), i.e. :func:`ucm_trt.sparse.representations.kvstar_subblock`, kept on the host in fp16.
  The queries of the last ``R`` prompt tokens form the "prefill" voting group; the first
  selection is retrieved from it synchronously.
* Score: multi-query softmax voting (:func:`ucm_trt.sparse.score.kvstar_vote_scores`): each query
  (pruned to its KV head's channels, no 1/sqrt(d)) softmaxes over the sub-blocks of the candidate
  (non-window) prompt blocks; a block's score is the mass it receives, summed over queries, heads
  and sub-tokens.
* Schedule with ``R = KVStarConfig.retrieval_stride`` and decode step ``s``: every step's query is
  stored; after step ``s % R == 0`` the group of the last ``R`` queries is submitted; from
  ``s >= 2R`` the retrieval submitted at ``s - R`` is collected at the same point, so queries of
  steps ``[1..R]`` choose the blocks of steps ``[2R+1..3R]`` (one-stride lag, retrieval overlaps a
  whole stride). Decode-generated blocks are never sparsified.
* A retrieval covers all layers (a step's retrievals share the worker's tasks, see ``_offload``): the vote per layer on the layer's
  :class:`PreparedVote` (float32, allowed positions only, laid out for one batched matmul; the
  softmax weights ``[Hq, Tv, positions]`` are too large to stack over layers), then one batched
  selection over all layers (:mod:`ucm_trt.sparse.batched`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial

import torch

from ucm_trt.config import KVStarConfig
from ucm_trt.sparse.batched import select_batched
from ucm_trt.sparse.policies._offload import OffloadPolicy, OffloadRequestState, RetrievalConfig, RetrievalJob
from ucm_trt.sparse.policies.base import PolicyRuntime, RequestView, select_from_scores
from ucm_trt.sparse.representations import SubBlockRepr, block_lens_from_seq_lens, kvstar_subblock
from ucm_trt.sparse.select import candidate_mask

__all__ = ["KVStarPolicy", "KVStarRequestState", "PreparedVote"]


class PreparedVote:
    """One layer's sub-block representations laid out for fast voting on the CPU.

    :func:`ucm_trt.sparse.score.kvstar_vote_scores` converts the fp16 store to float32, permutes it
    and masks the excluded positions on every call. Here that is done once at prefill end: only the
    allowed positions (non-empty sub-blocks of candidate blocks) are kept, as float32 ``[Hkv, d', n]``,
    so a vote is one batched matmul ``[Hkv, G*Tv, d'] x [Hkv, d', n]``, a softmax and an
    ``index_add`` of each position's mass into its block. Same scores as ``kvstar_vote_scores``
    (up to float32 summation order; tested).
    """

    def __init__(self, sub: SubBlockRepr, cand: torch.Tensor) -> None:
        vals, counts, ch = sub.values, sub.counts, sub.channels
        if vals.dim() != 4:
            raise ValueError(f"sub.values must be [nb, M, Hkv, d'], got shape {tuple(vals.shape)}")
        nb, m, hkv, dp = vals.shape
        if cand.dtype != torch.bool or tuple(cand.shape) != (nb,):
            raise ValueError(f"cand must be a bool [nb={nb}] mask, got {cand.dtype} {tuple(cand.shape)}")
        allowed = ((counts > 0) & cand[:, None]).reshape(-1)
        cols = torch.nonzero(allowed)[:, 0]
        self.nb = nb
        self.block_of = cols // m  # block of each kept position
        self.vt = vals.reshape(nb * m, hkv, dp)[cols].float().permute(1, 2, 0).contiguous()  # [Hkv, d', n]
        self.channels = ch.to(torch.int64)  # [Hkv, d']

    def scores(self, q: torch.Tensor) -> torch.Tensor:
        """``q [Hq, Tv, D]`` (the voting queries) -> float32 per-KV-head scores ``[Hkv, nb]``."""
        hq, tv, d = q.shape
        hkv, dp, n = self.vt.shape
        g = hq // hkv
        out = torch.zeros(hkv, self.nb)
        if n == 0:
            return out  # no allowed position: nothing to vote for
        qp = torch.gather(q.float().reshape(hkv, g * tv, d), -1, self.channels[:, None, :].expand(hkv, g * tv, dp))
        mass = torch.softmax(torch.bmm(qp, self.vt), dim=-1).sum(1)  # [Hkv, n]
        return out.index_add_(1, self.block_of, mass)


@dataclass(eq=False, kw_only=True)
class KVStarRequestState(OffloadRequestState):
    """:class:`OffloadRequestState` plus KVStar's per-layer prepared votes (one :class:`PreparedVote` per
    layer, from the prompt's sub-blocks) and the decode queries gathered since the last retrieval
    (each ``[L, Hq, D]``)."""

    votes: list[PreparedVote] = field(default_factory=list)
    group: list[torch.Tensor] = field(default_factory=list)


class KVStarPolicy(OffloadPolicy):
    name = "kvstar"
    device_representations = False  # its sub-block votes run on the CPU

    def __init__(self, config: KVStarConfig | None = None, *, retrieval: RetrievalConfig | None = None,
                 dense_layers=None, head_merge=None) -> None:
        super().__init__(retrieval=retrieval, dense_layers=dense_layers, head_merge=head_merge)
        if self.retrieval.rep_dtype != torch.float32:
            raise ValueError(
                "KVStar stores its sub-block representations in float16 and votes in float32; "
                f"RetrievalConfig.rep_dtype must stay torch.float32, got {self.retrieval.rep_dtype}"
            )
        if config is None:
            config = KVStarConfig()
        if not isinstance(config, KVStarConfig):
            raise TypeError(f"config must be a KVStarConfig, got {type(config).__name__}")
        self.config = config
        self.query_window = config.retrieval_stride

    def bind(self, rt: PolicyRuntime) -> None:
        super().bind(rt)
        s = rt.sparse
        if s.scoring != "kvstar_vote" or s.representation != "subblock":
            raise ValueError(
                "KVStar votes over sub-block representations: SparseConfig must have "
                f"scoring='kvstar_vote' and representation='subblock', got scoring={s.scoring!r}, "
                f"representation={s.representation!r}"
            )
        if s.retrieval_stride not in (1, self.config.retrieval_stride):
            raise ValueError(
                f"KVStar uses KVStarConfig.retrieval_stride ({self.config.retrieval_stride}); "
                f"SparseConfig.retrieval_stride must be 1 or equal to it, got {s.retrieval_stride}"
            )
        self.config.check_block_size(s.block_size)

    def on_prefill_end(self, req: RequestView, queries: list[torch.Tensor]) -> None:
        nbp = self._num_blocks(req.prompt_len)
        st = KVStarRequestState(dense=nbp < self.sparse.min_blocks, sel_nb=nbp)
        self._state[req.rid] = st
        if st.dense:
            return
        self._decide_dense_layers(req, queries)
        kv = self.rt.kv
        lens = block_lens_from_seq_lens(torch.tensor(req.prompt_len), nbp, self.sparse.block_size)
        cand = candidate_mask(torch.tensor([nbp], dtype=torch.int32), nbp, sink_blocks=self.sparse.sink_blocks,
                              local_blocks=self.sparse.local_blocks, min_blocks=self.sparse.min_blocks)[0]
        votes = []
        for layer in range(self.shape.num_layers):
            sub = kvstar_subblock(kv.gather_keys(req.rid, layer, list(range(nbp))), lens.to(kv.layout.device),
                                  self.config)
            # stored in fp16 as upstream, then laid out for voting (float32, allowed positions only)
            sub = SubBlockRepr(values=sub.values.to("cpu", torch.float16), counts=sub.counts.cpu(),
                               channels=sub.channels.cpu())
            votes.append(PreparedVote(sub, cand))
        st.votes = votes
        group = [q.clone() for q in queries]  # per layer [Hq, W, D]; the runtime reuses its buffer
        self._start_drift(req.rid, st, torch.stack([q[:, -1] for q in queries]))  # query_drift only
        self._collect(st, self._submit(req.rid, 0, nbp, self._task(st, group)))

    def _task(self, st: KVStarRequestState, group: list[torch.Tensor]):
        if self._layerwise(KVStarPolicy):
            return self._per_layer(partial(self._select, st, group))
        return partial(self._select_all, st, group)

    def _layer_scores(self, st: KVStarRequestState, group: list[torch.Tensor], layer: int) -> torch.Tensor:
        # group[layer]: [Hq, Tv, D] -> per-KV-head vote scores [Hkv, nbp]
        return st.votes[layer].scores(group[layer])

    def _scores_all(self, st: KVStarRequestState, group: list[torch.Tensor]) -> torch.Tensor:
        """The votes per layer (the vote materialises ``[Hq, Tv, nb * M]`` softmax weights, too large
        to stack over layers) -> per-KV-head scores ``[L, Hkv, nb]``."""
        return torch.stack([self._layer_scores(st, group, layer) for layer in range(self.shape.num_layers)])

    def _select_all(self, st: KVStarRequestState, group: list[torch.Tensor]) -> torch.Tensor:
        """Every layer: :meth:`_scores_all`, then one batched selection -> ``[L, Hkv, S]``."""
        scores = self._scores_all(st, group)
        return select_batched(scores, st.sel_nb, self.sparse, "kvstar_vote", self.shape.num_kv_heads)

    def _select(self, st: KVStarRequestState, group: list[torch.Tensor], layer: int) -> torch.Tensor:
        """Per-layer reference (and hook) -> ``[Hkv, S]``."""
        scores = self._layer_scores(st, group, layer)
        return select_from_scores(scores, st.sel_nb, self.sparse, "kvstar_vote", self.shape.num_kv_heads)

    def _job(self, rid: str, step: int, st: KVStarRequestState, group: list[torch.Tensor]) -> RetrievalJob:
        """The retrieval of request ``rid`` as a job of the step's batch (``OffloadPolicy._submit_batch``)."""
        batched = not self._layerwise(KVStarPolicy)
        return RetrievalJob(rid=rid, step=step, num_blocks=st.sel_nb, task=self._task(st, group),
                            scores=partial(self._scores_all, st, group) if batched else None,
                            scoring="kvstar_vote")

    def after_step(self, reqs: list[RequestView], queries) -> None:
        """Every step's queries are kept (one copy of the step's rows); every ``R`` steps the due
        retrieval is collected and the new ones are submitted as one batch
        (``OffloadPolicy._submit_batch``)."""
        r = self.config.retrieval_stride
        live = [(row, req, self._state[req.rid]) for row, req in enumerate(reqs)]
        live = [x for x in live if not x[2].dense]
        if not live:
            return
        # copies: the runtime reuses the buffer behind ``queries`` on the next step
        qs = self._batch_queries(queries, [row for row, _, _ in live], [req for _, req, _ in live])
        submit: list[tuple[RequestView, KVStarRequestState, list[torch.Tensor]]] = []
        for (_, req, st), q in zip(live, qs, strict=True):
            s = req.step
            st.group.append(q)  # [L, Hq, D]
            if s % r:
                continue
            if s >= 2 * r:
                pending = st.pending
                if pending is None or pending.step != s - r:
                    raise RuntimeError(f"kvstar: request {req.rid!r} step {s}: no retrieval from step {s - r}")
                self._collect(st, pending)
            stacked = torch.stack(st.group[-r:], dim=2)  # [L, Hq, R, D]
            st.group = []
            submit.append((req, st, list(stacked)))
        if submit:
            jobs = [self._job(req.rid, req.step, st, group) for req, st, group in submit]
            for (_, st, _), pending in zip(submit, self._submit_batch(jobs), strict=True):
                st.pending = pending
