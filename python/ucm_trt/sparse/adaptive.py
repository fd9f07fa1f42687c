"""Adaptive budget (:class:`ucm_trt.config.AdaptiveBudget`): widen a selection, or run the layer
dense, where the block scores say the budget misses attention mass.

The estimate is cheap — it reuses the retrieval's own block scores, no extra pass over K: a block's
score, scaled by ``1/sqrt(D)``, is read as the logit of each of its ``n_b`` tokens, so block ``b``
gets the estimated weight ``n_b * exp(scale * s_b)``. The estimated missed mass of a selection is
the weight of the candidate blocks left out over the weight of every block (the forced sink /
local windows always count as kept). With mean-K scores this underestimates the mass of peaked
blocks (Jensen), with the Quest bound it overestimates it (an upper bound per token).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ucm_trt.config import AdaptiveBudget, SparseConfig
from ucm_trt.sparse.score import reduce_scores
from ucm_trt.sparse.select import budget_counts, candidate_mask, select_blocks_by_count

__all__ = ["AdaptiveOutcome", "adaptive_select", "estimated_missed_mass"]


@dataclass(frozen=True, kw_only=True)
class AdaptiveOutcome:
    """What :func:`adaptive_select` did, per layer."""

    widened: torch.Tensor  # bool [L]: the budget grew (and the layer stayed sparse)
    dense: torch.Tensor  # bool [L]: the layer runs dense for this retrieval
    base_blocks: int  # (layer, KV head, block) entries the plain budget selects
    extra_blocks: int  # entries added by widening and dense fallback
    missed_before: torch.Tensor  # float [L, Hkv]: estimated missed mass at the plain budget
    missed_after: torch.Tensor  # float [L, Hkv]: after widening (0 for dense layers)


def _weights(scores: torch.Tensor, block_lens: torch.Tensor, scale: float) -> torch.Tensor:
    """``n_b * exp(scale * s_b)`` per row, normalised by the row's max logit (``[..., nb]``, float64)."""
    logit = scores.double() * scale
    valid = block_lens > 0
    logit = torch.where(valid, logit, float("-inf"))
    top = logit.amax(-1, keepdim=True).clamp(min=-1e300)
    return block_lens.double() * torch.exp(logit - top) * valid


def estimated_missed_mass(scores: torch.Tensor, selected: torch.Tensor, block_lens: torch.Tensor,
                          scale: float) -> torch.Tensor:
    """Estimated attention mass outside ``selected`` (bool ``[..., nb]``) from block ``scores``
    ``[..., nb]`` (token counts ``block_lens [nb]``): ``sum_unsel w / sum w``, ``w = n exp(scale s)``."""
    w = _weights(scores, block_lens, scale)
    total = w.sum(-1)
    return ((w * (~selected)).sum(-1) / total.clamp(min=1e-300)).float()


def adaptive_select(
    scores: torch.Tensor,
    num_blocks: int,
    block_lens: torch.Tensor,
    sparse: SparseConfig,
    rule: AdaptiveBudget,
    *,
    scale: float,
    extra: int = 0,
) -> tuple[torch.Tensor, AdaptiveOutcome]:
    """Selections of every layer with an adaptive budget.

    ``scores [L, Hkv, nb]``: per-KV-head block scores read as logit estimates (higher is better;
    for a shared selection the ranking is their sum over heads, the estimate stays per head);
    ``block_lens [nb]``: valid tokens per block. The plain budget (``sparse.budget`` + ``extra``) is
    widened per layer to the fewest best candidates whose estimated missed mass is at most
    ``rule.max_missed`` (for every KV head), capped at ``rule.max_ratio`` of the candidates; a layer
    that needs more runs dense (every block) when ``rule.dense_fallback``, else keeps the cap.
    Returns int32 ``[L, Hkv, S]`` (sorted, -1 padded) and the :class:`AdaptiveOutcome`."""
    if not isinstance(rule, AdaptiveBudget):
        raise TypeError(f"rule must be an AdaptiveBudget, got {type(rule).__name__}")
    if scores.dim() != 3 or scores.shape[-1] != num_blocks or tuple(block_lens.shape) != (num_blocks,):
        raise ValueError(f"scores must be [L, Hkv, nb={num_blocks}] and block_lens [nb], got "
                         f"{tuple(scores.shape)} and {tuple(block_lens.shape)}")
    L, hkv, nb = scores.shape
    s = scores.float()
    rank = reduce_scores(s, sparse.scoring) if sparse.selection == "shared" else s  # [L, H', nb]
    nbt = torch.full((L,), nb, dtype=torch.int32)
    cand = candidate_mask(nbt, nb, sink_blocks=sparse.sink_blocks, local_blocks=sparse.local_blocks,
                          min_blocks=sparse.min_blocks)  # [L, nb]
    n_cand = int(cand[0].sum())
    base = budget_counts(sparse.budget, cand[:, None, :].expand_as(rank), rank) + extra  # [L, H']
    base = base.clamp(max=n_cand)
    w = _weights(s, block_lens, scale)  # [L, Hkv, nb]
    total = w.sum(-1).clamp(min=1e-300)  # [L, Hkv]
    # candidates in ranking order, and the estimated mass kept after the top k of them
    order = torch.where(cand[:, None, :], rank, float("-inf")).argsort(-1, descending=True)  # [L, H', nb]
    order = order.expand(L, hkv, nb) if rank.shape[1] == 1 else order
    w_sorted = torch.gather(w * cand[:, None, :], -1, order)
    cand_total = w_sorted.sum(-1)  # [L, Hkv]
    kept = torch.cat([torch.zeros(L, hkv, 1, dtype=w.dtype), w_sorted.cumsum(-1)], -1)  # [L, Hkv, nb+1]
    missed = (cand_total[..., None] - kept) / total[..., None]  # missed(k), k = 0..nb
    base_h = base.expand(L, hkv) if base.shape[1] == 1 else base
    missed_before = torch.gather(missed, -1, base_h[..., None]).squeeze(-1).float()
    ok = missed <= rule.max_missed
    ok[..., n_cand:] = True  # every candidate kept: nothing is missed
    need = ok.to(torch.int8).argmax(-1)  # smallest k meeting the target, per head
    if rank.shape[1] == 1:
        need = need.amax(1, keepdim=True)  # shared: enough for every head
    cap = max(1, int(rule.max_ratio * n_cand))
    counts = torch.maximum(base, need)
    over = (need > torch.maximum(base, torch.full_like(base, cap))).any(1)  # [L]
    dense = over & rule.dense_fallback
    counts = torch.where(over[:, None] & ~dense[:, None], torch.maximum(base, torch.full_like(base, cap)), counts)
    counts = torch.where(dense[:, None], torch.full_like(counts, n_cand), counts)
    widened = (counts > base).any(1) & ~dense
    sel = select_blocks_by_count(rank, nbt, counts, sink_blocks=sparse.sink_blocks, local_blocks=sparse.local_blocks,
                                 min_blocks=sparse.min_blocks, num_kv_heads=hkv)
    counts_h = counts.expand(L, hkv) if counts.shape[1] == 1 else counts
    after = torch.gather(missed, -1, counts_h[..., None]).squeeze(-1).float()
    forced = nb - n_cand
    base_blocks = int((base_h + forced).sum())
    extra_blocks = int((counts_h - base_h).sum())
    return sel, AdaptiveOutcome(widened=widened, dense=dense, base_blocks=base_blocks, extra_blocks=extra_blocks,
                                missed_before=missed_before, missed_after=torch.where(dense[:, None], 0.0, after))
