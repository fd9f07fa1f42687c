"""Block selection: forced sink/local windows plus a budgeted top-k of the candidate blocks.

Output format (DESIGN §3): a selection is an int32 tensor ``[batch, num_kv_heads, max_selected]``
of logical block ids, sorted ascending, padded at the end with ``-1``. The sink blocks (the first
``sink_blocks``) and the local window (the last ``local_blocks`` blocks of the sequence, which
include the partial last block) are always selected. Every other block of the sequence is a
*candidate*; the budget decides how many candidates are kept, best score first.

Scores are "higher is better" everywhere. Ties are broken deterministically: on equal scores the
lower block id wins. Blocks at or past a sequence's ``num_blocks`` are never selected, whatever
their score (their scores may be anything, NaN included).

Functions
---------
select_blocks            selection from scores and a :class:`~ucm_trt.config.SparseConfig`
select_blocks_by_count   selection keeping an explicit number of candidates per row (oracle, tests)
budget_counts            candidates kept per row for a :class:`~ucm_trt.config.Budget`
forced_mask, candidate_mask
                         which blocks are forced / candidates for given ``num_blocks``
selection_mask           selection -> bool ``[B, H, max_blocks]``
mask_to_selection        bool mask -> selection (sorted, -1 padded)
selection_counts         number of selected blocks per row
union_kv_heads           every KV-head row -> the union of the rows of its batch entry (HeadMerge "union")
union_kv_heads_fixed     the same at a fixed width, without a host sync (capturable in a CUDA graph)
num_blocks_from_seq_lens ceil(seq_len / block_size)
"""

from __future__ import annotations

import torch

from ucm_trt._validation import (
    FLOAT_DTYPES,
    INT_DTYPES,
    check_non_negative_int,
    check_positive_int,
    check_same_device,
    check_tensor,
)
from ucm_trt.config import Budget, SparseConfig

__all__ = [
    "select_blocks",
    "select_blocks_by_count",
    "budget_counts",
    "forced_mask",
    "candidate_mask",
    "selection_mask",
    "mask_to_selection",
    "selection_counts",
    "union_kv_heads",
    "union_kv_heads_fixed",
    "num_blocks_from_seq_lens",
]

_SIGNED_INT_DTYPES = (torch.int16, torch.int32, torch.int64)


