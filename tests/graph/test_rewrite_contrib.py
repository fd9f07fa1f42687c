"""ONNX Runtime contrib attention graphs and an ONNX opset-23 Attention graph with internal
past_key/past_value (built with onnx.helper): original vs rewritten, and
rewritten vs a torch twin whose attention is the fp32 paged reference."""

from __future__ import annotations

import numpy as np
import pytest

from tests.graph._contrib_models import TorchTwin, build
from tests.graph._graph_harness import ContiguousRunner, PagedRunner, rel_err, sparse_selection
from ucm_trt.config import ReRoPEConfig
from ucm_trt.graph import RewriteConfig, rewrite_model

KINDS = ("gqa-fused", "gqa-packed", "gqa-op", "mha", "onnx-attention")
B, BS, MAX_BLOCKS, D, LAYERS = 2, 16, 5, 16, 2
TOL = 1e-4
RULE = {"gqa-fused": "ms_group_query_attention", "gqa-op": "ms_group_query_attention",
        "gqa-packed": "ms_group_query_attention",
        "mha": "ms_multi_head_attention", "onnx-attention": "onnx_attention"}  # fmt: skip


@pytest.mark.parametrize("kind", KINDS)
def test_all_blocks_match_original(kind):
    model, _, meta = build(kind)
    rw, rep = rewrite_model(model, config=RewriteConfig(algorithm="dense", block_size=BS))
    assert rep.counts == {RULE[kind]: LAYERS}
    assert "attention_mask" not in rep.inputs and "seq_lens" in rep.inputs
    orig = ContiguousRunner(model, B, LAYERS, meta["hkv"], D)
    paged = PagedRunner(rw, B, LAYERS, meta["hkv"], D, BS, MAX_BLOCKS, seed=1)
    rng = np.random.default_rng(0)
    # ORT's GroupQueryAttention rejects batch > 1 chunks on top of a past; the chunk step is
    # covered against the torch twin below.
    steps = (40, 1, 1, 1, 1) if kind.startswith("gqa") else (40, 9, 1, 1, 1)
    for t in steps:
        ids = rng.integers(0, 100, (B, t))
        want, got = orig.step(ids), paged.step(ids)
        assert rel_err(got, want) <= TOL, (t, rel_err(got, want))


@pytest.mark.parametrize("kind", KINDS)
def test_sparse_matches_paged_reference(kind):
    model, w, meta = build(kind, seed=3)
    rw, _ = rewrite_model(model, config=RewriteConfig(algorithm="gsa", block_size=BS))
    twin = TorchTwin(w, meta, block_size=BS, mode="sparse", batch=B)
    paged = PagedRunner(rw, B, LAYERS, meta["hkv"], D, BS, MAX_BLOCKS, seed=2)
    rng = np.random.default_rng(1)
    for t in (40, 9, 1, 1, 1, 1):
        past = int(paged.lengths[0])
        ids = rng.integers(0, 100, (B, t))
        sels = [sparse_selection(rng, B, meta["hkv"], max(past, 1), BS, width=3) for _ in range(LAYERS)]
        got, want = paged.step(ids, sels), twin.step(ids, sels)
        assert rel_err(got, want) <= TOL, (t, rel_err(got, want))
        for i in range(LAYERS):  # the retrieval query output: post-RoPE q of the last token
            np.testing.assert_allclose(paged.last_outputs[f"last_query.{i}"], twin.last_query[i], atol=1e-5)
            # the default query window (64): every query of a chunk up to 64 tokens, oldest first
            np.testing.assert_allclose(paged.last_outputs[f"query_window.{i}"], twin.chunk_query[i], atol=1e-5)


@pytest.mark.parametrize("kind", ["gqa-fused", "mha", "onnx-attention"])
@pytest.mark.parametrize("window", [1, 4])
def test_query_window_output_holds_the_chunk_last_queries(kind, window):
    model, w, meta = build(kind, seed=3)
    rw, rep = rewrite_model(model, config=RewriteConfig(algorithm="esa", block_size=BS, query_window=window))
    names = {f"query_window.{i}" for i in range(LAYERS)}
    assert names <= set(rep.outputs) if window > 1 else not names & set(rep.outputs)
    assert {p.key: p.value for p in rw.metadata_props}["ucm.query_window"] == str(window)
    twin = TorchTwin(w, meta, block_size=BS, mode="sparse", batch=B)
    paged = PagedRunner(rw, B, LAYERS, meta["hkv"], D, BS, MAX_BLOCKS, seed=2)
    rng = np.random.default_rng(1)
    for t in (40, 3, 1):
        past = int(paged.lengths[0])
        ids = rng.integers(0, 100, (B, t))
        sels = [sparse_selection(rng, B, meta["hkv"], max(past, 1), BS, width=3) for _ in range(LAYERS)]
        paged.step(ids, sels)
        twin.step(ids, sels)
        for i in range(LAYERS):
            np.testing.assert_allclose(paged.last_outputs[f"last_query.{i}"], twin.last_query[i], atol=1e-5)
            if window > 1:  # the last min(window, t) queries, oldest first
                got = paged.last_outputs[f"query_window.{i}"]
                assert got.shape[2] == min(window, t), (t, got.shape)
                np.testing.assert_allclose(got, twin.chunk_query[i][:, :, -window:], atol=1e-5)


def test_query_window_is_checked():
    with pytest.raises(ValueError, match=r"RewriteConfig.query_window must be an int >= 1, got 0"):
        RewriteConfig(query_window=0)


@pytest.mark.parametrize("kind, sparse", [(k, False) for k in KINDS] + [("gqa-fused", True), ("mha", True)])
def test_rerope_matches_reference(kind, sparse):
    model, w, meta = build(kind, seed=4, theta=500.0)
    cfg = ReRoPEConfig(window=5, training_length=8, logn=True)
    rw, rep = rewrite_model(model, config=RewriteConfig(algorithm="rerope", block_size=BS, rerope=cfg,
                                                         selection_inputs=sparse))  # fmt: skip
    assert all("theta=500" in n.reason for n in rep.rewritten), rep.summary()
    assert ("selection.0" in rep.inputs) == sparse
    paged = PagedRunner(rw, B, LAYERS, meta["hkv"], D, BS, MAX_BLOCKS, seed=3)
    twin = TorchTwin(w, meta, block_size=BS, mode="rerope", window=5, logn=8, batch=B)
    rng = np.random.default_rng(2)
    for t in (40, 9, 1, 1, 1, 1):
        ids = rng.integers(0, 100, (B, t))
        past = int(paged.lengths[0])
        sels = [sparse_selection(rng, B, meta["hkv"], max(past, 1), BS, width=2) for _ in range(LAYERS)] if sparse else None
        got, want = paged.step(ids, sels), twin.step(ids, sels)
        assert rel_err(got, want) <= TOL, (t, rel_err(got, want))
        for i in range(LAYERS):  # ReRoPE: the retrieval query is the UN-rotated q of the last token
            np.testing.assert_allclose(paged.last_outputs[f"last_query.{i}"], twin.last_query[i], atol=1e-5)
