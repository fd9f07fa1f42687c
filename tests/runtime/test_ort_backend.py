"""ONNX Runtime backend over a ucm_trt.graph-rewritten tiny Llama: same greedy tokens as the PyTorch backend."""

from __future__ import annotations

import pytest
import torch

from ucm_trt.config import Budget, DenseLayers, PrefillWindow, SparseConfig
from ucm_trt.runtime import Engine, RuntimeConfig, SamplingParams, TorchBackend
from ucm_trt.runtime.algorithms import make_policy, sparse_config_for
from ucm_trt.runtime.backends.ort_backend import OrtBackend
from ucm_trt.sparse.policies import ESAPolicy

from .conftest import tiny_llama

BS = 16
STEPS = 32


@pytest.fixture(scope="module")
def rewritten(tmp_path_factory):
    from ucm_trt.graph import RewriteConfig, export_hf_model, rewrite_model, save_model

    d = tmp_path_factory.mktemp("ort")
    src = export_hf_model(tiny_llama(), d / "tiny.onnx")
    paths = {}
    for alg in ("dense", "esa"):
        model, _ = rewrite_model(src, config=RewriteConfig(algorithm=alg, block_size=BS))
        paths[alg] = save_model(model, d / f"tiny_{alg}.onnx")
    # as rewritten before the query-window output: the last token's query only
    model, _ = rewrite_model(src, config=RewriteConfig(algorithm="esa", block_size=BS, query_window=1))
    paths["esa_w1"] = save_model(model, d / "tiny_esa_w1.onnx")
    return paths


def _prompt():
    g = torch.Generator().manual_seed(11)
    return torch.randint(0, 256, (200,), generator=g).tolist()


class _FixedESA(ESAPolicy):
    """ESA whose retrieval returns a fixed, layer- and step-dependent pattern (sink, local window and
    every third middle block, shifted by layer): the ORT and PyTorch backends must then
    attend to exactly the same blocks, so their greedy tokens must agree exactly."""

    def _select(self, reps, nbp, qs, layer, **options):  # options: ESA's (the window prior), unused
        shift = layer % 3
        ids = sorted({0, nbp - 2, nbp - 1} | set(range(1 + shift, nbp - 2, 3)))
        return torch.tensor(ids, dtype=torch.int32).expand(self.shape.num_kv_heads, len(ids)).contiguous()


def _run(backend, algorithm, budget, policy=None):
    sparse = sparse_config_for(algorithm, SparseConfig(block_size=BS, budget=budget, retrieval_stride=3))
    # every layer sparse: the random model's layers are diffuse and would run dense by default
    dense_layers = {} if algorithm == "dense" else {"dense_layers": DenseLayers()}
    with Engine(backend, policy or make_policy(algorithm, **dense_layers), sparse=sparse,
                config=RuntimeConfig(max_batch=2, max_seq_len=512, prefill_chunk=64, cache_blocks=0)) as eng:
        res = eng.generate([_prompt(), _prompt()[:120]], SamplingParams(max_new_tokens=STEPS))
        stats = eng.stats()
        assert eng.kv.device_blocks_held() == 0
    return [r.token_ids for r in res], stats


@pytest.fixture(scope="module")
def torch_runs():
    model = tiny_llama()
    return {
        "dense": _run(TorchBackend(model, attention="reference"), "dense", Budget.ratio(0.25))[0],
        "esa": _run(TorchBackend(model, attention="reference"), "esa", Budget.ratio(0.25), _FixedESA())[0],
    }


def test_ort_dense_matches_torch_backend(rewritten, torch_runs):
    tokens, stats = _run(OrtBackend(rewritten["dense"]), "dense", Budget.ratio(0.25))
    assert tokens == torch_runs["dense"]
    assert stats["attention"].startswith("onnxruntime") and stats["prefill_steps"] == 2 + 4


