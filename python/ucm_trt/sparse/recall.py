"""Quality lens: how much of the exact attention mass a block selection keeps.

``attention_mass_recall`` measures, per query head and query token, the fraction of the exact
softmax attention mass that falls on keys the sparse attention would see (the selected blocks
of the head's KV head, plus the query tokens themselves, as in
:func:`ucm_trt.reference.paged_sparse_attention`). ``oracle_selection`` is the best possible
selection at a given budget: the true top blocks by attention mass, with the same forced
windows. DESIGN §5 asks for a recall of at least 95% of the oracle's.

``recall_curve`` is the convenience used by ``make demo`` and the eval suite: given real Q/K of
one layer it scores every representation, selects at every budget and reports recall, the
oracle's recall at the same number of blocks, and the sink+local-only baseline.

Conventions: GQA maps query head ``h`` to KV head ``h // (Hq // Hkv)``; ``scale`` defaults to
``1/sqrt(D)``; all math is float32.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ucm_trt._validation import (
    FLOAT_DTYPES,
    INT_DTYPES,
    check_gqa,
    check_positive_int,
    check_same_device,
    check_tensor,
)
from ucm_trt.config import REPRESENTATIONS, SCORING_REPRESENTATIONS, Budget, KVStarConfig, SparseConfig
from ucm_trt.sparse.representations import (
    HashEncoder,
    attention_token_weights,
    block_first,
    block_hash_codes,
    block_mean,
    block_minmax,
    block_weighted_mean,
    kvstar_subblock,
    tokens_to_blocks,
)
from ucm_trt.sparse.score import (
    dot_scores,
    hamming_scores,
    kvstar_vote_scores,
    quest_scores,
    reduce_scores,
)
from ucm_trt.sparse.select import (
    _forced,
    budget_counts,
    select_blocks,
    select_blocks_by_count,
    selection_counts,
    selection_mask,
)

__all__ = [
    "MassRecall",
    "block_attention_mass",
    "attention_mass_recall",
    "oracle_selection",
    "RecallCurve",
    "recall_curve",
    "SCORING_FOR_REPRESENTATION",
]

# The scoring each representation is evaluated with in recall_curve.
SCORING_FOR_REPRESENTATION: dict[str, str] = {
    rep: scoring for scoring, reps in SCORING_REPRESENTATIONS.items() for rep in reps
}


@dataclass(frozen=True, eq=False)
class MassRecall:
    """Attention-mass recall of a selection.

    per_query: float32 ``[B, Hq, Tq]`` recall of each query head and query token
    per_head:  float32 ``[B, Hq]`` mean over the query tokens
    mean:      float, mean over everything
    """

    per_query: torch.Tensor
    per_head: torch.Tensor
    mean: float


def _check_qk(q: object, k: object, seq_lens: object) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    check_tensor("q", q, ndim=4, dtypes=FLOAT_DTYPES)
    b, hq, tq, d = q.shape
    check_tensor("k", k, ndim=4, dtypes=FLOAT_DTYPES, shape=(b, None, None, d))
    check_same_device(q=q, k=k)
    group = check_gqa(hq, k.shape[1])
    tk = k.shape[2]
    if seq_lens is None:
        lens = torch.full((b,), tk, dtype=torch.int64, device=q.device)
    else:
        check_tensor("seq_lens", seq_lens, ndim=1, dtypes=INT_DTYPES, shape=(b,))
        check_same_device(q=q, seq_lens=seq_lens)
        lens = seq_lens.to(torch.int64)
    if lens.numel() and (int(lens.min()) < tq or int(lens.max()) > tk):
        raise ValueError(
            f"seq_lens must be in [Tq = {tq}, Tk = {tk}] (the queries are the last Tq tokens), got {lens.tolist()}"
        )
    return q, k, lens, group


def _probs(q: torch.Tensor, k: torch.Tensor, lens: torch.Tensor, scale: float | None) -> torch.Tensor:
    """Exact causal softmax probabilities ``[B, Hq, Tq, Tk]`` (float32)."""
    b, hq, tq, d = q.shape
    hkv, tk = k.shape[1], k.shape[2]
    sc = 1.0 / math.sqrt(d) if scale is None else float(scale)
    qg = q.float().reshape(b, hkv, hq // hkv, tq, d)
    logits = torch.einsum("bhgqd,bhtd->bhgqt", qg, k.float()).reshape(b, hq, tq, tk) * sc
    qpos = lens[:, None] - tq + torch.arange(tq, device=q.device)[None, :]  # [B, Tq]
    p = torch.arange(tk, device=q.device)
    visible = p[None, None, :] <= qpos[:, :, None]  # [B, Tq, Tk]
    logits = logits.masked_fill(~visible[:, None], float("-inf"))
    return torch.softmax(logits, dim=-1)


def _check_scale(scale: object) -> None:
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float)) or not scale > 0):
        raise ValueError(f"scale must be a positive number or None, got {scale!r}")


def block_attention_mass(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    block_size: int,
    seq_lens: torch.Tensor | None = None,
    scale: float | None = None,
    exclude_queries: bool = False,
) -> torch.Tensor:
    """Exact attention mass per block, float32 ``[B, Hq, Tq, ceil(Tk / block_size)]``.

    ``q [B, Hq, Tq, D]`` are the last ``Tq`` tokens of each sequence (positions
    ``seq_len - Tq .. seq_len - 1``), ``k [B, Hkv, Tk, D]`` post-RoPE, ``seq_lens [B]`` (default
    ``Tk``). With ``exclude_queries`` the mass on the query tokens themselves (always visible to
    sparse attention) is left out.
    """
    q, k, lens, _ = _check_qk(q, k, seq_lens)
    bs = check_positive_int("block_size", block_size)
    _check_scale(scale)
    probs = _probs(q, k, lens, scale)
    if exclude_queries:
        p = torch.arange(k.shape[2], device=q.device)
        probs = probs * (p[None, :] < (lens - q.shape[2])[:, None])[:, None, None, :].to(probs.dtype)
    return _to_blocks(probs, bs)


def _to_blocks(probs: torch.Tensor, bs: int) -> torch.Tensor:
    tk = probs.shape[-1]
    nb = (tk + bs - 1) // bs
    pad = nb * bs - tk
    if pad:
        probs = torch.nn.functional.pad(probs, (0, pad))
    return probs.reshape(*probs.shape[:-1], nb, bs).sum(-1)


def attention_mass_recall(
    q: torch.Tensor,
    k: torch.Tensor,
    selection: torch.Tensor,
    *,
    block_size: int,
    seq_lens: torch.Tensor | None = None,
    scale: float | None = None,
) -> MassRecall:
    """Fraction of the exact softmax attention mass that a block selection keeps.

    Parameters
    ----------
    q:
        ``[B, Hq, Tq, D]``: the last ``Tq`` tokens of each sequence (post-RoPE).
    k:
        ``[B, Hkv, Tk, D]`` post-RoPE keys; ``Hq % Hkv == 0``.
    selection:
        int ``[B, Hkv, S]`` logical block ids (``-1`` padding), DESIGN §3 format.
    block_size:
        Tokens per block.
    seq_lens:
        int ``[B]`` true lengths (``Tq <= seq_len <= Tk``), default ``Tk``.

    A key is kept for query head ``h`` if its block is in ``selection[b, h // group]`` or it is
    one of the ``Tq`` query tokens (the visibility rule of ``paged_sparse_attention``). Selecting
    every block gives 1.
    """
    q, k, lens, group = _check_qk(q, k, seq_lens)
    bs = check_positive_int("block_size", block_size)
    _check_scale(scale)
    b, hq, tq, _ = q.shape
    hkv, tk = k.shape[1], k.shape[2]
    nb = (tk + bs - 1) // bs
    check_tensor("selection", selection, ndim=3, dtypes=INT_DTYPES, shape=(b, hkv, None))
    check_same_device(q=q, selection=selection)
    sel = selection_mask(selection.to(torch.int64), nb)  # [B, Hkv, nb]
    p = torch.arange(tk, device=q.device)
    tok = sel.repeat_interleave(bs, dim=-1)[..., :tk] | (p[None, :] >= (lens - tq)[:, None])[:, None, :]
    tok = tok.repeat_interleave(group, dim=1)  # [B, Hq, Tk]
    probs = _probs(q, k, lens, scale)
    per_query = (probs * tok[:, :, None, :].to(probs.dtype)).sum(-1)
    per_head = per_query.mean(-1)
    return MassRecall(per_query=per_query, per_head=per_head, mean=float(per_query.mean()))


def oracle_selection(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    block_size: int,
    counts: int | torch.Tensor,
    sink_blocks: int,
    local_blocks: int,
    min_blocks: int = 1,
    mode: str = "per_head",
    seq_lens: torch.Tensor | None = None,
    scale: float | None = None,
    max_selected: int | None = None,
) -> torch.Tensor:
    """The best selection at a budget: the true top candidate blocks by attention mass.

    Forced windows as :func:`~ucm_trt.sparse.select.select_blocks` (``sink_blocks``,
    ``local_blocks``, ``min_blocks``); ``counts`` candidates are added per row (an int, or an int
    tensor broadcastable to ``[B, Hkv]`` — e.g. the candidates another selection kept). Blocks are
    ranked by their exact attention mass (leaving out the always-visible query tokens), summed
    over the query tokens and the query heads of each KV head (``mode="per_head"``) or of all heads
    (``mode="shared"``, identical rows). Given the same forced windows and per-row counts, no
    selection has a higher mean :func:`attention_mass_recall`.

    Returns int32 ``[B, Hkv, S]`` (DESIGN §3 format).
    """
    q, k, lens, group = _check_qk(q, k, seq_lens)
    bs = check_positive_int("block_size", block_size)
    if mode not in ("per_head", "shared"):
        raise ValueError(f"mode must be 'per_head' or 'shared', got {mode!r}")
    mass = block_attention_mass(q, k, block_size=bs, seq_lens=lens, scale=scale, exclude_queries=True)
    b, hq = q.shape[:2]
    hkv = k.shape[1]
    nb = mass.shape[-1]
    per_kv = mass.sum(2).reshape(b, hkv, group, nb).sum(2)  # [B, Hkv, nb]
    scores = per_kv if mode == "per_head" else per_kv.sum(1, keepdim=True)
    num_blocks = ((lens + bs - 1) // bs).to(torch.int32)
    return select_blocks_by_count(
        scores,
        num_blocks,
        counts,
        sink_blocks=sink_blocks,
        local_blocks=local_blocks,
        min_blocks=min_blocks,
        num_kv_heads=hkv,
        max_selected=max_selected,
    )


# --------------------------------------------------------------------------------------------
# recall curves on captured Q/K


def _budget_label(budget: Budget) -> str:
    v = budget.value
    return f"{budget.kind}={v:g}" if isinstance(v, float) else f"{budget.kind}={v}"


@dataclass(frozen=True)
class RecallCurve:
    """Result of :func:`recall_curve`: one row per (method, budget).

    Each row is a dict with ``method`` (``"<representation>/<scoring>"``, ``"oracle"`` or
    ``"sink+local"``), ``representation``, ``scoring``, ``budget`` (label), ``recall`` (mean
    attention-mass recall), ``oracle_recall`` (the oracle's, at the same number of blocks per
    query and head), ``relative`` (``recall / oracle_recall``), ``blocks`` (mean selected blocks
    per query and KV head), ``num_blocks`` (mean blocks of the sequence) and ``per_head`` (recall
    per query head).
    """

    rows: list[dict[str, Any]] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"meta": dict(self.meta), "rows": [dict(r) for r in self.rows]}

    def format_table(self) -> str:
        lines = [f"{'method':<26}{'budget':<16}{'blocks':>8}{'recall':>9}{'oracle':>9}{'rel':>8}"]
        for r in self.rows:
            lines.append(
                f"{r['method']:<26}{r['budget']:<16}{r['blocks']:>8.1f}{r['recall']:>9.4f}"
                f"{r['oracle_recall']:>9.4f}{r['relative']:>8.3f}"
            )
        return "\n".join(lines)


def recall_curve(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    budgets: Sequence[Budget],
    block_size: int,
    representations: Sequence[str] | None = None,
    selection: str = "shared",
    sink_blocks: int = 1,
    local_blocks: int = 2,
    min_blocks: int = 1,
    observation_q: torch.Tensor | None = None,
    hash_encoder: HashEncoder | None = None,
    hash_seed: int = 0,
    kvstar: KVStarConfig | None = None,
    quest_group: str = "sum",
    scale: float | None = None,
) -> RecallCurve:
    """Recall per representation and budget on real Q/K of one layer (one sequence).

    Parameters
    ----------
    q:
        ``[Hq, Tq, D]``: queries of the last ``Tq`` tokens (positions ``T-Tq .. T-1``), post-RoPE.
        Each query token is evaluated on its own, as a decode step whose sequence ends at it:
        its selection is computed from its own query (for ``subblock``/``kvstar_vote``: voted by
        it and up to ``kvstar.retrieval_stride - 1`` preceding queries of ``q``), and its recall
        is measured with :func:`attention_mass_recall`. Results are averaged over query tokens.
    k:
        ``[Hkv, T, D]`` post-RoPE keys of all ``T`` tokens.
    budgets:
        :class:`~ucm_trt.config.Budget` values (e.g. ``Budget.ratio(1/8)``).
    block_size:
        Tokens per block (a power of two).
    representations:
        Subset of ``mean, minmax, hash, first, weighted_mean, subblock``, each scored as in
        :data:`SCORING_FOR_REPRESENTATION`. ``None``: all of them, except ``weighted_mean``
        when ``observation_q`` is not given.
    selection:
        ``"shared"`` (scores reduced over KV heads, one selection) or ``"per_head"``.
    sink_blocks, local_blocks, min_blocks:
        Forced windows and dense threshold, as :class:`~ucm_trt.config.SparseConfig`.
    observation_q:
        ``[Hq, To, D]``: queries of the ``To`` tokens just before ``q``'s (positions
        ``T-Tq-To .. T-Tq-1``). Their attention mass per key weights ``weighted_mean``; required
        for it (the evaluated queries themselves are never used as weights).
    hash_encoder:
        Encoder for ``hash``; default ``HashEncoder.random(D, D, seed=hash_seed)``.
    kvstar:
        :class:`~ucm_trt.config.KVStarConfig` for ``subblock`` (channels from all ``T`` keys).
    quest_group:
        ``group`` argument of :func:`~ucm_trt.sparse.score.quest_scores`.

    Returns
    -------
    :class:`RecallCurve` with rows for every representation x budget, the oracle at each
    count-based budget, and the ``sink+local`` baseline (no candidate blocks).
    """
    reps, kv_cfg = _check_curve_args(q, k, budgets, representations, selection, observation_q, kvstar, scale)
    # One SparseConfig per (representation, budget) validates block_size, windows and min_blocks.
    configs = {
        (rep, i): SparseConfig(
            block_size=block_size,
            sink_blocks=sink_blocks,
            local_blocks=local_blocks,
            budget=bud,
            min_blocks=min_blocks,
            representation=rep,
            scoring=SCORING_FOR_REPRESENTATION[rep],
            selection=selection,
        )
        for rep in reps
        for i, bud in enumerate(budgets)
    }
    base = SparseConfig(
        block_size=block_size, sink_blocks=sink_blocks, local_blocks=local_blocks, min_blocks=min_blocks,
        selection=selection,
    )
    steps = _DecodeSteps.of(q, k, base, scale)
    kb, blens = tokens_to_blocks(k, steps.block_size)  # [m, Hkv, bs, D], [m]
    scores = {
        rep: _representation_scores(rep, q, k, kb, blens, steps, observation_q=observation_q,
                                    hash_encoder=hash_encoder, hash_seed=hash_seed, kvstar=kv_cfg,
                                    quest_group=quest_group, scale=scale)
        for rep in reps
    }  # rep -> [Tq, Hkv, m]
    rows = [steps.row("sink+local", "-", steps.recall_of(steps.oracle_for(0)))]
    for i, bud in enumerate(budgets):
        label = _budget_label(bud)
        if bud.kind in ("top_k", "ratio"):
            c = budget_counts(bud, steps.candidates)
            rows.append(steps.row("oracle", label, steps.recall_of(steps.oracle_for(c[:, None]))))
        for rep in reps:
            rows.append(steps.method_row(rep, label, scores[rep], configs[(rep, i)]))
    hq, tq, d = q.shape
    meta = dict(num_q_heads=hq, num_kv_heads=k.shape[0], head_dim=d, num_tokens=k.shape[1], num_queries=tq,
                block_size=steps.block_size, selection=selection, sink_blocks=sink_blocks,
                local_blocks=local_blocks, min_blocks=min_blocks,
                kvstar=dict(channel_ratio=kv_cfg.kept_ratio, token_merge=kv_cfg.token_merge,
                            retrieval_stride=kv_cfg.retrieval_stride))
    return RecallCurve(rows=rows, meta=meta)


def _check_curve_args(q, k, budgets, representations, selection, observation_q, kvstar, scale):
    """recall_curve's argument checks; returns the representations to score and the KVStar config."""
    check_tensor("q", q, ndim=3, dtypes=FLOAT_DTYPES)
    hq, tq, d = q.shape
    check_tensor("k", k, ndim=3, dtypes=FLOAT_DTYPES, shape=(None, None, d))
    check_same_device(q=q, k=k)
    hkv, t, _ = k.shape
    check_gqa(hq, hkv)
    if tq > t:
        raise ValueError(f"q has {tq} query tokens but k only {t} keys; the queries are the last tokens of k")
    if isinstance(budgets, Budget) or not isinstance(budgets, Sequence) or len(budgets) == 0:
        raise TypeError(f"budgets must be a non-empty sequence of Budget, got {budgets!r}")
    for i, bud in enumerate(budgets):
        if not isinstance(bud, Budget):
            raise TypeError(f"budgets[{i}] must be a Budget, got {bud!r}")
    if selection not in ("shared", "per_head"):
        raise ValueError(f"selection must be 'shared' or 'per_head', got {selection!r}")
    if observation_q is not None:
        check_tensor("observation_q", observation_q, ndim=3, dtypes=FLOAT_DTYPES, shape=(hq, None, d))
        check_same_device(q=q, observation_q=observation_q)
        if observation_q.shape[1] > t - tq:
            raise ValueError(
                f"observation_q has {observation_q.shape[1]} tokens, but only T - Tq = {t - tq} tokens precede q"
            )
    reps = _check_representations(representations, observation_q is not None)
    kv_cfg = KVStarConfig() if kvstar is None else kvstar
    if not isinstance(kv_cfg, KVStarConfig):
        raise TypeError(f"kvstar must be a KVStarConfig or None, got {type(kvstar).__name__}")
    _check_scale(scale)
    return reps, kv_cfg


