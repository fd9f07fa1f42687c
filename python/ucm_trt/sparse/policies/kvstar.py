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
* Schedule with ``R = KVStarConfig.retrieval_stride`` and decode step ``s``, read as ``s + phase``
  in the modulo (the request's phase, ``RetrievalConfig.stagger``; 0 for a request alone, upstream's):
  every step's query is stored; after step ``s % R == 0`` (``s >= R``) the group of the last ``R``
  queries is submitted; from ``s >= 2R`` the retrieval submitted at ``s - R`` is collected at the same
  point, so queries of steps ``[1..R]`` choose the blocks of steps ``[2R+1..3R]`` (one-stride lag,
  retrieval overlaps a whole stride). Decode-generated blocks are never sparsified.
* A retrieval covers all layers (a step's retrievals share the worker's tasks, see ``_offload``): the vote per layer on the layer's
  :class:`PreparedVote` (float32 tiles of candidate blocks, one online-softmax pass that never
  materialises the ``[Hq, Tv, positions]`` weights; the task's layers share one
  :class:`VoteWorkspace`), then one batched selection over all layers (:mod:`ucm_trt.sparse.batched`).
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

__all__ = ["KVStarPolicy", "KVStarRequestState", "PreparedVote", "StackedVote", "VoteWorkspace"]


_LOG2E = 1.4426950408889634


def _chunk_logits(q: torch.Tensor, tiles: torch.Tensor, buf: torch.Tensor) -> torch.Tensor:
    """One chunk's logits ``[n, Hkv, rows, T*M]``, written into ``buf``: the (``log2 e``-scaled) queries
    ``q [n * Hkv, rows, d']`` times the float32 tiles ``[n, Hkv, d', T*M]``, one batched matmul."""
    n, hkv, dp, tm = tiles.shape
    rows = q.shape[1]
    return torch.bmm(q, tiles.view(n * hkv, dp, tm), out=buf[: n * hkv * rows * tm].view(n * hkv, rows, tm)).view(
        n, hkv, rows, tm)


