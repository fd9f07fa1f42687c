"""The selection methods that the quality evaluation compares, and their block budgets.

Each *method* is a block representation + scoring function of :mod:`ucm_trt.sparse` (the UCM
algorithm that uses it in brackets):

=================  ==================  ===========================================================
method             repr / scoring      scores
=================  ==================  ===========================================================
``mean``           mean / dot          group-mean query . block mean of K       [ESA, GSA]
``minmax``         minmax / quest      Quest upper bound over channel min/max   [Quest]
``hash``           hash / hamming      -min Hamming distance of sign codes      [GSA On-Device]
``first``          first / dot         query . first token of the block
``weighted_mean``  weighted_mean / dot query . attention-weighted mean of K (weights: the mass
                                       an observation window of earlier queries gave each token)
``subblock``       subblock / kvstar   KVStar softmax-mass vote over channel-pruned sub-blocks
``vote``           mean / vote         per-head softmax vote over block means   [ESA, GSA ``vote=True``]
``subvote``        submean / vote      per-head softmax vote over 8-token sub-block means, a block
                                       scoring the mass of its sub-blocks       [ESA, GSA default]
=================  ==================  ===========================================================

and two baselines at the same budget: ``oracle`` (the true top blocks by attention mass, from
:func:`ucm_trt.sparse.recall.oracle_selection`) and ``streaming`` (StreamingLLM-style: the sink
plus the most recent blocks). ``dense`` keeps everything.

Budgets (:class:`BlockBudget`) are a *kept fraction of all valid blocks* (the seed table's
"sparsity 10% / 30% / 50% / 70%" = 10% ... of the KV read) or a fixed number of *tokens*; the sink
and local windows count inside the budget, and are always kept even when they alone exceed it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import torch

from ucm_trt._validation import FLOAT_DTYPES, INT_DTYPES, check_tensor
from ucm_trt.config import Budget, KVStarConfig, SparseConfig
from ucm_trt.sparse import representations as R
from ucm_trt.sparse import score as S
from ucm_trt.sparse.recall import SCORING_FOR_REPRESENTATION, oracle_selection
from ucm_trt.sparse.select import budget_counts, candidate_mask, select_blocks, select_blocks_by_count

__all__ = [
    "METHODS",
    "BASELINES",
    "METHOD_LABELS",
    "BlockBudget",
    "MethodContext",
    "block_scores",
    "budget_total_blocks",
    "candidate_counts",
    "make_selector",
]

METHODS: tuple[str, ...] = ("mean", "minmax", "hash", "first", "weighted_mean", "subblock", "vote", "subvote")
#: tokens per sub-block of ``subvote`` (ESA / GSA's default ``sub_block_tokens``)
SUBVOTE_TOKENS = 8
BASELINES: tuple[str, ...] = ("oracle", "streaming")
METHOD_LABELS: dict[str, str] = {
    "mean": "mean/dot (ESA, GSA upstream)",
    "minmax": "minmax/quest (Quest)",
    "hash": "hash/hamming (GSA On-Device)",
    "first": "first/dot",
    "weighted_mean": "weighted_mean/dot",
    "subblock": "subblock/kvstar_vote (KVStar)",
    "vote": "mean/per-head vote (ESA, GSA vote=True)",
    "subvote": "8-token sub-block means/per-head vote (ESA, GSA default)",
    "oracle": "oracle (true top blocks by mass)",
    "streaming": "streaming (sink + recent)",
    "dense": "dense",
}


@dataclass(frozen=True, kw_only=True)
class BlockBudget:
    """``kind="fraction"``: keep ``round(value * num_blocks)`` blocks; ``kind="tokens"``: keep
    ``value // block_size`` blocks. Forced windows count inside, and are kept regardless."""

    kind: Literal["fraction", "tokens"]
    value: float

    def __post_init__(self) -> None:
        if self.kind == "fraction":
            if isinstance(self.value, bool) or not isinstance(self.value, (int, float)) or not 0 < self.value <= 1:
                raise ValueError(f"BlockBudget.value must be in (0, 1] for kind='fraction', got {self.value!r}")
        elif self.kind == "tokens":
            if isinstance(self.value, bool) or not isinstance(self.value, int) or self.value <= 0:
                raise ValueError(f"BlockBudget.value must be an int > 0 for kind='tokens', got {self.value!r}")
        else:
            raise ValueError(f"BlockBudget.kind must be 'fraction' or 'tokens', got {self.kind!r}")

    @property
    def label(self) -> str:
        return f"{round(self.value * 100)}%" if self.kind == "fraction" else f"{int(self.value)} tok"


