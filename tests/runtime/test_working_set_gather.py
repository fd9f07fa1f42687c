"""The working-set gather the ONNX Runtime and TensorRT backends share (runtime.backends.base): a
graph takes ONE block table, the runtime keeps one per layer."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from ucm_trt.runtime.backends.base import (
    gather_working_sets,
    gathered_table,
    layer_selection_feed,
    step_blocks,
    tables_agree,
)

BS, HKV, D = 4, 2, 3


def _step(tables: torch.Tensor, new_lens, selections=None):
    """A step over per-layer tables ``[L, B, max_blocks]`` and random pools of 12 blocks."""
    g = torch.Generator().manual_seed(0)
    layers = tables.shape[0]
    pools = [torch.randn(12, 2, HKV, BS, D, generator=g) for _ in range(layers)]
    kv = SimpleNamespace(pools=pools, tables_host=tables)
    return SimpleNamespace(kv=kv, rows=[f"r{i}" for i in range(tables.shape[1])], new_lens=list(new_lens),
                           tables=lambda layer: tables[layer], selections=selections or [None] * layers,
                           policy=SimpleNamespace(name="esa"))  # fmt: skip


def test_identical_tables_bind_as_they_are():
    t = torch.tensor([[[3, 5, 7], [1, 2, 0]]] * 2, dtype=torch.int32)
    step = _step(t, [9, 5])
    assert step_blocks(step) == 3 and tables_agree(step, 2)


def test_tables_that_differ_only_past_the_last_block_still_agree():
    t = torch.tensor([[[3, 5, 7], [1, 2, 0]], [[3, 5, 9], [1, 2, 11]]], dtype=torch.int32)
    assert tables_agree(_step(t, [7, 6]), 2)  # 2 blocks per row: column 2 is never read
    assert not tables_agree(_step(t, [9, 6]), 2)


@pytest.mark.parametrize("into_staging", [False, True])
def test_gathered_pools_hold_each_layers_blocks_in_logical_order(into_staging):
    t = torch.tensor([[[3, 5, 7], [1, 2, 0]], [[4, 6, 8], [9, 10, 11]]], dtype=torch.int32)
    step = _step(t, [9, 5])
    assert not tables_agree(step, 2)
    staging = [torch.full((8, 2, HKV, BS, D), float("nan")) for _ in range(2)] if into_staging else None
    pools = gather_working_sets(step, 2, out=staging)
    table = gathered_table(step)
    assert table.tolist() == [[0, 1, 2], [3, 4, 5]]
    for layer in range(2):
        for row in range(2):
            for j in range(3):
                torch.testing.assert_close(pools[layer][table[row, j]], step.kv.pools[layer][t[layer, row, j]])
        if into_staging:
            assert pools[layer].data_ptr() == staging[layer].data_ptr()  # written in place, no new buffer


def test_selection_feed():
    t = torch.zeros(1, 2, 3, dtype=torch.int32)
    sel = torch.zeros(2, HKV, 1, dtype=torch.int32)
    step = _step(t, [9, 5], selections=[sel])
    assert layer_selection_feed(step, 0, has_input=True, every_block=lambda: "all", model="m") is sel
    step.selections = [None]
    assert layer_selection_feed(step, 0, has_input=True, every_block=lambda: "all", model="m") == "all"
    assert layer_selection_feed(step, 0, has_input=False, every_block=lambda: "all", model="m") is None
    step.selections = [sel]
    with pytest.raises(ValueError, match="layer 0 of the engine .* has no selection input but the policy 'esa'"):
        layer_selection_feed(step, 0, has_input=False, every_block=lambda: "all", model="the engine (x)")