def _chunk_sums(x: torch.Tensor, maxes: torch.Tensor, sums: torch.Tensor, m: int) -> None:
    """In place: each row's maximum of the (masked) chunk logits ``x [n, Hkv, rows, T*M]`` into ``maxes``, then each
    block's sum of ``exp2(x - max)`` over its ``m`` positions into ``sums [n, Hkv, rows, T]`` (``x`` is overwritten)."""
    n, hkv, rows, tm = x.shape
    mx = torch.amax(x, -1, out=maxes)
    torch.exp2(x.sub_(mx[..., None]), out=x)
    torch.sum(x.view(n, hkv, rows, tm // m, m), -1, out=sums)


def _block_masses(sums: torch.Tensor, maxes: torch.Tensor) -> torch.Tensor:
    """The online softmax's end: every tile's block sums ``sums [..., tiles, Hkv, rows, T]`` (at that tile's row
    maxima ``maxes [..., tiles, Hkv, rows]``) rescaled to each row's overall maximum and divided by the row's sum,
    summed over rows -> the blocks' masses ``[..., Hkv, tiles * T]`` (both inputs are overwritten)."""
    top = maxes.amax(-3, keepdim=True)  # [..., 1, Hkv, rows]
    sums.mul_(torch.exp2(maxes.sub_(top))[..., None])  # every tile's sums at the row's maximum
    inv = sums.sum((-4, -1)).reciprocal_()  # [..., Hkv, rows]: 1 / the row's softmax denominator
    mass = torch.einsum("...khrb,...hr->...hkb", sums, inv)  # [..., Hkv, tiles, T]
    return mass.reshape(*mass.shape[:-2], -1)


class VoteWorkspace:
    """Scratch buffers of :meth:`PreparedVote.scores`, reused over the layers of one retrieval task
    (one per task / thread: a vote writes into it), on ``device`` (default the CPU). Grown on demand."""

    def __init__(self, device: torch.device | str | None = None) -> None:
        # the device as tensors report it ("cuda" -> "cuda:0"), so that PreparedVote.scores reuses the workspace
        self.device = torch.empty(0, device="cpu" if device is None else device).device
        self._tile = torch.empty(0, device=self.device)
        self._sums = torch.empty(0, device=self.device)
        self._maxes = torch.empty(0, device=self.device)

    def buffers(self, tile: int, sums: int, maxes: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self._tile.numel() < tile:
            self._tile = torch.empty(tile, device=self.device)
        if self._sums.numel() < sums:
            self._sums = torch.empty(sums, device=self.device)
        if self._maxes.numel() < maxes:
            self._maxes = torch.empty(maxes, device=self.device)
        return self._tile[:tile], self._sums[:sums], self._maxes[:maxes]


class PreparedVote:
    """One layer's sub-block representations laid out for fast voting on the CPU.

    Laid out once at prefill end: the blocks that have an allowed position (a non-empty sub-block of
    a candidate block), as float32 tiles ``[tiles, Hkv, d', T * M]`` of ``T = TILE_BLOCKS`` blocks
    (the last tile padded), with a mask of the tiles' empty sub-blocks and padding. A vote
    (:meth:`scores`) runs through the tiles a few at a time (one per torch intra-op thread), so the
    logits stay in the cores' caches: per tile one batched matmul ``[Hkv, G*Tv, d'] x [Hkv, d', T * M]``
    (the queries pre-scaled by ``log2 e``), the tile's row maxima, ``exp2`` of the shifted logits and
    each block's sum of them; at the end every tile's sums are rescaled to the row's overall maximum
    (online softmax) and a block's score is ``sum_rows block_sum / row_sum``: the softmax mass of the
    block summed over the group's queries, as :func:`ucm_trt.sparse.score.kvstar_vote_scores`
    computes it, up to float32 rounding (another summation order, and ``exp2`` of ``log2 e``-scaled
    logits; tested against the previous one-pass layout in ``tests/sparse/test_kvstar_vote.py``).
    The arithmetic of a tile does not depend on how many tiles go together, so the scores do not
    depend on the thread count.

    ``compact=True`` is the layout of GPU-resident representations (``RetrievalConfig(representations=
    "device")``, on ``device``): the tiles stay float16 as stored (half the bytes) and are upcast to float32
    :attr:`COMPACT_TILES` at a time inside the vote, the empty positions are one mask tensor (no host sync
    per tile), and the queries move to the tiles' device. The float32 arithmetic is the same, so the scores
    equal the host layout's on the same device.
    """

    TILE_BLOCKS = 32
    #: tiles upcast and voted per matmul in the compact layout (bounds its float32 scratch: at head_dim
    #: 128, 8 KV heads, block 64, 8 queries per vote, about 16 MiB of tiles + 32 MiB of logits)
    COMPACT_TILES = 16

    def __init__(self, sub: SubBlockRepr, cand: torch.Tensor, *, compact: bool = False,
                 device: torch.device | str | None = None) -> None:
        vals, counts, ch = sub.values, sub.counts, sub.channels
        if vals.dim() != 4:
            raise ValueError(f"sub.values must be [nb, M, Hkv, d'], got shape {tuple(vals.shape)}")
        nb, m, hkv, dp = vals.shape
        if cand.dtype != torch.bool or tuple(cand.shape) != (nb,):
            raise ValueError(f"cand must be a bool [nb={nb}] mask, got {cand.dtype} {tuple(cand.shape)}")
        if not isinstance(compact, bool):
            raise TypeError(f"compact must be a bool, got {compact!r}")
        dev = torch.device("cpu") if device is None else torch.device(device)
        vals, counts, ch, cand = vals.to(dev), counts.to(dev), ch.to(dev), cand.to(dev)
        allowed = (counts > 0) & cand[:, None]  # [nb, M]
        blocks = torch.nonzero(allowed.any(1))[:, 0]  # blocks with an allowed position
        self.nb, self.m, self.hkv, self.dp = nb, m, hkv, dp
        self.compact = compact
        self.blocks = blocks
        self.channels = ch.to(torch.int64)  # [Hkv, d']
        t = self.TILE_BLOCKS
        nt = -(-len(blocks) // t)
        v = torch.zeros(nt * t, m, hkv, dp, dtype=vals.dtype if compact else torch.float32, device=dev)
        v[: len(blocks)] = vals[blocks]
        self.vt = v.view(nt, t, m, hkv, dp).permute(0, 3, 4, 1, 2).reshape(nt, hkv, dp, t * m).contiguous()
        ok = torch.zeros(nt * t, m, dtype=torch.bool, device=dev)
        ok[: len(blocks)] = allowed[blocks]
        bad = ~ok.view(nt, 1, 1, t * m)  # [tiles, 1, 1, T * M]: empty sub-blocks and padding
        #: compact: every tile's mask of positions that vote nothing, as one tensor
        self.bad_all: torch.Tensor | None = bad if compact else None
        #: host layout: per tile, its mask, or None (all allowed)
        self.bad: list[torch.Tensor | None] = (
            [] if compact else [bad[i] if bool(bad[i].any()) else None for i in range(nt)])

        mask = bad.numel() if compact else sum(b.numel() for b in self.bad if b is not None)
        #: bytes of the laid-out representations (tiles, channel ids, block ids, masks); fixed once laid out
        self.nbytes = (self.vt.numel() * self.vt.element_size() + self.channels.numel() * 8
                       + self.blocks.numel() * 8 + mask)

    def scores(self, q: torch.Tensor, work: VoteWorkspace | None = None) -> torch.Tensor:
        """``q [Hq, Tv, D]`` (the voting queries) -> float32 per-KV-head scores ``[Hkv, nb]``.
        ``work``: scratch buffers to reuse (a task votes every layer with one)."""
        hq, tv, d = q.shape
        hkv, dp, m = self.hkv, self.dp, self.m
        g = hq // hkv
        rows = g * tv
        dev = self.vt.device
        out = torch.zeros(hkv, self.nb, device=dev)
        nt = self.vt.shape[0]
        if nt == 0:
            return out  # no allowed position: nothing to vote for
        t = self.TILE_BLOCKS
        # tiles per step: the compact layout's bound, or one per intra-op thread (host)
        k = min(nt, self.COMPACT_TILES) if self.compact else max(1, min(nt, torch.get_num_threads()))
        if work is None or work.device != dev:
            work = VoteWorkspace(dev)
        tile_buf, sums_buf, max_buf = work.buffers(k * hkv * rows * t * m, nt * hkv * rows * t, nt * hkv * rows)
        q = q.to(dev)
        qp = torch.gather(q.reshape(hkv, rows, d), -1, self.channels[:, None, :].expand(hkv, rows, dp))
        qp = qp.float().mul_(_LOG2E).expand(k, hkv, rows, dp).reshape(k * hkv, rows, dp)
        sums = sums_buf.view(nt, hkv, rows, t)
        maxes = max_buf.view(nt, hkv, rows)
        for i in range(0, nt, k):
            n = min(k, nt - i)
            tiles = self.vt[i : i + n]
            if self.compact:
                tiles = tiles.float()  # float16 as stored -> the host layout's float32 values
            x = _chunk_logits(qp[: n * hkv], tiles, tile_buf)
            if self.compact:
                x.masked_fill_(self.bad_all[i : i + n], float("-inf"))
            for j in range(0 if self.compact else n):
                if self.bad[i + j] is not None:
                    x[j].masked_fill_(self.bad[i + j], float("-inf"))
            _chunk_sums(x, maxes[i : i + n], sums[i : i + n], m)
        out[:, self.blocks] = _block_masses(sums, maxes)[:, : len(self.blocks)]
        return out


class StackedVote:
    """Every layer's votes in the compact layout, stacked: a retrieval votes all layers in a few large
    batched operations instead of a loop of small ones per layer and tile chunk (GPU-resident
    representations, ``RetrievalConfig(representations="device")``).

    The tiles are :class:`PreparedVote`'s compact ones (float16 as stored), layer after layer in one
    tensor ``[L * tiles, Hkv, d', T * M]``; the candidate blocks and the sub-block token counts are the
    same in every layer (one prompt, one length), so one block list and one mask serve all layers
    (checked when laid out). :meth:`scores` runs through the ``L * tiles`` axis in chunks of as many
    tiles as :attr:`SCRATCH_BYTES` of float32 scratch holds (tiles upcast plus logits), each chunk one
    ``index_select`` of its tiles' layer queries, one batched matmul, the mask, the row maxima, ``exp2``
    and the block sums; then the online-softmax rescaling and the block masses for every layer at once.
    A tile's arithmetic is :class:`PreparedVote`'s, so the scores are its per-layer scores up to the
    order of the final float32 sums. On an H100 at 128K (64 tiles per layer, 32 layers) the per-layer
    loop launched over 1,000 small kernels per request and retrieval (``benchmarks/profile_decode.py``);
    this runs 32 chunks of 64 tiles (2 MiB of scratch per tile at 8 queries per vote).
    """

    #: float32 scratch one chunk may use (tiles upcast + logits); the chunk is at least one tile. Each retrieval
    #: task that votes holds its own (the worker's threads may vote at once), outside the KV budget
    SCRATCH_BYTES = 128 << 20

    def __init__(self, subs: list[SubBlockRepr], cand: torch.Tensor, *, device: torch.device | str) -> None:
        if not subs:
            raise ValueError("subs must hold one SubBlockRepr per layer, got none")
        first = None
        vt = None
        channels = []
        for layer, sub in enumerate(subs):
            p = PreparedVote(sub, cand, compact=True, device=device)
            if first is None:
                first = p
                nt = p.vt.shape[0]
                vt = torch.empty((len(subs) * nt, *p.vt.shape[1:]), dtype=p.vt.dtype, device=p.vt.device)
            elif (p.vt.shape != first.vt.shape or not torch.equal(p.blocks, first.blocks)
                  or not torch.equal(p.bad_all, first.bad_all)):
                raise ValueError(
                    f"layer {layer}'s sub-blocks differ from layer 0's in shape, blocks or empty positions "
                    f"({tuple(p.vt.shape)} vs {tuple(first.vt.shape)}): the layers of one request must share them"
                )
            vt[layer * nt : (layer + 1) * nt] = p.vt  # one layer's tiles at a time: no second full copy
            channels.append(p.channels)
        self.num_layers = len(subs)
        self.nb, self.m, self.hkv, self.dp = first.nb, first.m, first.hkv, first.dp
        self.tiles_per_layer = nt
        self.blocks = first.blocks
        self.vt = vt
        self.channels = torch.stack(channels)  # [L, Hkv, d']
        self.bad_all = first.bad_all  # [tiles, 1, 1, T * M]
        #: bytes of the laid-out representations (tiles, channel ids, block ids, mask)
        self.nbytes = (self.vt.numel() * self.vt.element_size() + self.channels.numel() * 8
                       + self.blocks.numel() * 8 + self.bad_all.numel())

    def layer_scores(self, layer: int, q: torch.Tensor, work: VoteWorkspace | None = None) -> torch.Tensor:
        """One layer's vote: ``q [Hq, Tv, D]`` -> ``[Hkv, nb]`` (the per-layer path and its tests)."""
        if not 0 <= layer < self.num_layers:
            raise ValueError(f"layer must be in [0, {self.num_layers}), got {layer}")
        return self._scores(q[None], layer, 1, work)[0]

    def scores(self, qs, work: VoteWorkspace | None = None) -> torch.Tensor:
        """Every layer's vote: ``qs`` per layer ``[Hq, Tv, D]`` (a list, or one ``[L, Hq, Tv, D]`` tensor)
        -> float32 per-KV-head scores ``[L, Hkv, nb]``."""
        qs = torch.stack(list(qs)) if not isinstance(qs, torch.Tensor) else qs
        if qs.dim() != 4 or qs.shape[0] != self.num_layers:
            raise ValueError(f"qs must be [L={self.num_layers}, Hq, Tv, D], got shape {tuple(qs.shape)}")
        return self._scores(qs, 0, self.num_layers, work)

    def _scores(self, qs: torch.Tensor, first: int, count: int, work: VoteWorkspace | None) -> torch.Tensor:
        _, hq, tv, d = qs.shape
        hkv, dp, m, nt = self.hkv, self.dp, self.m, self.tiles_per_layer
        g = hq // hkv
        rows = g * tv
        dev = self.vt.device
        out = torch.zeros(count, hkv, self.nb, device=dev)
        total = count * nt
        if total == 0:
            return out  # no allowed position: nothing to vote for
        t = PreparedVote.TILE_BLOCKS
        per_tile = 4 * hkv * t * m * (rows + dp)
        k = max(1, min(total, self.SCRATCH_BYTES // per_tile))
        if work is None or work.device != dev:
            work = VoteWorkspace(dev)
        tile_buf, sums_buf, max_buf = work.buffers(k * hkv * rows * t * m, total * hkv * rows * t, total * hkv * rows)
        qs = qs.to(dev)
        chans = self.channels[first : first + count]  # [count, Hkv, d']
        qp = torch.gather(qs.reshape(count, hkv, rows, d), -1, chans[:, :, None, :].expand(count, hkv, rows, dp))
        qp = qp.float().mul_(_LOG2E)  # [count, Hkv, rows, d']
        layer_of = torch.arange(total, device=dev) // nt  # the layer (of this call's) of every tile
        vt = self.vt[first * nt : (first + count) * nt]
        sums = sums_buf.view(total, hkv, rows, t)
        maxes = max_buf.view(total, hkv, rows)
        for i in range(0, total, k):
            n = min(k, total - i)
            qi = qp.index_select(0, layer_of[i : i + n]) if count > 1 else qp.expand(n, hkv, rows, dp)
            x = _chunk_logits(qi.reshape(n * hkv, rows, dp), vt[i : i + n].float(), tile_buf)
            j = i % nt
            if j + n <= nt:  # the chunk's tiles in one layer: their masks are one slice
                x.masked_fill_(self.bad_all[j : j + n], float("-inf"))
            else:
                x.masked_fill_(self.bad_all[(torch.arange(i, i + n, device=dev) % nt)], float("-inf"))
            _chunk_sums(x, maxes[i : i + n], sums[i : i + n], m)
        masses = _block_masses(sums.view(count, nt, hkv, rows, t), maxes.view(count, nt, hkv, rows))
        out[:, :, self.blocks] = masses[:, :, : len(self.blocks)]
        return out


@dataclass(eq=False, kw_only=True)
class KVStarRequestState(OffloadRequestState):
    """:class:`OffloadRequestState` plus KVStar's per-layer prepared votes (one :class:`PreparedVote` per
    layer, from the prompt's sub-blocks) and the decode queries gathered since the last retrieval
    (each ``[L, Hq, D]``)."""

    votes: list[PreparedVote] | StackedVote = field(default_factory=list)
    group: list[torch.Tensor] = field(default_factory=list)
    group_fills: list = field(default_factory=list)  # QueryDrift draws of ``group``'s buffers, not yet made

    @property
    def representation_bytes(self) -> int:
        if isinstance(self.votes, StackedVote):
            return self.votes.nbytes
        return sum(v.nbytes for v in self.votes)  # one int per layer (PreparedVote.nbytes is fixed at layout)


def _draw_group(fills: list, group: list[torch.Tensor], out: torch.Tensor) -> None:
    """A retrieval's QueryDrift voting group, on the worker thread: each step's draw in step order
    into its buffer, then the group stacked into ``out`` ``[L, Hq, R, D]``."""
    for fill in fills:
        fill()
    torch.stack(group, dim=2, out=out)


class KVStarPolicy(OffloadPolicy):
    name = "kvstar"
    # RetrievalConfig(representations="device"): the sub-block tiles live on the runtime's device (float16,
    # PreparedVote's compact layout) and the votes and top-k run there on the policy's side stream

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
        st.phase = 0 if st.dense else self._new_phase()
        self._state[req.rid] = st
        if st.dense:
            return
        self._decide_dense_layers(req, queries)
        kv = self.rt.kv
        lens = block_lens_from_seq_lens(torch.tensor(req.prompt_len), nbp, self.sparse.block_size)
        cand = candidate_mask(torch.tensor([nbp], dtype=torch.int32), nbp, sink_blocks=self.sparse.sink_blocks,
                              local_blocks=self.sparse.local_blocks, min_blocks=self.sparse.min_blocks)[0]
        dev = self.rep_device
        compact = self.retrieval.representations == "device"
        subs = []
        for layer in range(self.shape.num_layers):
            sub = kvstar_subblock(kv.gather_keys(req.rid, layer, list(range(nbp))), lens.to(kv.layout.device),
                                  self.config)
            # stored in fp16 as upstream, then laid out for voting (allowed positions only; float32 tiles on
            # the host per layer, float16 tiles of every layer stacked on the device)
            subs.append(SubBlockRepr(values=sub.values.to(dev, torch.float16), counts=sub.counts.to(dev),
                                     channels=sub.channels.to(dev)))
        st.votes = (StackedVote(subs, cand, device=dev) if compact
                    else [PreparedVote(sub, cand, device=dev) for sub in subs])
        del subs
        group = [q.clone() for q in queries]  # per layer [Hq, W, D]; the runtime reuses its buffer
        self._start_drift(req.rid, st, torch.stack([q[:, -1] for q in queries]))  # query_drift only
        self._collect(st, self._submit(req.rid, 0, nbp, self._task(st, group)))

    def _task(self, st: KVStarRequestState, group: list[torch.Tensor]):
        if self._layerwise(KVStarPolicy):
            return self._per_layer(partial(self._select, st, group))
        return self._on_device(partial(self._select_all, st, group))

    def _layer_scores(self, st: KVStarRequestState, group: list[torch.Tensor], layer: int,
                      work: VoteWorkspace | None = None) -> torch.Tensor:
        # group[layer]: [Hq, Tv, D] -> per-KV-head vote scores [Hkv, nbp]
        if isinstance(st.votes, StackedVote):
            return st.votes.layer_scores(layer, group[layer], work)
        return st.votes[layer].scores(group[layer], work)

    def _scores_all(self, st: KVStarRequestState, group: list[torch.Tensor]) -> torch.Tensor:
        """The votes per layer, on one scratch workspace -> per-KV-head scores ``[L, Hkv, nb]``."""
        work = VoteWorkspace(self.rep_device)
        if isinstance(st.votes, StackedVote):
            return st.votes.scores(group, work)  # every layer in a few batched chunks
        return torch.stack([self._layer_scores(st, group, layer, work) for layer in range(self.shape.num_layers)])

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
        batched = self._stream is None and not self._layerwise(KVStarPolicy)
        return RetrievalJob(rid=rid, step=step, num_blocks=st.sel_nb, task=self._task(st, group),
                            scores=partial(self._scores_all, st, group) if batched else None,
                            scoring="kvstar_vote")

    @property
    def retrieval_stride(self) -> int:
        return self.config.retrieval_stride

    def collect(self, reqs: list[RequestView]) -> None:
        """Every ``R`` steps (``(s + phase) % R == 0``, from step ``2R``): the retrieval submitted ``R`` steps ago."""
        r = self.config.retrieval_stride
        for req in reqs:
            st = self._state[req.rid]
            s = req.step
            if st.dense or (s + st.phase) % r or s < 2 * r:
                continue
            pending = st.pending
            if pending is None or pending.step != s - r:
                raise RuntimeError(f"kvstar: request {req.rid!r} step {s}: no retrieval from step {s - r}")
            self._collect(st, pending)
            st.pending = None

    def after_step(self, reqs: list[RequestView], queries) -> None:
        """Every step's queries are kept (one copy of the step's rows); every ``R`` steps (after
        :meth:`collect` took the due retrieval) the new ones are submitted as one batch
        (``OffloadPolicy._submit_batch``)."""
        r = self.config.retrieval_stride
        live = [(row, req, self._state[req.rid]) for row, req in enumerate(reqs)]
        live = [x for x in live if not x[2].dense]
        if not live:
            return
        # copies: the runtime reuses the buffer behind ``queries`` on the next step. QueryDrift queries come
        # as empty buffers and their draws (``fills``), made by the retrieval task on its worker thread
        fills: list = []
        qs = self._batch_queries(queries, [row for row, _, _ in live], [req for _, req, _ in live], fills=fills)
        submit: list[tuple[RequestView, KVStarRequestState, list[torch.Tensor]]] = []
        prepares: list = []
        for i, ((_, req, st), q) in enumerate(zip(live, qs, strict=True)):
            s = req.step
            st.group.append(q)  # [L, Hq, D]
            if fills:
                st.group_fills.append(fills[i])
            if (s + st.phase) % r or s < r:  # a group is the last R queries: the first needs R steps
                continue
            if st.group_fills:  # draw the group's queries in step order, then stack them, on the worker
                stacked = torch.empty(*q.shape[:2], r, q.shape[-1], dtype=q.dtype)  # [L, Hq, R, D]
                prepares.append(partial(_draw_group, st.group_fills[-r:], st.group[-r:], stacked))
            else:
                stacked = torch.stack(st.group[-r:], dim=2)  # [L, Hq, R, D]
                prepares.append(None)
            st.group, st.group_fills = [], []
            submit.append((req, st, list(stacked)))
        if submit:
            jobs = [self._job(req.rid, req.step, st, group) for req, st, group in submit]
            if any(prepares):
                jobs = self._with_fills(jobs, prepares)
            for (_, st, _), pending in zip(submit, self._submit_batch(jobs), strict=True):
                st.pending = pending
