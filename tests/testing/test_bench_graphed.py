"""ucm_trt.testing.bench.cuda_graphed: capture a callable in a CUDA graph, replay it."""

from __future__ import annotations

import pytest
import torch

from ucm_trt.testing.bench import cuda_graphed


def test_cuda_graphed_refuses_bad_arguments():
    with pytest.raises(TypeError, match="fn must be callable"):
        cuda_graphed(3)
    with pytest.raises(ValueError, match="warmup must be >= 0"):
        cuda_graphed(lambda: None, warmup=-1)


@pytest.mark.gpu
def test_cuda_graphed_replays_on_new_inputs():
    x = torch.ones(4, device="cuda")
    out = torch.empty_like(x)
    replay = cuda_graphed(lambda: torch.mul(x, 2, out=out))
    x.fill_(5.0)
    replay()
    torch.cuda.synchronize()
    assert out.tolist() == [10.0] * 4