def _check_representations(representations, have_observation: bool) -> list[str]:
    if representations is None:
        return [r for r in REPRESENTATIONS if r != "weighted_mean" or have_observation]
    if isinstance(representations, str) or not isinstance(representations, Sequence):
        raise TypeError(f"representations must be a sequence of names, got {representations!r}")
    reps = list(representations)
    for r in reps:
        if r not in REPRESENTATIONS:
            raise ValueError(f"representations: unknown {r!r}; choose from {', '.join(REPRESENTATIONS)}")
    if len(set(reps)) != len(reps):
        raise ValueError(f"representations must not repeat a name, got {reps}")
    if "weighted_mean" in reps and not have_observation:
        raise ValueError("representations includes 'weighted_mean', which needs observation_q (the weights)")
    return reps


@dataclass(frozen=True, eq=False)
class _DecodeSteps:
    """Every query token of recall_curve's ``q`` as a decode step: query token ``i`` ends a sequence
    of ``T - Tq + i + 1`` tokens. Holds the exact block mass of each step and what the windows force."""

    config: SparseConfig  # block size, windows, min_blocks, selection
    num_kv_heads: int
    group: int
    q_steps: torch.Tensor  # [Tq, Hq, D]
    num_blocks: torch.Tensor  # int32 [Tq]: blocks of each step's sequence
    mass: torch.Tensor  # [Tq, Hq, m]: exact attention mass per block
    forced: torch.Tensor  # bool [Tq, m]
    candidates: torch.Tensor  # bool [Tq, m]: blocks of the sequence that are not forced
    oracle_scores: torch.Tensor  # [Tq, Hkv or 1, m]: mass summed per KV head (or over all heads)

    @classmethod
    def of(cls, q: torch.Tensor, k: torch.Tensor, cfg: SparseConfig, scale: float | None) -> _DecodeSteps:
        hq, tq, d = q.shape
        hkv, t, _ = k.shape
        bs, group, dev = cfg.block_size, hq // hkv, q.device
        lens = torch.arange(t - tq + 1, t + 1, device=dev, dtype=torch.int64)  # [Tq]
        num_blocks = ((lens + bs - 1) // bs).to(torch.int32)
        m = (t + bs - 1) // bs
        q_steps = q.transpose(0, 1)  # [Tq, Hq, D]
        # Exact block mass of each query token (its own token, always visible, lies in a forced block).
        mass = block_attention_mass(q_steps[:, :, None, :], k[None].expand(tq, hkv, t, d), block_size=bs,
                                    seq_lens=lens, scale=scale)[:, :, 0, :]  # [Tq, Hq, m]
        forced = _forced(num_blocks.to(torch.int64), m, cfg.sink_blocks, cfg.local_blocks, cfg.min_blocks)
        per_kv_mass = mass.reshape(tq, hkv, group, m).sum(2)
        return cls(
            config=cfg, num_kv_heads=hkv, group=group, q_steps=q_steps, num_blocks=num_blocks, mass=mass,
            forced=forced, candidates=(torch.arange(m, device=dev) < num_blocks[:, None]) & ~forced,
            oracle_scores=per_kv_mass if cfg.selection == "per_head" else per_kv_mass.sum(1, keepdim=True),
        )

    @property
    def block_size(self) -> int:
        return self.config.block_size

    def recall_of(self, sel: torch.Tensor) -> tuple[float, list[float], float]:
        """(mean recall, recall per query head, mean selected blocks) of selection ``sel`` [Tq, Hkv, S]."""
        smask = selection_mask(sel, self.mass.shape[-1]).repeat_interleave(self.group, dim=1)  # [Tq, Hq, m]
        per = (self.mass * smask).sum(-1)  # [Tq, Hq]
        blocks = float(selection_counts(sel).float().mean())
        return float(per.mean()), per.mean(0).tolist(), blocks

    def oracle_for(self, counts: int | torch.Tensor) -> torch.Tensor:
        """The oracle selection with ``counts`` candidate blocks per row (0: sink+local only)."""
        c = self.config
        return select_blocks_by_count(
            self.oracle_scores, self.num_blocks, counts, sink_blocks=c.sink_blocks, local_blocks=c.local_blocks,
            min_blocks=c.min_blocks, num_kv_heads=self.num_kv_heads,
        )

    def row(self, method: str, budget: str, recall: tuple[float, list[float], float]) -> dict[str, Any]:
        """A row whose method is its own oracle (the oracle, or the sink+local baseline)."""
        rec, heads, blocks = recall
        return dict(method=method, representation=None, scoring=None, budget=budget, recall=rec,
                    oracle_recall=rec, relative=1.0, blocks=blocks,
                    num_blocks=float(self.num_blocks.float().mean()), per_head=heads)

    def method_row(self, rep: str, budget: str, scores: torch.Tensor, cfg: SparseConfig) -> dict[str, Any]:
        """Select with ``cfg`` from ``scores`` [Tq, Hkv, m]; recall against the oracle with as many candidates."""
        shared = cfg.selection == "shared"
        s = reduce_scores(scores, cfg.scoring) if shared else scores
        sel = select_blocks(s, self.num_blocks, cfg, num_kv_heads=self.num_kv_heads)
        rec, heads, blocks = self.recall_of(sel)
        kept = selection_counts(sel) - self.forced.sum(-1, keepdim=True)  # [Tq, Hkv]
        if shared:
            kept = kept[:, :1]  # identical rows
        orc = self.recall_of(self.oracle_for(kept))[0]
        return dict(method=f"{rep}/{cfg.scoring}", representation=rep, scoring=cfg.scoring, budget=budget,
                    recall=rec, oracle_recall=orc, relative=rec / orc if orc > 0 else float("nan"),
                    blocks=blocks, num_blocks=float(self.num_blocks.float().mean()), per_head=heads)


def _representation_scores(rep, q, k, kb, blens, steps, *, observation_q, hash_encoder, hash_seed, kvstar,
                           quest_group, scale) -> torch.Tensor:
    """Scores [Tq, Hkv, m] of every decode step under representation ``rep`` (its own scoring)."""
    q_steps, dev = steps.q_steps, q.device
    tq, d, t = q.shape[1], q.shape[2], k.shape[1]
    if rep == "mean":
        return dot_scores(q_steps, block_mean(kb, blens))
    if rep == "first":
        return dot_scores(q_steps, block_first(kb, blens))
    if rep == "weighted_mean":
        end = t - tq  # observation queries are positions end - To .. end - 1
        w = attention_token_weights(observation_q[None], k[None, :, :end], scale=scale)[0]  # [Hkv, end]
        w = torch.nn.functional.pad(w, (0, t - end))
        wb, _ = tokens_to_blocks(w[..., None], steps.block_size)  # [m, Hkv, bs, 1]
        return dot_scores(q_steps, block_weighted_mean(kb, blens, wb[..., 0]))
    if rep == "minmax":
        kmin, kmax = block_minmax(kb, blens)
        return quest_scores(q_steps, kmin, kmax, group=quest_group)
    if rep == "hash":
        enc = hash_encoder if hash_encoder is not None else HashEncoder.random(d, d, seed=hash_seed)
        return hamming_scores(q_steps, enc.to(dev), block_hash_codes(kb, blens, enc.to(dev)), blens)
    if rep == "subblock":
        sub = kvstar_subblock(kb, blens, kvstar)
        r = kvstar.retrieval_stride
        src = torch.arange(tq, device=dev)[:, None] - (r - 1) + torch.arange(r, device=dev)[None, :]  # [Tq, R]
        voters = q[:, src.clamp(min=0)].permute(1, 0, 2, 3)  # [Tq, Hq, R, D]
        return kvstar_vote_scores(voters, sub, block_mask=steps.candidates, query_mask=src >= 0)
    raise ValueError(f"unknown representation {rep!r}")  # pragma: no cover - guarded by the argument checks
