"""Original vs rewritten models on ONNX Runtime, driven through prefill, a chunk and decode steps.

* every block selected (``dense`` graph and ``esa`` graph with full selections): logits equal
  the original exported model's (fp32, <= 1e-4 relative);
* sparse selections: logits equal a torch run of the same weights whose attention is the fp32
  paged sparse reference (transformers AttentionInterface, no monkey-patching);
* ReRoPE: logits equal a torch run whose attention is the fp32 paged ReRoPE reference.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
from transformers import AttentionInterface

from tests.graph._graph_harness import (
    ContiguousRunner,
    PagedRunner,
    TorchPagedReference,
    TorchRunner,
    rel_err,
    sparse_selection,
)
from tests.graph._graph_models import EXPORTS, ROPE_THETA
from ucm_trt.config import ReRoPEConfig
from ucm_trt.graph import RewriteConfig, rewrite_model

B, HKV, D, LAYERS, BS, MAX_BLOCKS = 2, 2, 16, 2, 16, 5
TOL = 1e-4  # fp32 end to end; observed ~1e-6
# prefill 40 tokens, a 9-token chunk on top of the cache, then 4 decode steps: 53 tokens, 4 blocks
STEPS = (40, 9, 1, 1, 1, 1)


def _tokens(seed: int):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 1000, size=(B, t)) for t in STEPS]


def _ids(e):
    return f"{e[0]}-{e[1]}{e[2]}"


@pytest.mark.parametrize("export", EXPORTS, ids=_ids)
def test_all_blocks_match_original(exported, export):
    path = exported(*export)
    orig = ContiguousRunner(path, B, LAYERS, HKV, D)
    dense, rep_d = rewrite_model(path, config=RewriteConfig(algorithm="dense", block_size=BS))
    esa, rep_e = rewrite_model(path, config=RewriteConfig(algorithm="esa", block_size=BS))
    for rep in (rep_d, rep_e):
        assert len(rep.rewritten) == LAYERS and not rep.unsupported and sum(rep.counts.values()) == LAYERS
    pd = PagedRunner(dense, B, LAYERS, HKV, D, BS, MAX_BLOCKS, seed=1)
    pe = PagedRunner(esa, B, LAYERS, HKV, D, BS, MAX_BLOCKS, seed=2)
    for ids in _tokens(0):
        want = orig.step(ids)
        got_d = pd.step(ids)
        got_e = pe.step(ids, pe.all_blocks(HKV))
        assert rel_err(got_d, want) <= TOL, rel_err(got_d, want)
        assert rel_err(got_e, want) <= TOL, rel_err(got_e, want)
    # the runtime outputs have the documented shapes
    out = pe.last_outputs
    assert out["new_key.0"].shape == (B, HKV, 1, D) and out["last_query.1"].shape == (B, 4, D)


@pytest.mark.parametrize("export", [e for e in EXPORTS if e[1] == "legacy" or e[2] == 23], ids=_ids)
def test_sparse_selection_matches_paged_reference(exported, tiny_models, export):
    arch = export[0]
    path = exported(*export)
    model, _ = rewrite_model(path, config=RewriteConfig(algorithm="esa", block_size=BS))
    paged = PagedRunner(model, B, LAYERS, HKV, D, BS, MAX_BLOCKS, seed=3)
    ref_fn = TorchPagedReference(BS, "sparse")
    name = f"ucm_test_paged_sparse_{arch}"
    AttentionInterface.register(name, ref_fn)
    tm = copy.deepcopy(tiny_models[arch])
    tm.set_attn_implementation(name)
    torch_run = TorchRunner(tm)
    dense_run = ContiguousRunner(path, B, LAYERS, HKV, D)
    rng = np.random.default_rng(7)
    differs = 0.0
    for ids in _tokens(1):
        past = int(paged.lengths[0])
        if past == 0:  # prefill: nothing in the pool yet
            sels = [np.pad(np.zeros((B, HKV, 1), np.int32), ((0, 0), (0, 0), (0, 2)), constant_values=-1)] * LAYERS
        else:
            sels = [sparse_selection(rng, B, HKV, past, BS, width=3) for _ in range(LAYERS)]
        ref_fn.selections = sels
        got = paged.step(ids, sels)
        want = torch_run.step(ids)
        assert rel_err(got, want) <= TOL, rel_err(got, want)
        differs = max(differs, rel_err(got, dense_run.step(ids)))
    assert differs > 1e-3, "sparse selections must actually change the logits (else the test is vacuous)"


@pytest.mark.parametrize("export", [e for e in EXPORTS if e[1] == "legacy" or e[2] == 23], ids=_ids)
def test_rerope_matches_reference(exported, tiny_models, export):
    arch = export[0]
    path = exported(*export)
    cfg = ReRoPEConfig(window=6, training_length=8, logn=True)
    model, rep = rewrite_model(path, config=RewriteConfig(algorithm="rerope", block_size=BS, rerope=cfg))
    assert all("theta" in n.reason for n in rep.rewritten)
    paged = PagedRunner(model, B, LAYERS, HKV, D, BS, MAX_BLOCKS, seed=4)
    ref_fn = TorchPagedReference(BS, "rerope", theta=ROPE_THETA[arch], window=6, logn_training_length=8)
    name = f"ucm_test_paged_rerope_{arch}"
    AttentionInterface.register(name, ref_fn)
    tm = copy.deepcopy(tiny_models[arch])
    tm.set_attn_implementation(name)
    torch_run = TorchRunner(tm)
    for ids in _tokens(2):
        got = paged.step(ids)
        want = torch_run.step(ids)
        assert rel_err(got, want) <= TOL, rel_err(got, want)


def test_eager_attention_export(tiny_models, tmp_path):
    """Eager attention: Softmax(Add(Mul(MatMul(Q, K^T), s), mask)) and no NaN guard."""
    from ucm_trt.graph import ExportConfig, export_hf_model

    m = copy.deepcopy(tiny_models["qwen2"])
    m.set_attn_implementation("eager")
    path = export_hf_model(m, tmp_path / "eager.onnx", config=ExportConfig(exporter="legacy"))
    rw, rep = rewrite_model(path, config=RewriteConfig(algorithm="dense", block_size=BS))
    assert rep.counts == {"decomposed_sdpa": LAYERS}
    orig = ContiguousRunner(path, B, LAYERS, HKV, D)
    paged = PagedRunner(rw, B, LAYERS, HKV, D, BS, MAX_BLOCKS)
    for ids in _tokens(3):
        want, got = orig.step(ids), paged.step(ids)
        assert rel_err(got, want) <= TOL


@pytest.mark.parametrize("kv_heads", [4, 1], ids=["mha-no-repeat_kv", "mqa"])
def test_kv_head_variants_legacy(tmp_path, kv_heads):
    """Hq == Hkv exports without repeat_kv; MQA (Hkv = 1) exports with a 4x repeat."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from tests.graph._graph_models import TINY
    from ucm_trt.graph import ExportConfig, export_hf_model

    torch.manual_seed(5)
    m = LlamaForCausalLM(LlamaConfig(**{**TINY, "num_key_value_heads": kv_heads})).eval()
    path = export_hf_model(m, tmp_path / "m.onnx", config=ExportConfig(exporter="legacy"))
    rw, rep = rewrite_model(path, config=RewriteConfig(algorithm="esa", block_size=BS))
    assert rep.counts == {"decomposed_sdpa": LAYERS} and f"Hkv={kv_heads}" in rep.rewritten[0].reason
    orig = ContiguousRunner(path, B, LAYERS, kv_heads, D)
    paged = PagedRunner(rw, B, LAYERS, kv_heads, D, BS, MAX_BLOCKS)
    for ids in _tokens(4):
        want, got = orig.step(ids), paged.step(ids, paged.all_blocks(kv_heads))
        assert rel_err(got, want) <= TOL


