"""Every rewritten tiny test model, parsed and built with TensorRT for RTX for an SM89 target.

Exports: the graph tests' matrix (tiny Llama / Qwen2 / Mistral, legacy opset 17 and dynamo opset 20/23,
head_dim 32 here) and the ONNX Runtime contrib / ONNX Attention graphs; each rewritten with ESA
(selection inputs), dense (UcmSelectAllBlocks) and ReRoPE. These are RTX results, not TensorRT ones.
"""

from __future__ import annotations

import pytest

from tests.graph._contrib_models import build
from tests.graph._graph_models import EXPORTS
from tests.trt_rtx._rtx_harness import check_rtx_build
from tests.trt_rtx.conftest import HEAD_DIM
from trt_plugins.build import EngineBuildConfig
from ucm_trt.config import ReRoPEConfig
from ucm_trt.graph import RewriteConfig, rewrite_model

BS = 16
ENGINE = EngineBuildConfig(max_batch=2, max_prefill_tokens=16, max_blocks=4, num_blocks=8, max_selected=4,
                           sms=128)  # SM89 target: an RTX 4090's 128 SMs
ALGORITHMS = {
    "esa": {},
    "dense": {},
    "rerope": {"rerope": ReRoPEConfig(window=8, training_length=64, logn=True)},
}
CONTRIB = ("gqa-fused", "gqa-packed", "gqa-op", "mha", "onnx-attention")


def _ids(e):
    return f"{e[0]}-{e[1]}{e[2]}"


@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("export", EXPORTS, ids=_ids)
def test_exported_model_builds_for_sm89(rtx_exported, export, algorithm):
    model, report = rewrite_model(rtx_exported(*export),
                                  config=RewriteConfig(algorithm=algorithm, block_size=BS, **ALGORITHMS[algorithm]))  # fmt: skip
    assert not report.unsupported and len(report.rewritten) == 2
    check_rtx_build(model, ENGINE, BS)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("kind", CONTRIB)
def test_contrib_graph_builds_for_sm89(kind, algorithm):
    original, _, _ = build(kind, d=HEAD_DIM)
    model, report = rewrite_model(original,
                                  config=RewriteConfig(algorithm=algorithm, block_size=BS, **ALGORITHMS[algorithm]))  # fmt: skip
    assert not report.unsupported and len(report.rewritten) == 2
    check_rtx_build(model, ENGINE, BS)