def num_blocks_from_seq_lens(seq_lens: torch.Tensor, block_size: int) -> torch.Tensor:
    """Blocks holding each sequence: ``ceil(seq_lens / block_size)`` as int32, same shape."""
    check_tensor("seq_lens", seq_lens, dtypes=INT_DTYPES)
    check_positive_int("block_size", block_size)
    if seq_lens.numel() and int(seq_lens.min()) < 0:
        raise ValueError(f"seq_lens must be >= 0, got {seq_lens.tolist()}")
    return ((seq_lens.to(torch.int64) + block_size - 1) // block_size).to(torch.int32)


def _check_num_blocks(num_blocks: object, batch: int, max_blocks: int, device: torch.device) -> torch.Tensor:
    nb = check_tensor("num_blocks", num_blocks, ndim=1, dtypes=INT_DTYPES, shape=(batch,))
    check_same_device(scores=torch.empty(0, device=device), num_blocks=nb)
    if nb.numel():
        lo, hi = int(nb.min()), int(nb.max())
        if lo < 0 or hi > max_blocks:
            raise ValueError(
                f"num_blocks must be in [0, {max_blocks}] (max_blocks = scores.shape[-1]), "
                f"got {nb.tolist()}"
            )
    return nb.to(torch.int64)


def forced_mask(
    num_blocks: torch.Tensor,
    max_blocks: int,
    *,
    sink_blocks: int,
    local_blocks: int,
    min_blocks: int = 1,
) -> torch.Tensor:
    """Bool ``[B, max_blocks]``: blocks always selected.

    Those are the first ``sink_blocks`` and the last ``local_blocks`` valid blocks of each sequence,
    or every valid block when the sequence has fewer than ``min_blocks`` blocks (it runs dense).
    """
    check_non_negative_int("max_blocks", max_blocks)
    check_tensor("num_blocks", num_blocks, ndim=1, dtypes=INT_DTYPES)
    nb = _check_num_blocks(num_blocks, num_blocks.shape[0], max_blocks, num_blocks.device)
    check_non_negative_int("sink_blocks", sink_blocks)
    check_positive_int("local_blocks", local_blocks)
    check_positive_int("min_blocks", min_blocks)
    return _forced(nb, max_blocks, sink_blocks, local_blocks, min_blocks)


def _forced(nb: torch.Tensor, max_blocks: int, sink: int, local: int, min_blocks: int) -> torch.Tensor:
    idx = torch.arange(max_blocks, device=nb.device)
    n = nb[:, None]
    valid = idx < n
    dense = n < min_blocks
    return valid & ((idx < sink) | (idx >= n - local) | dense)


def candidate_mask(
    num_blocks: torch.Tensor,
    max_blocks: int,
    *,
    sink_blocks: int,
    local_blocks: int,
    min_blocks: int = 1,
) -> torch.Tensor:
    """Bool ``[B, max_blocks]``: valid blocks that are not forced (the ones a budget chooses from)."""
    forced = forced_mask(
        num_blocks, max_blocks, sink_blocks=sink_blocks, local_blocks=local_blocks, min_blocks=min_blocks
    )
    idx = torch.arange(max_blocks, device=forced.device)
    return (idx < num_blocks.to(torch.int64)[:, None]) & ~forced


def mask_to_selection(mask: torch.Tensor, max_selected: int | None = None) -> torch.Tensor:
    """Bool ``[B, H, M]`` -> int32 selection ``[B, H, S]`` (ids ascending, -1 padded).

    ``max_selected=None`` makes ``S`` the largest row count (at least 1); an int fixes ``S`` and
    raises if a row selects more blocks than that.
    """
    check_tensor("mask", mask, ndim=3, dtypes=(torch.bool,))
    counts = mask.sum(-1)
    most = int(counts.max()) if counts.numel() else 0
    if max_selected is None:
        width = max(1, most)
    else:
        width = check_positive_int("max_selected", max_selected)
        if most > width:
            raise ValueError(f"max_selected = {width} is too small: a row selects {most} blocks")
    return _compact(mask, width)


def _compact(mask: torch.Tensor, width: int) -> torch.Tensor:
    """Bool ``[..., M]`` -> int32 ``[..., width]``: each row's set ids ascending, -1 padded; no check
    and no host read (the caller knows every row fits ``width``)."""
    m = mask.shape[-1]
    idx = torch.arange(m, device=mask.device, dtype=torch.int64)
    keyed = torch.where(mask, idx, torch.full_like(idx, m))
    ordered = keyed.sort(dim=-1).values
    if width > m:
        pad = torch.full((*ordered.shape[:-1], width - m), m, dtype=ordered.dtype, device=ordered.device)
        ordered = torch.cat([ordered, pad], dim=-1)
    ordered = ordered[..., :width]
    return torch.where(ordered == m, torch.full_like(ordered, -1), ordered).to(torch.int32)


def _check_selection(selection: object, name: str = "selection") -> torch.Tensor:
    return check_tensor(name, selection, ndim=3, dtypes=_SIGNED_INT_DTYPES)


def selection_mask(selection: torch.Tensor, max_blocks: int) -> torch.Tensor:
    """Selection ``[B, H, S]`` -> bool ``[B, H, max_blocks]`` (True = block selected).

    Entries must be -1 (padding) or block ids in ``[0, max_blocks)``.
    """
    sel = _check_selection(selection)
    check_non_negative_int("max_blocks", max_blocks)
    if sel.numel():
        lo, hi = int(sel.min()), int(sel.max())
        if lo < -1 or hi >= max_blocks:
            raise ValueError(
                f"selection entries must be -1 (padding) or block ids in [0, {max_blocks}), "
                f"got values in [{lo}, {hi}]"
            )
    return _scatter_mask(sel, max_blocks)


def _scatter_mask(sel: torch.Tensor, max_blocks: int) -> torch.Tensor:
    """:func:`selection_mask` without its entry check (no host read)."""
    out = torch.zeros((*sel.shape[:-1], max_blocks + 1), dtype=torch.bool, device=sel.device)
    idx = torch.where(sel < 0, torch.full_like(sel, max_blocks), sel).to(torch.int64)
    out.scatter_(-1, idx, True)
    return out[..., :max_blocks]


def selection_counts(selection: torch.Tensor) -> torch.Tensor:
    """Number of selected (non -1) blocks per row, int64 ``[B, H]``."""
    sel = _check_selection(selection)
    return (sel >= 0).sum(-1)


def union_kv_heads(selection: torch.Tensor, max_blocks: int) -> torch.Tensor:
    """Selection ``[B, H, S]`` -> ``[B, H, S']``: every head row of a batch entry becomes the union of that
    entry's ``H`` rows (ids ascending, -1 padded, ``S'`` the largest union, at least 1), the same dtype.

    Entries must be -1 or block ids in ``[0, max_blocks)`` (:func:`selection_mask`). With
    :class:`~ucm_trt.config.HeadMerge` ``mode="union"`` the offload policies give every KV head the blocks
    any head of the layer selected (a layer's selections are one batch entry)."""
    sel = _check_selection(selection)
    mask = selection_mask(sel, max_blocks).any(dim=1, keepdim=True)  # [B, 1, max_blocks]
    out = mask_to_selection(mask)  # [B, 1, S']
    return out.expand(-1, sel.shape[1], -1).contiguous().to(sel.dtype)


def union_kv_heads_fixed(selection: torch.Tensor, max_blocks: int) -> torch.Tensor:
    """:func:`union_kv_heads` at the fixed width ``S' = min(H * S, max_blocks)`` (at least 1), with no
    host sync: capturable in a CUDA graph, for a selection made on the device each step (GSA
    On-Device's). Every head row of a batch entry becomes the union of that entry's ``H`` rows, ids
    ascending, ``-1`` past the union; the width always holds the union, so nothing is dropped.

    The entries are not checked (a check reads them on the host): they must be -1 or block ids in
    ``[0, max_blocks)``, as a retrieval kernel's output is by construction; an id outside that range
    would be written past the row (``scatter_`` raises on the CPU, and is undefined on a GPU)."""
    sel = _check_selection(selection)
    check_positive_int("max_blocks", max_blocks)
    b, h, s = sel.shape
    width = max(1, min(h * s, max_blocks))  # the union of H rows of S ids never exceeds it
    union = _compact(_scatter_mask(sel.reshape(b, 1, h * s), max_blocks), width)  # [B, 1, width]
    return union.expand(b, h, width).contiguous().to(sel.dtype)


def budget_counts(
    budget: Budget,
    candidates: torch.Tensor,
    scores: torch.Tensor | None = None,
) -> torch.Tensor:
    """Candidates kept per row under ``budget``, int64 with ``candidates.shape[:-1]``.

    ``candidates`` is the bool candidate mask ``[..., M]``. ``scores`` (same shape, higher is
    better) is needed by the score-dependent kinds:

    - ``top_k``: ``min(k, n)`` for ``n`` candidates;
    - ``ratio``: ``floor(r * n)``, at least 1 when ``n > 0`` (as :meth:`Budget.num_blocks`);
    - ``threshold``: candidates with ``score >= t``;
    - ``mass``: the smallest ``c`` such that the ``c`` best candidates hold at least ``m`` of the
      candidates' softmax(score) mass (computed in float64; ``m = 1`` keeps every candidate).
    """
    if not isinstance(budget, Budget):
        raise TypeError(f"budget must be a Budget, got {type(budget).__name__}")
    cand = check_tensor("candidates", candidates, dtypes=(torch.bool,))
    n = cand.sum(-1)
    if budget.kind == "top_k":
        return n.clamp(max=int(budget.value))
    if budget.kind == "ratio":
        kept = torch.floor(n.to(torch.float64) * float(budget.value) + 1e-9).to(torch.int64)
        return torch.where(n > 0, kept.clamp(min=1), torch.zeros_like(n)).minimum(n)
    if scores is None:
        raise ValueError(f"scores are required for a {budget.kind!r} budget")
    s = check_tensor("scores", scores, dtypes=FLOAT_DTYPES, shape=tuple(cand.shape))
    if budget.kind == "threshold":
        return (cand & (s.to(torch.float32) >= float(budget.value))).sum(-1)
    # mass: softmax over the candidates, best first, smallest prefix covering the target.
    if float(budget.value) >= 1.0:  # exact: every candidate has positive mass
        return n
    s64 = torch.where(cand, s.to(torch.float64), torch.full_like(s, float("-inf"), dtype=torch.float64))
    srt = s64.sort(dim=-1, descending=True).values
    top = srt[..., :1]
    w = torch.where(torch.isfinite(srt), torch.exp(srt - torch.where(torch.isfinite(top), top, 0.0)), 0.0)
    total = w.sum(-1, keepdim=True)
    frac = w.cumsum(-1) / torch.where(total > 0, total, 1.0)
    short = (frac < float(budget.value) - 1e-12) & (w > 0)
    c = short.sum(-1) + 1
    return torch.where(n > 0, c.minimum(n), torch.zeros_like(n))


def _select_mask(
    scores: torch.Tensor, counts: torch.Tensor, forced: torch.Tensor, cand: torch.Tensor
) -> torch.Tensor:
    """Bool ``[B, H, M]``: forced | the ``counts`` best candidates (lower id wins ties)."""
    s = scores.to(torch.float32)
    keyed = torch.where(cand, s, torch.full_like(s, float("-inf")))
    order = torch.sort(keyed, dim=-1, descending=True, stable=True).indices
    rank = torch.empty_like(order)
    rank.scatter_(-1, order, torch.arange(order.shape[-1], device=order.device).expand_as(order))
    return forced | (cand & (rank < counts[..., None]))


def _check_candidate_scores(scores: torch.Tensor, cand: torch.Tensor) -> None:
    bad = cand & ~torch.isfinite(scores)
    if bool(bad.any()):
        b, h, i = (int(x) for x in bad.nonzero()[0])
        raise ValueError(
            f"scores must be finite for candidate blocks; scores[{b}, {h}, {i}] = {float(scores[b, h, i])}"
        )


def _prepare(scores: object, num_blocks: object) -> tuple[torch.Tensor, torch.Tensor]:
    s = check_tensor("scores", scores, ndim=3, dtypes=FLOAT_DTYPES)
    nb = _check_num_blocks(num_blocks, s.shape[0], s.shape[-1], s.device)
    return s, nb


def _finish(mask: torch.Tensor, num_kv_heads: int, max_selected: int | None) -> torch.Tensor:
    if mask.shape[1] != num_kv_heads:
        mask = mask.expand(-1, num_kv_heads, -1)
    return mask_to_selection(mask.contiguous(), max_selected).contiguous()


def _resolve_heads(s: torch.Tensor, shared: bool, num_kv_heads: int | None) -> int:
    h = s.shape[1]
    if num_kv_heads is not None:
        check_positive_int("num_kv_heads", num_kv_heads)
    if shared:
        if h != 1:
            raise ValueError(
                f"shared selection needs scores reduced over KV heads, shape [B, 1, max_blocks]; "
                f"got scores shape {tuple(s.shape)} (reduce them with ucm_trt.sparse.score.reduce_scores)"
            )
        return 1 if num_kv_heads is None else num_kv_heads
    if num_kv_heads is not None and num_kv_heads != h:
        raise ValueError(
            f"num_kv_heads = {num_kv_heads} must equal scores.shape[1] = {h} for per-head selection"
        )
    return h


def select_blocks(
    scores: torch.Tensor,
    num_blocks: torch.Tensor,
    config: SparseConfig,
    *,
    num_kv_heads: int | None = None,
    max_selected: int | None = None,
) -> torch.Tensor:
    """Select blocks per sequence (and KV head) under ``config``'s windows and budget.

    Parameters
    ----------
    scores:
        Float ``[B, H, max_blocks]``, higher is better. With ``config.selection == "per_head"``
        ``H`` is the number of KV heads; with ``"shared"`` it must be 1 (scores already reduced
        over heads, see :func:`ucm_trt.sparse.score.reduce_scores`). Scores of candidate blocks
        must be finite.
    num_blocks:
        Int ``[B]``: valid blocks per sequence (``ceil(seq_len / block_size)``); blocks at or past
        it are never selected.
    config:
        Window sizes (``sink_blocks``, ``local_blocks``), ``min_blocks`` and ``budget``.
    num_kv_heads:
        Rows of the output. Shared mode repeats the one selection this many times (default 1);
        per-head mode checks it against ``scores.shape[1]``.
    max_selected:
        Output width. ``None``: the largest row count (data dependent); an int: fixed width
        (static shapes), which must hold every row.

    Returns
    -------
    int32 ``[B, num_kv_heads, max_selected]``, ids ascending, ``-1`` padded at the end.
    """
    if not isinstance(config, SparseConfig):
        raise TypeError(f"config must be a SparseConfig, got {type(config).__name__}")
    s, nb = _prepare(scores, num_blocks)
    heads = _resolve_heads(s, config.selection == "shared", num_kv_heads)
    m = s.shape[-1]
    forced = _forced(nb, m, config.sink_blocks, config.local_blocks, config.min_blocks)[:, None, :]
    valid = torch.arange(m, device=s.device) < nb[:, None, None]
    cand = valid & ~forced
    _check_candidate_scores(s, cand)
    counts = budget_counts(config.budget, cand.expand_as(s), s)
    mask = _select_mask(s, counts, forced, cand)
    return _finish(mask, heads, max_selected)


def select_blocks_by_count(
    scores: torch.Tensor,
    num_blocks: torch.Tensor,
    counts: int | torch.Tensor,
    *,
    sink_blocks: int,
    local_blocks: int,
    min_blocks: int = 1,
    num_kv_heads: int | None = None,
    max_selected: int | None = None,
) -> torch.Tensor:
    """Like :func:`select_blocks` but keeping exactly ``min(counts, candidates)`` candidates per row.

    ``counts`` is an int or an int tensor broadcastable to ``[B, H]``. ``scores`` ``[B, H, M]``:
    ``H == 1`` gives a shared selection repeated over ``num_kv_heads`` rows. Used by the oracle
    (:func:`ucm_trt.sparse.recall.oracle_selection`) to match another selection's budget.
    """
    s, nb = _prepare(scores, num_blocks)
    check_non_negative_int("sink_blocks", sink_blocks)
    check_positive_int("local_blocks", local_blocks)
    check_positive_int("min_blocks", min_blocks)
    heads = _resolve_heads(s, s.shape[1] == 1 and num_kv_heads is not None, num_kv_heads)
    b, h, m = s.shape
    if isinstance(counts, torch.Tensor):
        check_tensor("counts", counts, dtypes=INT_DTYPES)
        try:
            c = torch.broadcast_to(counts.to(device=s.device, dtype=torch.int64), (b, h))
        except RuntimeError as err:
            raise ValueError(
                f"counts must be broadcastable to [B, H] = [{b}, {h}], got shape {tuple(counts.shape)}"
            ) from err
        if c.numel() and int(c.min()) < 0:
            raise ValueError(f"counts must be >= 0, got min {int(c.min())}")
    else:
        check_non_negative_int("counts", counts)
        c = torch.full((b, h), counts, dtype=torch.int64, device=s.device)
    forced = _forced(nb, m, sink_blocks, local_blocks, min_blocks)[:, None, :]
    cand = (torch.arange(m, device=s.device) < nb[:, None, None]) & ~forced
    _check_candidate_scores(s, cand)
    mask = _select_mask(s, c.minimum(cand.sum(-1)), forced, cand)
    return _finish(mask, heads, max_selected)
