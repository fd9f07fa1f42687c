"""GPU tier of the runtime (marker ``gpu``; skipped without CUDA): the Triton attention path (head_dim >= 32, a kernel requirement), pinned
host store and side-stream delta prefetch against the CPU reference path, and a decode-throughput
measurement (``perf``) on a Llama-3.2-1B-shaped random model."""

from __future__ import annotations

import pytest
import torch

from ucm_trt.config import Budget, GSAOnDeviceConfig, SparseConfig
from ucm_trt.runtime import Engine, RuntimeConfig, SamplingParams, TorchBackend
from ucm_trt.runtime.algorithms import make_policy, sparse_config_for

from .conftest import tiny_llama


def _tokens(model, algorithm, attention, *, budget=None, steps=32, **kw):
    budget = Budget.ratio(1.0) if budget is None else budget
    sparse = sparse_config_for(algorithm, SparseConfig(block_size=16, budget=budget, retrieval_stride=3))
    with Engine(TorchBackend(model, attention=attention), make_policy(algorithm, **kw), sparse=sparse,
                config=RuntimeConfig(max_batch=2, max_seq_len=1024, prefill_chunk=128, cache_blocks=0)) as eng:
        g = torch.Generator().manual_seed(0)
        prompts = [torch.randint(0, 256, (300,), generator=g).tolist(), torch.randint(0, 256, (170,), generator=g).tolist()]
        res = eng.generate(prompts, SamplingParams(max_new_tokens=steps))
        assert eng.kv.device_blocks_held() == 0
        return [r.token_ids for r in res], eng.stats()


@pytest.mark.gpu
def test_triton_path_on_cuda_matches_cpu_reference():
    cpu = tiny_llama(head_dim=32)
    ref, _ = _tokens(cpu, "dense", "reference")
    gpu = tiny_llama(head_dim=32).cuda()
    got, stats = _tokens(gpu, "dense", "triton")
    assert stats["attention"] == "triton" and stats["device"].startswith("cuda")
    assert got == ref


@pytest.mark.gpu
@pytest.mark.parametrize("algorithm", ["esa", "gsa", "gsa-on-device"])
def test_select_all_on_cuda_with_pinned_offload_equals_dense(algorithm):
    gpu = tiny_llama(head_dim=32).cuda()
    dense, _ = _tokens(gpu, "dense", "triton")
    kw = {"gsa_on_device": GSAOnDeviceConfig(top_k_tokens=4096, seq_len_threshold=0)} if algorithm == "gsa-on-device" else {}
    got, stats = _tokens(gpu, algorithm, "triton", **kw)
    assert got == dense
    if algorithm != "gsa-on-device":
        assert stats["bytes_d2h_total"] > 0  # write-back through the side stream into pinned memory


@pytest.mark.gpu
@pytest.mark.perf
def test_decode_throughput_dense_vs_sparse_llama1b_shape(tmp_path):
    """Prints decode tokens/s at 32K for dense, ESA (offload) and GSA On-Device; the numbers (not a
    threshold) are the result. benchmarks/bench_runtime.py runs the full matrix."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    out = tmp_path / "runtime.json"
    script = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_runtime.py"
    subprocess.run([sys.executable, str(script), "--contexts", "32768", "--algorithms", "dense", "esa",
                    "gsa-on-device", "--decode-steps", "32", "--out", str(out)], check=True)
    runs = json.loads(out.read_text())["runs"]
    assert all("error" not in r and r["decode_tokens_per_s"] > 0 for r in runs), runs
