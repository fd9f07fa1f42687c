"""head_dim 96 (Phi-3-class) and 80 through the rewriter (issue 17): accepted, because the kernels
run any multiple of 16 in [16, 256] (``ucm_trt.limits``), and the rewritten graph on ONNX Runtime
equals the original graph with every block selected.

* ONNX Runtime contrib graphs (GroupQueryAttention fused/packed/op, MultiHeadAttention, ONNX
  Attention) built at head_dim 96 / 80: original vs rewritten, and sparse vs the torch twin;
* transformers' own exporter with ONNX Runtime fusions (a foreign exporter: packed-QKV
  GroupQueryAttention with fused rotary) on a tiny Llama with head_dim 96 (slow: the export alone
  takes ~25-50 s on 2 cores).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.graph._contrib_models import TorchTwin, build
from tests.graph._graph_harness import ContiguousRunner, PagedRunner, rel_err, session, sparse_selection
from ucm_trt.graph import RewriteConfig, rewrite_model

B, BS, MAX_BLOCKS, LAYERS = 2, 16, 4, 2
TOL = 1e-4


@pytest.mark.parametrize("kind, d", [("gqa-fused", 96), ("gqa-packed", 96), ("gqa-op", 80), ("mha", 96),
                                     ("onnx-attention", 96)])
def test_contrib_graph_head_dim_matches_original(kind, d):
    model, _, meta = build(kind, d=d)
    rw, rep = rewrite_model(model, config=RewriteConfig(algorithm="esa", block_size=BS))
    assert len(rep.rewritten) == LAYERS and not rep.unsupported
    assert all(f"D={d}" in n.reason for n in rep.rewritten), rep.summary()
    orig = ContiguousRunner(model, B, LAYERS, meta["hkv"], d)
    paged = PagedRunner(rw, B, LAYERS, meta["hkv"], d, BS, MAX_BLOCKS, seed=1)
    rng = np.random.default_rng(0)
    steps = (20, 1, 1, 1) if kind.startswith("gqa") else (20, 5, 1, 1)  # ORT GQA: no batch>1 chunk on a past
    for t in steps:
        ids = rng.integers(0, 100, (B, t))
        want, got = orig.step(ids), paged.step(ids, paged.all_blocks(meta["hkv"]))
        assert rel_err(got, want) <= TOL, (t, rel_err(got, want))


def test_contrib_graph_head_dim_96_sparse_matches_reference():
    model, w, meta = build("gqa-fused", d=96, seed=3)
    rw, _ = rewrite_model(model, config=RewriteConfig(algorithm="gsa", block_size=BS))
    twin = TorchTwin(w, meta, block_size=BS, mode="sparse", batch=B)
    paged = PagedRunner(rw, B, LAYERS, meta["hkv"], 96, BS, MAX_BLOCKS, seed=2)
    rng = np.random.default_rng(1)
    for t in (40, 1, 1, 1):
        past = int(paged.lengths[0])
        ids = rng.integers(0, 100, (B, t))
        sels = [sparse_selection(rng, B, meta["hkv"], max(past, 1), BS, width=2) for _ in range(LAYERS)]
        got, want = paged.step(ids, sels), twin.step(ids, sels)
        assert rel_err(got, want) <= TOL, (t, rel_err(got, want))


@pytest.mark.slow
def test_transformers_ort_exporter_head_dim_96(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.exporters.configs import OnnxConfig
    from transformers.exporters.exporter_onnx import OnnxExporter

    torch.manual_seed(96)
    cfg = LlamaConfig(num_hidden_layers=LAYERS, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=96, vocab_size=1000, max_position_embeddings=512)
    model = LlamaForCausalLM(cfg).eval()
    sample = {"input_ids": torch.randint(0, 1000, (1, 5)), "attention_mask": torch.ones(1, 5, dtype=torch.int64)}
    exp = OnnxExporter().export_for_generation(model, sample, config=OnnxConfig(dynamic=True, ort_fusions="cpu"),
                                               multi_token_decode=True)  # fmt: skip
    exp.save_pretrained(tmp_path)
    path = tmp_path / "decode.onnx"
    rw, rep = rewrite_model(path, config=RewriteConfig(algorithm="esa", block_size=BS))
    assert rep.counts.get("ms_group_query_attention") == LAYERS and not rep.unsupported, rep.summary()
    assert all("D=96" in n.reason for n in rep.rewritten), rep.summary()
    orig = session(path)
    names = [o.name for o in orig.get_outputs()]
    past = {f"input.cache.layers.{i}.{kv}": np.zeros((1, 2, 0, 96), np.float32)
            for i in range(LAYERS) for kv in ("keys", "values")}  # fmt: skip
    paged = PagedRunner(rw, 1, LAYERS, 2, 96, BS, 3)
    rng = np.random.default_rng(0)
    length = 0
    for t in (20, 1, 1, 9, 1):  # prefill, decode, a chunk across a block boundary, decode
        ids = rng.integers(0, 1000, (1, t))
        outs = dict(zip(names, orig.run(None, {"input_ids": ids, "position_ids": np.arange(length, length + t)[None],
                                               **past}), strict=True))  # fmt: skip
        past = {k: outs[k.replace("input.", "output.")] for k in past}
        length += t
        got = paged.step(ids, paged.all_blocks(2))
        assert rel_err(got, outs["logits"]) <= TOL, rel_err(got, outs["logits"])
