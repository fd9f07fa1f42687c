"""Diffuse-layer detection from a prefill's own attention (:class:`ucm_trt.config.DenseLayers`).

A layer is *diffuse* for a request when even the oracle selection — the true top blocks by the
attention mass of the prompt's last queries, at the policy's budget and with its forced windows —
keeps less than ``threshold`` of that attention. No block representation can do better than the
oracle, so such a layer runs dense for the request. The statistics are exact and cheap: one row of
attention per probe query per layer (``[Hq, W, T]``), computed at prefill end from the prompt's K.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ucm_trt.config import DenseLayers, SparseConfig
from ucm_trt.sparse.recall import attention_mass_recall, oracle_selection

__all__ = ["detect_dense_layers", "layer_oracle_recall"]


def layer_oracle_recall(q: torch.Tensor, k: torch.Tensor, sparse: SparseConfig) -> float:
    """Oracle attention-mass recall of one layer at ``sparse``'s budget and windows.

    ``q [Hq, W, D]``: the last ``W`` prompt queries (post-RoPE); ``k [Hkv, T, D]``: the prompt's K
    (post-RoPE), ``T`` tokens. A prompt too short to be sparse (fewer than ``sparse.min_blocks``
    blocks, or no candidate blocks) gives 1.0. Score-dependent budgets (threshold, mass) are read as
    ratio 0.125, the budget the issue's targets are stated at."""
    if q.dim() != 3 or k.dim() != 3 or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q must be [Hq, W, D] and k [Hkv, T, D], got {tuple(q.shape)} and {tuple(k.shape)}")
    bs = sparse.block_size
    t = k.shape[1]
    nb = (t + bs - 1) // bs
    candidates = nb - sparse.forced_blocks
    if nb < sparse.min_blocks or candidates <= 0:
        return 1.0
    keep = sparse.budget.num_blocks(candidates)
    if keep is None:
        keep = max(1, int(0.125 * candidates))
    qb = q[None].to(k.device, torch.float32)
    kb = k[None].float()
    sel = oracle_selection(qb, kb, block_size=bs, counts=keep, sink_blocks=sparse.sink_blocks,
                           local_blocks=sparse.local_blocks, min_blocks=sparse.min_blocks, mode=sparse.selection)
    return attention_mass_recall(qb, kb, sel, block_size=bs).mean


def detect_dense_layers(
    queries: list[torch.Tensor],
    keys: Callable[[int], torch.Tensor],
    prompt_len: int,
    sparse: SparseConfig,
    rule: DenseLayers,
) -> tuple[frozenset[int], dict[int, float]]:
    """The layers that run dense for one request, and the oracle recall of each probed layer.

    ``queries[l] [Hq, W, D]``: the last prompt queries of layer ``l`` (as ``Policy.on_prefill_end``
    receives them); ``keys(l)``: the prompt's K blocks of layer ``l``, ``[nb, Hkv, block_size, D]``.
    ``rule.layers`` are always dense; with ``rule.auto`` every other layer whose oracle recall is
    below ``rule.threshold`` is too."""
    if not isinstance(rule, DenseLayers):
        raise TypeError(f"rule must be a DenseLayers, got {type(rule).__name__}")
    dense = set(rule.layers)
    recalls: dict[int, float] = {}
    if rule.auto:
        for layer, q in enumerate(queries):
            if layer in dense:
                continue
            kb = keys(layer)  # [nb, Hkv, bs, D]
            k = kb.permute(1, 0, 2, 3).reshape(kb.shape[1], -1, kb.shape[-1])[:, :prompt_len]
            recalls[layer] = layer_oracle_recall(q, k, sparse)
            if recalls[layer] < rule.threshold:
                dense.add(layer)
    return frozenset(dense), recalls
