"""eval.turnover: block means, the offline retrieval series and its counts, against plain references."""

from __future__ import annotations

import pytest
import torch

from ucm_trt.config import Budget, SparseConfig
from ucm_trt.eval.turnover import DecodeCapture, block_mean_reps, turnover_of_queries, turnover_table
from ucm_trt.sparse.policies.base import select_from_scores
from ucm_trt.sparse.score import dot_scores


def test_block_mean_reps_matches_loop_with_partial_last_block():
    g = torch.Generator().manual_seed(0)
    k = torch.randn(2, 3, 45, 8, generator=g)  # 45 tokens, blocks of 16: 16, 16, 13
    reps = block_mean_reps(k, 16)
    assert reps.shape == (2, 3, 8, 3)
    for b, (lo, hi) in enumerate([(0, 16), (16, 32), (32, 45)]):
        assert torch.allclose(reps[..., b], k[:, :, lo:hi].mean(2), atol=1e-6)


def _reference_counts(reps, queries, sp):
    """Per-layer selections with the per-layer reference functions, then set differences."""
    L, hkv, _, nb = reps.shape
    lo, hi = sp.sink_blocks, nb - sp.local_blocks
    prev = None
    out = []
    for q in queries:
        sels = []
        for layer in range(L):
            s = dot_scores(q[layer][None], reps[layer].permute(2, 0, 1))[0]
            sel = select_from_scores(s, nb, sp, "dot", hkv)
            sels.append([{int(x) for x in row if lo <= x < hi} for row in sel])
        if prev is not None:
            out.append([[(len(n - o), len(n)) for o, n in zip(po, pn, strict=True)] for po, pn in zip(prev, sels, strict=True)])
        prev = sels
    return out


@pytest.mark.parametrize("selection", ["shared", "per_head"])
def test_turnover_of_queries_equals_set_reference(selection):
    g = torch.Generator().manual_seed(1)
    reps = torch.randint(-3, 4, (3, 2, 8, 40), generator=g).float()  # integer data: exact scores
    qs = torch.randint(-3, 4, (6, 3, 4, 8), generator=g).float()
    sp = SparseConfig(block_size=16, budget=Budget.ratio(0.25), selection=selection)
    got = turnover_of_queries(reps, qs, sp)
    ref = _reference_counts(reps, qs, sp)
    assert got["topk_changed"].shape == (5, 3, 2)
    for i, pair in enumerate(ref):
        for layer, heads in enumerate(pair):
            for h, (c, n) in enumerate(heads):
                assert int(got["topk_changed"][i, layer, h]) == c
                assert int(got["topk_selected"][i, layer, h]) == n


def test_turnover_table_frozen_queries_give_zero_and_random_is_high():
    g = torch.Generator().manual_seed(2)
    keys = torch.randn(2, 2, 640, 16, generator=g)
    q = torch.randn(2, 4, 16, generator=g)
    cap = DecodeCapture(keys=keys, queries=q.expand(12, 2, 4, 16).clone(), prompt_query=q, tokens=[0] * 13)
    rows = turnover_table(cap, block_sizes=[32], ratios=[0.25], strides=[1, 3], selections=("shared",))
    assert [r["stride"] for r in rows] == [1, 3]
    for r in rows:
        assert r["topk_turnover"] == 0.0  # the same query every step: nothing changes
        assert r["random_topk_turnover"] > 0.5  # random queries: about 1 - ratio
        assert len(r["topk_turnover_per_layer_head"]) == 2 and len(r["topk_turnover_per_layer_head"][0]) == 2


def test_decode_with_queries_equals_one_full_forward():
    """Step s's captured query is the query at position prompt_len + s - 1 of one forward over the
    prompt and the generated tokens; the tokens are greedy (HF generate)."""
    from tests.runtime.conftest import tiny_llama
    from ucm_trt.eval.turnover import decode_with_queries
    from ucm_trt.models.capture import capture_qk

    model = tiny_llama(layers=2)
    model.set_attn_implementation("sdpa")
    g = torch.Generator().manual_seed(3)
    prompt = torch.randint(0, 256, (50,), generator=g).tolist()
    cap = decode_with_queries(model, prompt, 6)
    with torch.no_grad():
        ref_tokens = model.generate(torch.tensor([prompt]), max_new_tokens=7, do_sample=False,
                                    attention_mask=torch.ones(1, 50, dtype=torch.long))[0, 50:].tolist()
    assert cap.tokens == ref_tokens
    full = capture_qk(model, torch.tensor([prompt + cap.tokens[:6]]))
    for layer in range(2):
        q, k = full[layer]
        assert torch.allclose(cap.keys[layer], k[0, :, :50].float(), atol=1e-5)
        assert torch.allclose(cap.prompt_query[layer], q[0, :, 49].float(), atol=1e-5)
        for s in range(1, 7):
            assert torch.allclose(cap.queries[s - 1, layer], q[0, :, 49 + s].float(), atol=1e-4), (layer, s)
