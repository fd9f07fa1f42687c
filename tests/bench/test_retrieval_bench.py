"""bench.retrieval: the batch-scaling rows are well formed and the paths select the same blocks."""

from __future__ import annotations

import pytest
import torch

from ucm_trt.bench.retrieval import ScalingShape, bench_batch_scaling, retrieval_task
from ucm_trt.config import Budget, SparseConfig
from ucm_trt.sparse.policies.base import select_from_scores
from ucm_trt.sparse.score import dot_scores


def test_batch_scaling_rows_and_equal_selections():
    shape = ScalingShape(num_layers=2, num_q_heads=4, num_kv_heads=2, head_dim=16)
    rows = bench_batch_scaling(shape=shape, num_blocks=40, batches=[1, 3], worker_threads=[1, 2],
                               intra_op_threads=[1], paths=[("host", "float32"), ("host", "float32")],
                               warmup=0, repeats=1)
    assert len(rows) == 2 * 2 * 2
    for r in rows:
        assert r["differing_layers_vs_first_path"] == 0
        assert r["round_ms"] > 0
        assert r["ms_per_seq_per_retrieval"] == pytest.approx(r["round_ms"] / r["batch"], rel=1e-2, abs=2e-3)
        assert r["ms_per_seq_per_step_R4"] == pytest.approx(r["ms_per_seq_per_retrieval"] / 4, rel=1e-2, abs=2e-3)
        assert r["rep_bytes_per_seq"] == 2 * 2 * 16 * 40 * 4


def test_pooled_path_selects_like_per_request_tasks():
    shape = ScalingShape(num_layers=3, num_q_heads=4, num_kv_heads=2, head_dim=16)
    rows = bench_batch_scaling(shape=shape, num_blocks=50, batches=[4], worker_threads=[2], intra_op_threads=[1],
                               paths=[("host", "float32"), ("host-pooled", "float32")], warmup=0, repeats=1)
    assert [r["path"] for r in rows] == ["host", "host-pooled"]
    assert rows[1]["differing_layers_vs_first_path"] == 0 and rows[1]["worker_threads"] == 1
    assert rows[1]["rep_bytes_per_seq"] == rows[0]["rep_bytes_per_seq"]
    with pytest.raises(ValueError, match="where must be"):
        bench_batch_scaling(shape=shape, num_blocks=50, batches=[1], worker_threads=[1], intra_op_threads=[1],
                            paths=[("gpu", "float32")], warmup=0, repeats=1)


def test_retrieval_task_equals_per_layer_reference():
    g = torch.Generator().manual_seed(0)
    reps = torch.randint(-4, 5, (3, 2, 8, 30), generator=g).float()  # integer data: exact scores
    q = torch.randint(-4, 5, (3, 4, 8), generator=g).float()
    sp = SparseConfig(block_size=16, budget=Budget.ratio(0.25))
    sel = retrieval_task(reps, q, 30, sp, 2)
    for layer in range(3):
        s = dot_scores(q[layer][None], reps[layer].permute(2, 0, 1))[0]
        ref = select_from_scores(s, 30, sp, "dot", 2)
        assert torch.equal(sel[layer, :, : ref.shape[1]], ref)