def test_ort_select_all_equals_dense_and_sparse_matches_torch(rewritten, torch_runs):
    backend = OrtBackend(rewritten["esa"])
    tokens_all, stats = _run(backend, "esa", Budget.ratio(1.0))
    assert tokens_all == torch_runs["dense"]
    tokens, stats = _run(backend, "esa", Budget.ratio(0.25), _FixedESA())
    assert stats["policy"]["selected_block_fraction"] < 0.7
    assert stats["device_kv_bytes_last_decode"] < stats["dense_kv_bytes_last_decode"]  # offloaded
    assert tokens == torch_runs["esa"]
    assert tokens != torch_runs["dense"]  # the sparsity changed the output: the selection was applied


def test_ort_backend_rejects_mismatched_setups(rewritten):
    backend = OrtBackend(rewritten["dense"])
    with pytest.raises(ValueError, match=r"block_size \(32\) must equal the block size .* \(16\)"):
        Engine(backend, sparse=SparseConfig(block_size=32), config=RuntimeConfig(max_seq_len=256))
    with pytest.raises(ValueError, match="rewritten for 'dense'"):
        Engine(backend, make_policy("esa"), sparse=SparseConfig(block_size=BS), config=RuntimeConfig(max_seq_len=256))
    esa = OrtBackend(rewritten["esa"])
    with pytest.raises(ValueError, match="selects blocks inside each layer's attention"):
        Engine(esa, make_policy("gsa-on-device"), sparse=sparse_config_for("gsa-on-device", SparseConfig(block_size=BS)),
               config=RuntimeConfig(max_seq_len=256))
    esa_w1 = OrtBackend(rewritten["esa_w1"])
    assert esa_w1.max_query_window == 1 and esa.max_query_window == 64
    with pytest.raises(ValueError, match="needs the queries of the last 8 prompt tokens; the onnxruntime backend "
                                         "returns at most 1"):
        Engine(esa_w1, make_policy("kvstar"), sparse=sparse_config_for("kvstar", SparseConfig(block_size=BS)),
               config=RuntimeConfig(max_seq_len=256))
    with pytest.raises(ValueError, match="algorithm 'esa' cannot be combined with the onnxruntime backend: the esa "
                                         "policy needs the queries of the last 8 prompt tokens"):
        Engine(esa_w1, make_policy("esa"), sparse=sparse_config_for("esa", SparseConfig(block_size=BS)),
               config=RuntimeConfig(max_seq_len=256))
    from ucm_trt.config import ReRoPEConfig

    rerope = make_policy("rerope", rerope=ReRoPEConfig(window=64, training_length=128))
    with pytest.raises(ValueError, match="needs a model rewritten for ReRoPE with the same settings"):
        Engine(esa, rerope, sparse=sparse_config_for("rerope", SparseConfig(block_size=BS)),
               config=RuntimeConfig(max_seq_len=256))
    with pytest.raises(ValueError, match="not a file"):
        OrtBackend("/nonexistent.onnx")


class _RecordingESA(ESAPolicy):
    """ESA (a prefill window of 16 queries) that keeps the queries its first retrieval received."""

    def __init__(self):
        super().__init__(vote=True, prefill_window=PrefillWindow(tokens=16), dense_layers=DenseLayers())
        self.seen: list[torch.Tensor] = []

    def on_prefill_end(self, req, queries):
        self.seen.append(torch.stack(queries).clone())  # [L, Hq, W, D]
        super().on_prefill_end(req, queries)


def test_ort_returns_the_prefill_window_queries_of_the_torch_backend(rewritten):
    """The rewritten graph's query_window.{i} output reaches the policy as the PyTorch backend's queries
    do: the last 16 prompt queries per layer, oldest first (a 200- and a 120-token prompt, chunks of 64)."""
    runs = {}
    for name, backend in (("torch", TorchBackend(tiny_llama(), attention="reference")),
                          ("ort", OrtBackend(rewritten["esa"]))):
        policy = _RecordingESA()
        tokens, _ = _run(backend, "esa", Budget.ratio(0.25), policy)
        assert len(policy.seen) == 2 and all(q.shape[2] == 16 for q in policy.seen)
        runs[name] = (tokens, policy.seen)
    for got, want in zip(runs["ort"][1], runs["torch"][1], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
