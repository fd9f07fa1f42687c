"""SmolLM2-135M-Instruct on TensorRT for RTX (SM89): the architecture with 2 random layers (fast) and
the real 30-layer checkpoint (slow: export + rewrite + a ~0.5 GB engine, minutes on 2 cores)."""

from __future__ import annotations

import pytest
import torch

from tests.graph.test_smollm2 import SMOL
from tests.trt_rtx._rtx_harness import check_rtx_build
from trt_plugins.build import EngineBuildConfig
from ucm_trt.config import ReRoPEConfig
from ucm_trt.graph import ExportConfig, RewriteConfig, export_hf_model, rewrite_model

BS = 16
ENGINE = EngineBuildConfig(max_batch=2, max_prefill_tokens=32, max_blocks=4, num_blocks=8, max_selected=4,
                           sms=128)  # SM89 target: an RTX 4090's 128 SMs
ALGORITHMS = {"esa": {}, "rerope": {"rerope": ReRoPEConfig(window=512, training_length=8192)}}


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_smollm2_architecture_builds_for_sm89(tmp_path, algorithm):
    """9 query heads, 3 KV heads, head_dim 64, theta 1e5; 2 random layers."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**SMOL, num_hidden_layers=2, vocab_size=512)).eval()
    path = export_hf_model(model, tmp_path / "smol2.onnx", config=ExportConfig(exporter="legacy"))
    rw, rep = rewrite_model(path, config=RewriteConfig(algorithm=algorithm, block_size=BS, **ALGORITHMS[algorithm]))
    assert len(rep.rewritten) == 2 and not rep.unsupported
    check_rtx_build(rw, ENGINE, BS)


@pytest.mark.slow
def test_smollm2_checkpoint_builds_for_sm89(tmp_path):
    from ucm_trt.models.smollm2 import smollm2_checkpoint_dir

    path = export_hf_model(smollm2_checkpoint_dir(), tmp_path / "smollm2.onnx", config=ExportConfig(exporter="legacy"))
    rw, rep = rewrite_model(path, config=RewriteConfig(algorithm="esa", block_size=BS))
    assert rep.counts == {"decomposed_sdpa": 30} and not rep.unsupported
    result = check_rtx_build(rw, ENGINE, BS)
    assert result.network.plugin_layers == {"UcmPagedSparseAttentionSplitK": 30}
    print(f"SmolLM2 on TensorRT for RTX {result.tensorrt_rtx_version} (SM89): engine {len(result.engine) / 1e6:.1f} MB, "
          f"build {result.seconds:.1f} s")
