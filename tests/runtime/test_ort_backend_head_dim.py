"""head_dim 96 (Phi-3-class) through export, rewrite and the runtime's ONNX Runtime backend (issue 17):
the rewriter accepts it (``ucm_trt.limits``), and the Engine on the rewritten graph gives the same
greedy tokens as the PyTorch backend's fp32 reference attention, with every block selected and with
a fixed sparse selection."""

from __future__ import annotations

import pytest

from ucm_trt.config import Budget
from ucm_trt.runtime import TorchBackend
from ucm_trt.runtime.backends.ort_backend import OrtBackend

from .conftest import tiny_llama
from .test_ort_backend import BS, _FixedESA, _run

HEAD_DIM = 96


@pytest.fixture(scope="module")
def head_dim_96(tmp_path_factory):
    from ucm_trt.graph import RewriteConfig, export_hf_model, rewrite_model, save_model

    d = tmp_path_factory.mktemp("ort96")
    model = tiny_llama(head_dim=HEAD_DIM)
    src = export_hf_model(model, d / "tiny96.onnx")
    rw, report = rewrite_model(src, config=RewriteConfig(algorithm="esa", block_size=BS))
    assert not report.unsupported and all(f"D={HEAD_DIM}" in n.reason for n in report.rewritten), report.summary()
    return model, save_model(rw, d / "tiny96_esa.onnx")


def test_head_dim_96_ort_backend_matches_torch_backend(head_dim_96):
    model, path = head_dim_96
    backend = OrtBackend(path)
    dense_torch, _ = _run(TorchBackend(model, attention="reference"), "dense", Budget.ratio(0.25))
    tokens_all, _ = _run(backend, "esa", Budget.ratio(1.0))  # every block selected = dense
    assert tokens_all == dense_torch
    sparse_torch, _ = _run(TorchBackend(model, attention="reference"), "esa", Budget.ratio(0.25), _FixedESA())
    sparse_ort, stats = _run(backend, "esa", Budget.ratio(0.25), _FixedESA())
    assert sparse_ort == sparse_torch and stats["policy"]["selected_block_fraction"] < 0.7
    assert sparse_torch != dense_torch  # the sparse selection changes the output: the comparison is not vacuous


def test_head_dim_96_triton_kernels_match_ort_graph_and_reference(head_dim_96):
    """The same model through the Triton kernels (the interpreter on the CPU: small sizes), the
    rewritten graph on ONNX Runtime and the fp32 reference: the same greedy tokens."""
    import torch

    from ucm_trt.config import SparseConfig
    from ucm_trt.runtime import Engine, RuntimeConfig, SamplingParams, make_policy

    model, path = head_dim_96
    prompt = torch.randint(0, 256, (40,), generator=torch.Generator().manual_seed(3)).tolist()  # 3 blocks of 16
    tokens = {}
    for name, backend in (("torch", TorchBackend(model, attention="torch")),
                          ("triton", TorchBackend(model, attention="triton")), ("ort", OrtBackend(path))):
        with Engine(backend, make_policy("dense"), sparse=SparseConfig(block_size=BS),
                    config=RuntimeConfig(max_batch=1, max_seq_len=64, prefill_chunk=40)) as eng:
            [res] = eng.generate(prompt, SamplingParams(max_new_tokens=3))
            assert name == "ort" or eng.stats()["attention"] == name
            tokens[name] = res.token_ids
    assert tokens["triton"] == tokens["torch"] == tokens["ort"], tokens
