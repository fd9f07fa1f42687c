"""transformers' own (experimental) ONNX exporter with ONNX Runtime fusions: the decode graph uses
packed-QKV GroupQueryAttention with fused rotary, position_ids + attention_bias inputs, ORT-only
default-domain ops and a fully-masked-row guard. Rewritten vs original on ONNX Runtime.
Marked slow: the export of even a tiny model takes ~25-50 s on 2 cores."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.graph._graph_harness import PagedRunner, rel_err, session
from tests.graph._graph_models import make_tiny
from ucm_trt.graph import RewriteConfig, rewrite_model


@pytest.mark.slow
def test_transformers_ort_exporter_decode_graph(tmp_path):
    from transformers.exporters.configs import OnnxConfig
    from transformers.exporters.exporter_onnx import OnnxExporter

    sample = {"input_ids": torch.randint(0, 1000, (1, 5)), "attention_mask": torch.ones(1, 5, dtype=torch.int64)}
    exp = OnnxExporter().export_for_generation(make_tiny("llama"), sample,
                                               config=OnnxConfig(dynamic=True, ort_fusions="cpu"),
                                               multi_token_decode=True)  # fmt: skip
    exp.save_pretrained(tmp_path)
    path = tmp_path / "decode.onnx"
    rw, rep = rewrite_model(path, config=RewriteConfig(algorithm="dense", block_size=16))
    assert rep.counts == {"ms_group_query_attention": 2, "drop_empty_row_guard": 2}
    assert all("packed QKV split" in n.reason for n in rep.rewritten)
    orig = session(path)
    names = [o.name for o in orig.get_outputs()]
    past = {f"input.cache.layers.{i}.{kv}": np.zeros((1, 2, 0, 16), np.float32)
            for i in range(2) for kv in ("keys", "values")}  # fmt: skip
    paged = PagedRunner(rw, 1, 2, 2, 16, 16, 2)
    rng = np.random.default_rng(0)
    length = 0
    for t in (20, 1, 1, 3, 1):
        ids = rng.integers(0, 1000, (1, t))
        outs = dict(zip(names, orig.run(None, {"input_ids": ids, "position_ids": np.arange(length, length + t)[None],
                                               **past}), strict=True))  # fmt: skip
        past = {k: outs[k.replace("input.", "output.")] for k in past}
        length += t
        got = paged.step(ids)
        assert rel_err(got, outs["logits"]) <= 1e-4, rel_err(got, outs["logits"])
