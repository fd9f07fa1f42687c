"""SmolLM2-135M-Instruct (the small trained model, shared/reference/models.md): export with the
legacy exporter, rewrite, and run original vs rewritten on ONNX Runtime.

* fast: the SmolLM2 architecture (9 query heads, 3 KV heads, head_dim 64, theta 1e5) with 2 random
  layers — structure of the rewritten graph and all-blocks equality;
* slow: the real 30-layer checkpoint (export ~25-50 s, rewrite ~35 s on 2 cores): all-blocks logits
  equal the original's over a chat prompt + decode steps; greedy tokens identical; a sparse selection
  matches the torch model whose attention is the fp32 paged sparse reference.
"""

from __future__ import annotations

import copy

import numpy as np
import onnx
import pytest
import torch

from tests.graph._graph_harness import (
    ContiguousRunner,
    PagedRunner,
    TorchPagedReference,
    TorchRunner,
    rel_err,
    sparse_selection,
)
from ucm_trt.graph import ExportConfig, RewriteConfig, export_hf_model, rewrite_model

# From the SmolLM2 checkpoint's config.json (models.md §2).
SMOL = dict(hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3, head_dim=64,
            max_position_embeddings=8192, rope_parameters={"rope_type": "default", "rope_theta": 100000.0},
            tie_word_embeddings=True, rms_norm_eps=1e-5)  # fmt: skip
BS = 16
TOL = 1e-4


def test_smollm2_architecture_structure_and_dense_equality(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**SMOL, num_hidden_layers=2, vocab_size=512)).eval()
    path = export_hf_model(model, tmp_path / "smol2.onnx", config=ExportConfig(exporter="legacy"))
    rw, rep = rewrite_model(path, config=RewriteConfig(algorithm="esa", block_size=BS))
    assert rep.counts == {"decomposed_sdpa": 2}
    nodes = [n for n in rw.graph.node if n.op_type == "UcmPagedSparseAttentionSplitK"]
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in nodes[0].attribute}
    assert (attrs["num_q_heads"], attrs["num_kv_heads"], attrs["head_dim"], attrs["block_size"]) == (9, 3, 64, BS)
    assert attrs["scale"] == pytest.approx(0.125) and attrs["plugin_namespace"] == b"ucm"
    pool = next(i for i in rw.graph.input if i.name == "kv_pool.1")
    dims = [d.dim_value or d.dim_param for d in pool.type.tensor_type.shape.dim]
    assert dims == ["num_blocks", 2, 3, BS, 64]
    rr, rep_r = rewrite_model(path, config=RewriteConfig(algorithm="rerope", block_size=BS, rerope=_rerope()))
    assert all("theta=100000" in n.reason for n in rep_r.rewritten)
    orig = ContiguousRunner(path, 1, 2, 3, 64)
    paged = PagedRunner(rw, 1, 2, 3, 64, BS, max_blocks=4)
    rng = np.random.default_rng(0)
    for t in (20, 1, 1, 5, 1):
        ids = rng.integers(0, 512, (1, t))
        got, want = paged.step(ids, paged.all_blocks(3)), orig.step(ids)
        assert rel_err(got, want) <= TOL


def _rerope():
    from ucm_trt.config import ReRoPEConfig

    return ReRoPEConfig(window=512, training_length=8192)


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    from ucm_trt.models.smollm2 import load_smollm2, smollm2_checkpoint_dir

    d = smollm2_checkpoint_dir()
    model, tok = load_smollm2()
    path = export_hf_model(d, tmp_path_factory.mktemp("smol") / "smollm2.onnx", config=ExportConfig(exporter="legacy"))
    return model, tok, path


@pytest.mark.slow
def test_smollm2_rewrite_matches_original_and_reference(smollm2):
    model, tok, path = smollm2
    rw, rep = rewrite_model(path, config=RewriteConfig(algorithm="esa", block_size=BS))
    assert rep.counts == {"decomposed_sdpa": 30} and not rep.unsupported
    layers, hkv, d = 30, 3, 64
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                     add_generation_prompt=True, return_tensors="np", return_dict=True)  # fmt: skip
    ids = prompt["input_ids"].astype(np.int64)
    max_blocks = -(-(ids.shape[1] + 8) // BS)

    # 1) every block selected: logits equal the original model's; greedy tokens identical
    orig = ContiguousRunner(path, 1, layers, hkv, d)
    paged = PagedRunner(rw, 1, layers, hkv, d, BS, max_blocks)
    step = ids
    for _ in range(5):
        want, got = orig.step(step), paged.step(step, paged.all_blocks(hkv))
        assert rel_err(got, want) <= TOL, rel_err(got, want)
        nxt = int(want[0, -1].argmax())
        assert int(got[0, -1].argmax()) == nxt
        step = np.array([[nxt]], np.int64)

    # 2) sparse selections: equal the torch model whose attention is the fp32 paged reference
    ref_fn = TorchPagedReference(BS, "sparse")
    from transformers import AttentionInterface

    AttentionInterface.register("ucm_test_paged_sparse_smollm2", ref_fn)
    tm = copy.deepcopy(model)
    tm.set_attn_implementation("ucm_test_paged_sparse_smollm2")
    torch_run = TorchRunner(tm)
    paged = PagedRunner(rw, 1, layers, hkv, d, BS, max_blocks, seed=1)
    rng = np.random.default_rng(0)
    step = ids
    for i in range(4):
        past = int(paged.lengths[0])
        sels = ([np.array([[[0, -1, -1]] * hkv], np.int32)] * layers if past == 0 else
                [sparse_selection(rng, 1, hkv, past, BS, width=2) for _ in range(layers)])  # fmt: skip
        ref_fn.selections = sels
        got, want = paged.step(step, sels), torch_run.step(step)
        assert rel_err(got, want) <= TOL, (i, rel_err(got, want))
        step = np.array([[int(want[0, -1].argmax())]], np.int64)