@pytest.mark.parametrize("algorithm", ["esa", "rerope"])
def test_split_scratch_graph_equals_the_v1_graph(exported, algorithm):
    """The default rewrite emits the split-K variants: ONE int32 1-D graph input ``attn_split_counters``
    read by every attention node as its 8th input, each node's ``split_partials.{i}`` consumed by nothing
    and not a graph output, ``num_sms`` left 0 for the builder. On ONNX Runtime the function bodies ignore
    the counters: every graph output equals the v1 graph's (``split_scratch=False``, what models rewritten
    before issue 14 hold) bit for bit, through prefill, a chunk and decode."""
    import onnx

    from ucm_trt.graph.schemas import SPLIT_COUNTERS_INPUT

    path = exported("llama", "legacy", 17)
    extra = {"rerope": ReRoPEConfig(window=6, training_length=8, logn=True)} if algorithm == "rerope" else {}
    split, rep = rewrite_model(path, config=RewriteConfig(algorithm=algorithm, block_size=BS, **extra))
    v1, _ = rewrite_model(path, config=RewriteConfig(algorithm=algorithm, block_size=BS, split_scratch=False, **extra))
    base = "UcmPagedReRoPEAttention" if algorithm == "rerope" else "UcmPagedSparseAttention"
    nodes = [n for n in split.graph.node if n.domain == "ucm" and n.op_type != "UcmSelectAllBlocks"]
    assert [n.op_type for n in nodes] == [base + "SplitK"] * LAYERS
    assert all(f"-> {base}SplitK " in n.reason for n in rep.rewritten)
    assert {n.op_type for n in v1.graph.node if n.domain == "ucm"} <= {base, "UcmSelectAllBlocks"}
    (cnt,) = [i for i in split.graph.input if i.name == SPLIT_COUNTERS_INPUT]
    assert cnt.type.tensor_type.elem_type == onnx.TensorProto.INT32
    assert [d.dim_param for d in cnt.type.tensor_type.shape.dim] == ["split_counters"]
    assert SPLIT_COUNTERS_INPUT not in {i.name for i in v1.graph.input}
    readers = [i for n in split.graph.node for i in n.input]
    outputs = {o.name for o in split.graph.output}
    for i, n in enumerate(nodes):
        assert list(n.input[:7]) == list(next(m for m in v1.graph.node if m.name == n.name).input)
        assert n.input[7] == SPLIT_COUNTERS_INPUT
        assert n.output[1] == f"split_partials.{i}" and n.output[1] not in readers and n.output[1] not in outputs
        assert {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}["num_sms"] == 0
    assert [o.name for o in split.graph.output] == [o.name for o in v1.graph.output]
    ps = PagedRunner(split, B, LAYERS, HKV, D, BS, MAX_BLOCKS, seed=5)
    pv = PagedRunner(v1, B, LAYERS, HKV, D, BS, MAX_BLOCKS, seed=5)
    assert SPLIT_COUNTERS_INPUT in ps.in_names and SPLIT_COUNTERS_INPUT not in pv.in_names
    rng = np.random.default_rng(9)
    for ids in _tokens(3):
        past = int(ps.lengths[0])
        sels = None
        if algorithm == "esa":
            sels = ([np.pad(np.zeros((B, HKV, 1), np.int32), ((0, 0), (0, 0), (0, 2)), constant_values=-1)] * LAYERS
                    if past == 0 else [sparse_selection(rng, B, HKV, past, BS, width=3) for _ in range(LAYERS)])  # fmt: skip
        ps.step(ids, sels)
        pv.step(ids, sels)
        assert ps.last_outputs.keys() == pv.last_outputs.keys()
        for name, want in pv.last_outputs.items():
            np.testing.assert_array_equal(ps.last_outputs[name], want, err_msg=name)


