"""ucm_trt.testing: tolerance table and the GPU timer (argument checks on CPU, timing on a GPU)."""

from __future__ import annotations

import pytest
import torch

from ucm_trt.testing import tolerances as tol
from ucm_trt.testing.bench import bench_gpu_ms, copy_bandwidth_tbps


def test_tolerances_grow_with_the_dtype_epsilon():
    assert tol.tolerances_for(torch.float32) == {"rtol": tol.FP32_RTOL, "atol": tol.FP32_ATOL}
    assert tol.tolerances_for(torch.float16) == {"rtol": tol.FP16_RTOL, "atol": tol.FP16_ATOL}
    assert tol.tolerances_for(torch.bfloat16) == {"rtol": tol.BF16_RTOL, "atol": tol.BF16_ATOL}
    for dtype in (torch.float16, torch.bfloat16):
        eps = torch.finfo(dtype).eps
        rt = tol.tolerances_for(dtype)["rtol"]
        # at least half an ulp (the output rounding alone), at most a few ulps
        assert eps / 2 <= rt <= 4 * eps
    assert tol.FP32_RTOL < tol.FP16_RTOL < tol.BF16_RTOL


def test_tolerances_reject_other_dtypes():
    with pytest.raises(ValueError, match="dtype must be one of"):
        tol.tolerances_for(torch.int8)
    with pytest.raises(TypeError, match="dtype must be a torch.dtype"):
        tol.tolerances_for("float16")


def test_fp16_tolerance_accepts_rounding_and_rejects_a_real_error():
    ref = torch.randn(4096, generator=torch.Generator().manual_seed(0))
    rounded = ref.half().float()
    torch.testing.assert_close(rounded, ref, **tol.tolerances_for(torch.float16))
    wrong = rounded.clone()
    wrong[7] += 0.05
    with pytest.raises(AssertionError):
        torch.testing.assert_close(wrong, ref, **tol.tolerances_for(torch.float16))


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        ({"reps": 0}, ValueError, "reps must be >= 1"),
        ({"warmup": -1}, ValueError, "warmup must be >= 0"),
        ({"reps": 2.0}, TypeError, "reps must be an int"),
        ({"inputs": []}, ValueError, "inputs must be a non-empty sequence"),
        ({"inputs": [[1]]}, TypeError, r"inputs\[0\] must be a tuple"),
        ({"flush_l2": 1}, TypeError, "flush_l2 must be a bool"),
        ({"device": "cpu"}, ValueError, "device must be a CUDA device"),
    ],
)
def test_bench_rejects_bad_arguments(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        bench_gpu_ms(lambda *a: None, **kwargs)


def test_bench_rejects_non_callable_and_small_copies():
    with pytest.raises(TypeError, match="fn must be callable"):
        bench_gpu_ms(3)
    with pytest.raises(ValueError, match="nbytes must be >="):
        copy_bandwidth_tbps("cuda", nbytes=1024)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised when CUDA is absent")
def test_bench_without_cuda_says_so():
    with pytest.raises(RuntimeError, match="torch.cuda.is_available"):
        bench_gpu_ms(lambda: None)


@pytest.mark.gpu
def test_bench_times_scale_with_work_and_rotate_inputs():
    a = torch.randn(2048, 2048, device="cuda")
    big = torch.randn(8192, 8192, device="cuda")
    small_ms = bench_gpu_ms(lambda: a @ a, reps=20)
    big_ms = bench_gpu_ms(lambda: big @ big, reps=20, flush_l2=True)
    assert 0 < small_ms < big_ms  # 64x the flops
    seen = []
    bench_gpu_ms(lambda x: seen.append(x), inputs=[(0,), (1,), (2,)], warmup=0, reps=6)
    assert seen == [0, 1, 2, 0, 1, 2]


@pytest.mark.gpu
def test_copy_bandwidth_is_plausible():
    tbps = copy_bandwidth_tbps(nbytes=256 << 20, reps=10)
    assert 0.1 < tbps < 20.0  # any HBM/GDDR card lies between these
