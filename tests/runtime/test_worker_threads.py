"""RetrievalWorker's per-thread torch intra-op thread count (oversubscription guard)."""

from __future__ import annotations

import threading

import pytest
import torch

from ucm_trt.runtime.worker import RetrievalWorker


def _in_new_thread() -> int:
    seen = []
    t = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
    t.start()
    t.join()
    return seen[0]


@pytest.mark.parametrize("threads,intra,want", [(2, None, "default"), (2, 3, 3), (1, 1, 1)])
def test_worker_threads_run_with_their_own_intra_op_count(threads, intra, want):
    own = torch.get_num_threads()
    if want == "default":
        want = max(1, own // threads)
    worker = RetrievalWorker(threads, intra_op_threads=intra)
    try:
        assert worker.intra_op_threads == want
        barrier = threading.Barrier(threads)

        def probe():
            barrier.wait()  # every task on its own worker thread
            x = torch.randn(256, 256)
            (x @ x).sum()  # a parallel op must not reset the thread's count
            return torch.get_num_threads(), threading.get_ident()

        got = [t.result() for t in [worker.submit(probe, what="probe") for _ in range(threads)]]
        assert [n for n, _ in got] == [want] * threads
        assert len({ident for _, ident in got}) == threads
        # the creating thread and threads started later keep the process's count
        assert torch.get_num_threads() == own
        assert _in_new_thread() == own
    finally:
        worker.shutdown()


def test_worker_rejects_bad_intra_op_threads():
    with pytest.raises(ValueError, match="intra_op_threads"):
        RetrievalWorker(2, intra_op_threads=0)


def test_runtime_config_passes_retrieval_intra_op_threads_to_the_engine_worker():
    """RuntimeConfig.retrieval_intra_op_threads reaches the engine's worker; bad values are named."""
    from ucm_trt.config import SparseConfig
    from ucm_trt.runtime import Engine, RuntimeConfig, TorchBackend
    from ucm_trt.runtime.algorithms import make_policy, sparse_config_for

    from .conftest import tiny_llama

    with pytest.raises(ValueError, match="RuntimeConfig.retrieval_intra_op_threads must be >= 1, got 0"):
        RuntimeConfig(retrieval_intra_op_threads=0)
    with pytest.raises(TypeError, match="RuntimeConfig.retrieval_intra_op_threads must be an int"):
        RuntimeConfig(retrieval_intra_op_threads=1.5)
    model = tiny_llama()
    with Engine(TorchBackend(model, attention="reference"), make_policy("esa"), sparse=sparse_config_for("esa", SparseConfig(block_size=16)),
                config=RuntimeConfig(max_seq_len=512, retrieval_threads=2, retrieval_intra_op_threads=1)) as eng:
        assert eng.worker.intra_op_threads == 1