def test_ort_backend_runs_split_and_v1_graphs_alike(exported, tmp_path):
    """The ONNX Runtime backend feeds the counters input where a model has it (one zero: the function
    bodies never read it) and nothing where it has not (models rewritten before): the same greedy tokens."""
    import torch

    from ucm_trt.config import SparseConfig
    from ucm_trt.graph import save_model
    from ucm_trt.runtime import Engine, RuntimeConfig, SamplingParams
    from ucm_trt.runtime.algorithms import make_policy, sparse_config_for
    from ucm_trt.runtime.backends.ort_backend import OrtBackend

    path = exported("llama", "legacy", 17)
    tokens = {}
    for split in (True, False):
        model, _ = rewrite_model(path, config=RewriteConfig(algorithm="dense", block_size=BS, split_scratch=split))
        backend = OrtBackend(save_model(model, tmp_path / f"dense-{split}.onnx"))
        assert backend._split_counters == split
        with Engine(backend, make_policy("dense"), sparse=sparse_config_for("dense", SparseConfig(block_size=BS)),
                    config=RuntimeConfig(max_batch=1, max_seq_len=256, prefill_chunk=32, cache_blocks=0)) as eng:  # fmt: skip
            prompt = torch.randint(0, 1000, (40,), generator=torch.Generator().manual_seed(1)).tolist()
            [res] = eng.generate(prompt, SamplingParams(max_new_tokens=6))
        tokens[split] = res.token_ids
    assert tokens[True] == tokens[False] and len(tokens[True]) == 6