def budget_total_blocks(budget: BlockBudget, num_blocks: torch.Tensor, block_size: int) -> torch.Tensor:
    """Blocks a budget allows per row (before the forced windows are enforced), int64 like ``num_blocks``."""
    nb = num_blocks.to(torch.int64)
    if budget.kind == "fraction":
        return torch.floor(nb.to(torch.float64) * float(budget.value) + 0.5).to(torch.int64)
    return torch.full_like(nb, int(budget.value) // block_size)


def candidate_counts(
    budget: BlockBudget, num_blocks: torch.Tensor, block_size: int, *, sink_blocks: int, local_blocks: int
) -> torch.Tensor:
    """Candidates kept per row: the budget minus the forced windows, clamped to ``[0, candidates]``."""
    nb = num_blocks.to(torch.int64)
    forced = torch.clamp(nb, max=sink_blocks + local_blocks)
    total = budget_total_blocks(budget, nb, block_size)
    return (total - forced).clamp(min=0).minimum(nb - forced)


@dataclass(frozen=True, kw_only=True)
class MethodContext:
    """Per-layer side data some methods need.

    Attributes
    ----------
    hash_encoder:
        The GSA On-Device projection (``HashEncoder.random(D, D, seed=...)`` as upstream's
        ``hash_weight_type="random"`` with ``hash_bits = head_dim``).
    kvstar:
        KVStar channel pruning and token merge.
    token_weights:
        ``[Hkv, T]`` weights per token for ``weighted_mean`` (observation-window attention mass);
        tokens past ``T`` (appended after the observation) get the mean weight of the observed ones.
    """

    hash_encoder: R.HashEncoder | None = None
    kvstar: KVStarConfig = field(default_factory=KVStarConfig)
    token_weights: torch.Tensor | None = None


def _weights_for(ctx: MethodContext, num_tokens: int, num_blocks: int, block_size: int, hkv: int) -> torch.Tensor:
    if ctx.token_weights is None:
        raise ValueError("method 'weighted_mean' needs MethodContext.token_weights (observation-window weights)")
    w = check_tensor("token_weights", ctx.token_weights, ndim=2, dtypes=FLOAT_DTYPES).float()
    if w.shape[0] != hkv:
        raise ValueError(f"token_weights must have {hkv} rows (KV heads), got shape {tuple(w.shape)}")
    seen = w.shape[1]
    if seen < num_tokens:
        fill = w.mean(-1, keepdim=True).expand(hkv, num_tokens - seen)
        w = torch.cat([w, fill], dim=1)
    w = w[:, :num_tokens]
    pad = num_blocks * block_size - num_tokens
    if pad:
        w = torch.cat([w, w.new_zeros(hkv, pad)], dim=1)
    return w.reshape(hkv, num_blocks, block_size).transpose(0, 1)  # [nb, Hkv, bs]


def block_scores(
    method: str,
    q: torch.Tensor,
    k_blocks: torch.Tensor,
    block_lens: torch.Tensor,
    ctx: MethodContext,
    *,
    block_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Scores ``[N, Hkv, nb]`` (higher is better) of one sequence's blocks for ``N`` queries.

    Parameters
    ----------
    method:
        One of :data:`METHODS`.
    q:
        Post-RoPE queries ``[N, Hq, D]``; each row is scored on its own (``N`` decode steps, or the
        tokens of one chunk).
    k_blocks, block_lens:
        The sequence's K as blocks ``[nb, Hkv, bs, D]`` and valid tokens per block ``[nb]``
        (:func:`ucm_trt.sparse.representations.tokens_to_blocks`).
    ctx:
        Side data (hash encoder, KVStar settings, observation weights).
    block_mask:
        Bool ``[N, nb]``: the blocks each row may vote on (KVStar's softmax runs over these only);
        ignored by the other methods, whose per-block scores do not depend on other blocks.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}; got {method!r}")
    check_tensor("q", q, ndim=3, dtypes=FLOAT_DTYPES)
    check_tensor("k_blocks", k_blocks, ndim=4, dtypes=FLOAT_DTYPES)
    check_tensor("block_lens", block_lens, ndim=1, dtypes=INT_DTYPES, shape=(k_blocks.shape[0],))
    nb, hkv, bs, d = k_blocks.shape
    if q.shape[-1] != d:
        raise ValueError(f"q must have head dim {d} (as k_blocks), got shape {tuple(q.shape)}")
    if method == "mean":
        return S.dot_scores(q, R.block_mean(k_blocks, block_lens))
    if method == "vote":
        from ucm_trt.sparse.policies._reps import host_vote_scores

        reps = R.block_mean(k_blocks, block_lens).permute(1, 2, 0)  # [Hkv, D, nb]
        return host_vote_scores(q, reps[None].expand(q.shape[0], -1, -1, -1))
    if method == "subvote":
        from ucm_trt.sparse.policies.esa import sub_block_scores

        sb = max(1, bs // SUBVOTE_TOKENS) if bs % SUBVOTE_TOKENS == 0 else 1
        reps = R.block_submeans(k_blocks, block_lens, sb).permute(1, 2, 0)  # [Hkv, D, nb * sb]
        return sub_block_scores(q, reps[None].expand(q.shape[0], -1, -1, -1), sb, vote=True)
    if method == "first":
        return S.dot_scores(q, R.block_first(k_blocks, block_lens))
    if method == "minmax":
        kmin, kmax = R.block_minmax(k_blocks, block_lens)
        return S.quest_scores(q, kmin, kmax)
    if method == "hash":
        if ctx.hash_encoder is None:
            raise ValueError("method 'hash' needs MethodContext.hash_encoder")
        codes = R.block_hash_codes(k_blocks, block_lens, ctx.hash_encoder)
        return S.hamming_scores(q, ctx.hash_encoder, codes, block_lens)
    if method == "weighted_mean":
        num_tokens = int(block_lens.to(torch.int64).sum())
        w = _weights_for(ctx, num_tokens, nb, bs, hkv)
        return S.dot_scores(q, R.block_weighted_mean(k_blocks, block_lens, w))
    # subblock / kvstar_vote: one voting query per row
    sub = R.kvstar_subblock(k_blocks, block_lens, ctx.kvstar)
    if block_mask is not None:
        check_tensor("block_mask", block_mask, ndim=2, dtypes=(torch.bool,), shape=(q.shape[0], nb))
    return S.kvstar_vote_scores(q[:, :, None, :], sub, block_mask=block_mask)


def make_selector(
    method: str,
    *,
    ratio: float,
    sink_blocks: int = 1,
    local_blocks: int = 2,
    selection: str = "per_head",
    context: Callable[[int], MethodContext] | None = None,
) -> Callable[[int, torch.Tensor, torch.Tensor, int], torch.Tensor]:
    """A selector for :class:`ucm_trt.eval.sparse_lm.SparseRun`: method + ``Budget.ratio(ratio)``.

    The returned ``selector(layer, query [B, Hq, Tq, D], key [B, Hkv, Tk, D], block_size)`` treats the
    ``Tq`` queries as the last tokens of each sequence (a chunk) and returns int32 ``[B, Hkv, S]``:

    - a method of :data:`METHODS`: each query scores the blocks, the scores are averaged over the
      chunk's queries (for ``subblock`` that is KVStar's vote by all of them), then
      :func:`~ucm_trt.sparse.select.select_blocks` keeps the forced windows and the budget's best
      candidates (per KV head, or shared after :func:`~ucm_trt.sparse.score.reduce_scores`);
    - ``oracle``: :func:`~ucm_trt.sparse.recall.oracle_selection`, the chunk's true top blocks by mass;
    - ``streaming``: the forced windows plus the most recent candidates.

    Budget: :class:`~ucm_trt.config.Budget` ``ratio`` of the candidate blocks (upstream's
    ``sparse_ratio``), so every method keeps the same number of blocks. ``context(layer)`` gives the
    method's side data (hash encoder, KVStar settings, observation weights).
    """
    if method not in METHODS + BASELINES:
        raise ValueError(f"method must be one of {', '.join(METHODS + BASELINES)}; got {method!r}")
    if selection not in ("per_head", "shared"):
        raise ValueError(f"selection must be 'per_head' or 'shared', got {selection!r}")
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio <= 1:
        raise ValueError(f"ratio must be a number in (0, 1] (fraction of candidate blocks kept), got {ratio!r}")
    budget = Budget.ratio(ratio)
    rep = method if method in METHODS and method not in ("vote", "subvote") else "mean"  # (sub-)block means
    scoring = SCORING_FOR_REPRESENTATION[rep]
    if method in METHODS and context is None:
        raise ValueError(f"method {method!r} needs context=(layer -> MethodContext)")

    def selector(layer: int, query: torch.Tensor, key: torch.Tensor, block_size: int) -> torch.Tensor:
        cfg = SparseConfig(
            block_size=block_size, sink_blocks=sink_blocks, local_blocks=local_blocks, budget=budget,
            min_blocks=1, representation=rep, scoring=scoring, selection=selection,
        )
        b, hq, tq, d = query.shape
        hkv, tk = key.shape[1], key.shape[2]
        nb = (tk + block_size - 1) // block_size
        num_blocks = torch.full((b,), nb, dtype=torch.int32)
        cand = candidate_mask(num_blocks, nb, sink_blocks=sink_blocks, local_blocks=local_blocks)
        if method == "oracle":
            counts = budget_counts(budget, cand)[:, None]
            return oracle_selection(
                query, key, block_size=block_size, counts=counts, sink_blocks=sink_blocks,
                local_blocks=local_blocks, mode=selection,
            )
        if method == "streaming":
            counts = budget_counts(budget, cand)[:, None]
            recency = torch.arange(nb, dtype=torch.float32).expand(b, 1, nb)
            return select_blocks_by_count(
                recency, num_blocks, counts, sink_blocks=sink_blocks, local_blocks=local_blocks,
                num_kv_heads=hkv,
            )
        ctx = context(layer)
        rows = []
        for i in range(b):
            kb, lens = R.tokens_to_blocks(key[i], block_size)  # [nb, Hkv, bs, D]
            row_ctx = ctx
            if ctx.token_weights is not None and ctx.token_weights.dim() == 3:
                row_ctx = MethodContext(hash_encoder=ctx.hash_encoder, kvstar=ctx.kvstar,
                                        token_weights=ctx.token_weights[i])
            q_rows = query[i].transpose(0, 1)  # [Tq, Hq, D]
            s = block_scores(method, q_rows, kb, lens, row_ctx, block_mask=cand[i].expand(tq, nb))
            rows.append(s.mean(0))
        scores = torch.stack(rows)  # [B, Hkv, nb]
        if selection == "shared":
            scores = S.reduce_scores(scores, scoring)
        return select_blocks(scores, num_blocks, cfg, num_kv_heads=hkv)

    return selector
