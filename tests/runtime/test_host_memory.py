"""Host block store page-locked at its exact size (ucm_trt.runtime.host_memory), checked on the CPU
with a stand-in for torch.cuda.cudart() that records the calls."""

from __future__ import annotations

import gc

import pytest
import torch

from ucm_trt.runtime.host_memory import PageLock, page_locked_empty


class _FakeCudart:
    def __init__(self, fail_at: int | None = None) -> None:
        self.registered: dict[int, int] = {}
        self.calls = 0
        self.fail_at = fail_at

    def cudaHostRegister(self, ptr: int, size: int, flags: int) -> int:  # noqa: N802 - cudart's name
        self.calls += 1
        if self.fail_at is not None and self.calls == self.fail_at:
            return 2  # cudaErrorMemoryAllocation
        assert ptr not in self.registered and flags == 0
        self.registered[ptr] = size
        return 0

    def cudaHostUnregister(self, ptr: int) -> int:  # noqa: N802
        del self.registered[ptr]
        return 0


class _Owner:
    pass


def test_store_tensors_are_registered_at_their_exact_size_and_released_with_their_owner():
    cudart, owner = _FakeCudart(), _Owner()
    # 30 blocks (not a power of two) of the 8B shape's layout, registered at exactly their bytes
    tensors, lock = page_locked_empty(owner, 2, (30, 2, 8, 64, 128), torch.bfloat16, cudart=cudart)
    assert [t.shape for t in tensors] == [torch.Size((30, 2, 8, 64, 128))] * 2
    assert cudart.registered == {t.data_ptr(): 30 * 2 * 8 * 64 * 128 * 2 for t in tensors}
    assert all(t.is_contiguous() and t.dtype == torch.bfloat16 for t in tensors)
    # the addressing the copies use: block i of layer l is at data_ptr + i * block bytes
    bb = 2 * 8 * 64 * 128 * 2
    tensors[1][7].fill_(3)
    assert tensors[1].view(torch.uint8).reshape(-1)[7 * bb : 8 * bb].view(torch.bfloat16).eq(3).all()
    del lock, tensors
    gc.collect()
    assert len(cudart.registered) == 2  # still registered while the owner lives
    del owner
    gc.collect()
    assert cudart.registered == {}


def test_a_failed_registration_names_the_size_and_undoes_the_others():
    cudart, owner = _FakeCudart(fail_at=3), _Owner()
    with pytest.raises(RuntimeError, match=r"cudaHostRegister of host store tensor 2 \(0\.00 GiB\) failed with CUDA "
                                           r"error 2; lower RuntimeConfig.num_host_blocks"):
        page_locked_empty(owner, 4, (4, 2, 1, 4, 8), torch.float32, cudart=cudart)
    assert cudart.registered == {}


def test_release_is_idempotent_and_rejects_strided_tensors():
    cudart, owner = _FakeCudart(), _Owner()
    t = torch.zeros(8, 4)
    lock = PageLock(owner, [t], cudart)
    lock.release()
    lock.release()
    assert cudart.registered == {}
    with pytest.raises(ValueError, match="tensors\\[0\\] must be a contiguous CPU tensor"):
        PageLock(owner, [t.t()], cudart)
