"""Block scoring of ESA and GSA over every layer at once, from ``[L, Hkv, D, nb]`` representation
stores (:class:`~ucm_trt.sparse.batched.BlockRepStore` views; a ``(min, max)`` pair of them for the
Quest bound, used by the diagnostics):

* ``dot``:   ``mean_{h in group} q_h . mean_k``                  (:func:`batched_dot_scores`)
* ``quest``: ``sum_{h in group} sum_d max(q_hd min_d, q_hd max_d)``
             = ``G * (mean_h relu(q_h) . max + mean_h min(q_h, 0) . min)``, two batched dot products;
             equal to :func:`ucm_trt.sparse.score.quest_scores` (``group="sum"``) per layer.

:func:`host_layer_scores` is the per-layer reference (the functions of :mod:`ucm_trt.sparse.score`)
that :func:`host_scores` must equal.

**Per-head vote** (:func:`host_vote_scores`, ``ESAPolicy(vote=True)`` / ``GSAPolicy(vote=True)``): instead of one score
from the group-averaged query, every query head ``h`` reads its own logit estimate per block
(``q_h . mean_k`` or its own Quest bound), scaled by ``1/sqrt(D)``, and softmaxes it over the blocks;
a block's score is the probability mass it gets, summed over the group's heads (over every head for
a shared selection). Each head then has one unit of vote: a retrieval head that puts its mass on
the needle's block is not outvoted by the raw dot products of the other heads (averaging the query
of a GQA group, or summing raw scores over heads, lets large-norm diffuse heads dominate). Measured
on SmolLM2 passkey prompts (docs/algorithms.md): the needle's block is kept in more layers, but the
end-to-end answers did not improve over block means alone; over 8-token sub-block means it is the
``default`` preset's scoring (``runtime.algorithms.BLOCK_SCORING``; the class default stays off).
"""

from __future__ import annotations

import math

import torch

from ucm_trt.sparse.batched import batched_dot_scores
from ucm_trt.sparse.score import dot_scores, quest_scores

__all__ = [
    "host_layer_scores",
    "host_layer_vote_scores",
    "host_scores",
    "host_vote_scores",
    "layer_view",
]

Reps = torch.Tensor | tuple[torch.Tensor, torch.Tensor]


def host_scores(reps: Reps, q: torch.Tensor) -> torch.Tensor:
    """Every layer: ``reps`` (a tensor ``[L, Hkv, D, nb]``: mean K, ``dot``; a pair: min / max K,
    ``quest``), ``q [L, Hq, D]`` -> float32 ``[L, Hkv, nb]`` (higher is better)."""
    if isinstance(reps, torch.Tensor):
        return batched_dot_scores(q, reps)
    kmin, kmax = reps
    group = q.shape[1] // kmin.shape[1]
    qf = q.float()
    return group * (batched_dot_scores(qf.clamp(min=0), kmax) + batched_dot_scores(qf.clamp(max=0), kmin))


def layer_view(reps: Reps, layer: int) -> Reps:
    """Layer ``layer`` of a snapshot in the per-layer functions' layout ``[nb, Hkv, D]`` (or a pair)."""
    if isinstance(reps, torch.Tensor):
        return reps[layer].permute(2, 0, 1)
    return reps[0][layer].permute(2, 0, 1), reps[1][layer].permute(2, 0, 1)


def host_layer_scores(rep: Reps, q: torch.Tensor) -> torch.Tensor:
    """Per-layer reference: ``rep`` ``[nb, Hkv, D]`` (or a min / max pair), ``q [Hq, D]`` -> ``[Hkv, nb]``."""
    if isinstance(rep, torch.Tensor):
        return dot_scores(q[None], rep)[0]
    return quest_scores(q[None], rep[0], rep[1])[0]


def host_vote_scores(q: torch.Tensor, reps: Reps) -> torch.Tensor:
    """Per-head vote of every layer (arguments as :func:`batched_dot_scores`): ``q [L, Hq, D]``,
    ``reps [L, Hkv, D, nb]`` (or a min / max pair) -> float32 ``[L, Hkv, nb]``, the softmax mass over
    the blocks of each query head's logit estimate (``q_h . mean`` or ``q_h``'s Quest bound, times
    ``1/sqrt(D)``), summed over the heads of each KV head's group. Rows sum to the group size."""
    kmin_or_mean = reps if isinstance(reps, torch.Tensor) else reps[0]
    L, hkv, d, nb = kmin_or_mean.shape
    if nb == 0:
        return torch.zeros(L, hkv, 0, device=kmin_or_mean.device)
    qg = q.float().to(kmin_or_mean.device).reshape(L, hkv, -1, d)  # [L, Hkv, G, D]
    if isinstance(reps, torch.Tensor):
        logits = torch.matmul(qg, reps.float())  # [L, Hkv, G, nb]
    else:
        kmin, kmax = reps
        logits = torch.matmul(qg.clamp(min=0), kmax.float()) + torch.matmul(qg.clamp(max=0), kmin.float())
    return torch.softmax(logits / math.sqrt(d), dim=-1).sum(2)


def host_layer_vote_scores(q: torch.Tensor, rep: Reps) -> torch.Tensor:
    """Per-layer reference of :func:`host_vote_scores`, head by head with the functions of
    :mod:`ucm_trt.sparse.score`: ``rep [nb, Hkv, D]`` (or a min / max pair), ``q [Hq, D]`` -> ``[Hkv, nb]``."""
    first = rep if isinstance(rep, torch.Tensor) else rep[0]
    nb, hkv, d = first.shape
    group = q.shape[0] // hkv
    out = torch.zeros(hkv, nb)
    for h in range(q.shape[0]):
        kv = h // group
        qh = q[h][None, None]  # [1, 1, D]: one query head against its KV head's blocks
        if isinstance(rep, torch.Tensor):
            logit = dot_scores(qh, rep[:, kv : kv + 1])[0, 0]
        else:
            logit = quest_scores(qh, rep[0][:, kv : kv + 1], rep[1][:, kv : kv + 1])[0, 0]
        out[kv] += torch.softmax(logit / math.sqrt(d), dim=-1)
    return out
