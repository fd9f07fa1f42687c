"""Selection turnover of a real model: how many selected blocks change between consecutive
retrievals (issue 13 item 2). Definitions: :mod:`ucm_trt.sparse.turnover`.

Procedure (:func:`decode_with_queries` then :func:`turnover_table`):

1. Prefill the prompt once with Q/K capture (:func:`ucm_trt.models.capture.forward_with_capture`,
   post-RoPE keys of every layer) and greedy-decode ``steps`` tokens with the model's own KV cache,
   capturing each decode token's post-RoPE query of every layer. Attention is dense, so the queries
   are the model's, not perturbed by a sparse selection.
2. Block representations: the mean K of every prompt block (ESA / GSA's ``mean``), float32
   ``[L, Hkv, D, nb]``, for each block size asked.
3. One retrieval every ``R`` decode steps from that step's query (ESA's single-token query), scored
   and selected with the runtime's own functions (:func:`~ucm_trt.sparse.batched.batched_dot_scores`,
   :func:`~ucm_trt.sparse.batched.select_batched`); decode-generated blocks are not candidates (ESA).
4. Per layer and KV head: changed / selected of the top-k part between consecutive retrievals
   (``topk``), and of all selected blocks including the sink and local windows (``all``). The
   same selections from random queries (Gaussian, each query head's norm kept) give the
   random-weight worst case next to it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ucm_trt._validation import check_positive_int, check_tensor
from ucm_trt.config import Budget, SparseConfig
from ucm_trt.sparse.batched import batched_dot_scores, select_batched
from ucm_trt.sparse.turnover import selection_turnover, topk_part

__all__ = ["DecodeCapture", "block_mean_reps", "decode_with_queries", "turnover_of_queries", "turnover_table"]


@dataclass(frozen=True, kw_only=True)
class DecodeCapture:
    """Prompt keys and decode queries of one greedy generation.

    ``keys``: float32 ``[L, Hkv, T, D]`` post-RoPE keys of the ``T`` prompt tokens.
    ``queries``: float32 ``[S, L, Hq, D]``; row ``s - 1`` is the query of decode step ``s`` (the
    forward that takes the ``s``-th generated token and produces token ``s + 1``, as the runtime
    counts steps). ``prompt_query``: the last prompt token's query (the prefill's retrieval).
    ``prompt_query``: float32 ``[L, Hq, D]``. ``tokens``: the generated token ids.
    """

    keys: torch.Tensor
    queries: torch.Tensor
    prompt_query: torch.Tensor
    tokens: list[int]


def decode_with_queries(model: Any, prompt_ids: list[int], steps: int) -> DecodeCapture:
    """Prefill ``prompt_ids`` and greedy-decode ``steps`` tokens with ``model`` (a transformers
    decoder loaded with ``attn_implementation="sdpa"``), capturing keys and queries (module docstring)."""
    from ucm_trt.models.capture import forward_with_capture

    check_positive_int("steps", steps)
    if not prompt_ids:
        raise ValueError("prompt_ids must hold at least one token")
    ids = torch.tensor([prompt_ids], dtype=torch.long)
    out, cap = forward_with_capture(model, ids, None, use_cache=True, logits_to_keep=1)
    layers = sorted(cap)
    keys = torch.stack([cap[i][1][0].float() for i in layers])  # [L, Hkv, T, D]
    prompt_query = torch.stack([cap[i][0][0, :, -1].float() for i in layers])  # [L, Hq, D]
    del cap
    cache = out.past_key_values
    tok = int(out.logits[0, -1].argmax())
    tokens, queries = [tok], []
    for _ in range(steps):
        out, cap = forward_with_capture(model, torch.tensor([[tok]]), None, past_key_values=cache, use_cache=True)
        queries.append(torch.stack([cap[i][0][0, :, -1].float() for i in layers]))
        cache = out.past_key_values
        tok = int(out.logits[0, -1].argmax())
        tokens.append(tok)
    return DecodeCapture(keys=keys, queries=torch.stack(queries), prompt_query=prompt_query, tokens=tokens)


def block_mean_reps(keys: torch.Tensor, block_size: int) -> torch.Tensor:
    """float32 ``[L, Hkv, D, nb]``: mean K of every block (the last one partial) of ``keys [L, Hkv, T, D]``."""
    k = check_tensor("keys", keys, ndim=4)
    bs = check_positive_int("block_size", block_size)
    L, h, t, d = k.shape
    nb = -(-t // bs)
    pad = torch.zeros(L, h, nb * bs - t, d, dtype=torch.float32)
    blocks = torch.cat([k.float(), pad], dim=2).view(L, h, nb, bs, d).sum(3)
    lens = torch.full((nb,), bs, dtype=torch.float32)
    lens[-1] = t - (nb - 1) * bs
    return (blocks / lens[:, None]).permute(0, 1, 3, 2).contiguous()


def turnover_of_queries(reps: torch.Tensor, queries: torch.Tensor, sparse: SparseConfig) -> dict[str, torch.Tensor]:
    """Retrieve with each of ``queries [N, L, Hq, D]`` in order over ``reps [L, Hkv, D, nb]`` and
    compare each selection with the previous one. Returns per (retrieval pair, layer, KV head)
    int64 counts ``[N-1, L, Hkv]``: ``topk_changed``, ``topk_selected``, ``all_changed``, ``all_selected``."""
    nb, hkv = reps.shape[-1], reps.shape[1]
    prev = prev_k = None
    acc: dict[str, list[torch.Tensor]] = {k: [] for k in ("topk_changed", "topk_selected", "all_changed",
                                                          "all_selected")}
    for q in queries:
        sel = select_batched(batched_dot_scores(q, reps), nb, sparse, "dot", hkv)
        sel_k = topk_part(sel, nb, sparse)
        if prev is not None:
            c, s = selection_turnover(prev_k, sel_k)
            acc["topk_changed"].append(c)
            acc["topk_selected"].append(s)
            c, s = selection_turnover(prev, sel)
            acc["all_changed"].append(c)
            acc["all_selected"].append(s)
        prev, prev_k = sel, sel_k
    return {k: torch.stack(v) for k, v in acc.items()}


def _summary(counts: dict[str, torch.Tensor]) -> dict[str, Any]:
    tc, ts = counts["topk_changed"].sum(0).double(), counts["topk_selected"].sum(0).double()
    ac, as_ = counts["all_changed"].sum(0).double(), counts["all_selected"].sum(0).double()
    per = tc / ts.clamp(min=1)  # [L, Hkv]
    per_retrieval = counts["topk_changed"].sum((1, 2)).double() / counts["topk_selected"].sum((1, 2)).double().clamp(min=1)
    return {
        "topk_turnover": float(tc.sum() / ts.sum()),
        "all_turnover": float(ac.sum() / as_.sum()),
        "topk_turnover_per_layer_head": [[round(float(x), 4) for x in row] for row in per],
        "topk_turnover_per_layer": [round(float(x), 4) for x in tc.sum(1) / ts.sum(1).clamp(min=1)],
        "topk_turnover_layer_head_min": float(per.min()),
        "topk_turnover_layer_head_median": float(per.flatten().median()),
        "topk_turnover_layer_head_max": float(per.max()),
        "topk_turnover_per_retrieval_p10_p50_p90": [float(x) for x in torch.quantile(
            per_retrieval, torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64))] if per_retrieval.numel() else None,
        "retrieval_pairs": int(counts["topk_changed"].shape[0]),
        "topk_selected_per_retrieval_per_row": float(counts["topk_selected"].double().mean()),
    }


def turnover_table(
    capture: DecodeCapture,
    *,
    block_sizes: list[int],
    ratios: list[float],
    strides: list[int],
    selections: tuple[str, ...] = ("shared", "per_head"),
    sink_blocks: int = 1,
    local_blocks: int = 2,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """One row per (block size, ratio, selection, stride): the real queries' turnover and the
    random-query turnover of the same representations (:func:`_summary` fields, the random ones
    prefixed ``random_``)."""
    rows = []
    steps = capture.queries.shape[0]
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(capture.queries.shape, generator=g)
    random_q = noise / noise.norm(dim=-1, keepdim=True) * capture.queries.norm(dim=-1, keepdim=True)
    for bs in block_sizes:
        reps = block_mean_reps(capture.keys, bs)
        for ratio in ratios:
            for selection in selections:
                for r in strides:
                    sp = SparseConfig(block_size=bs, budget=Budget.ratio(ratio), sink_blocks=sink_blocks,
                                      local_blocks=local_blocks, selection=selection, retrieval_stride=r)
                    idx = torch.arange(r - 1, steps, r)  # decode steps R, 2R, ... (0-based rows)
                    if idx.numel() < 2:
                        continue
                    real = _summary(turnover_of_queries(reps, capture.queries[idx], sp))
                    rand = _summary(turnover_of_queries(reps, random_q[idx], sp))
                    row = {"block_size": bs, "ratio": ratio, "selection": selection, "stride": r,
                           "prompt_blocks": int(reps.shape[-1]), **real}
                    row.update({f"random_{k}": v for k, v in rand.items()
                                if k in ("topk_turnover", "all_turnover", "topk_turnover_per_layer")})
                    rows.append(row)
    return rows
