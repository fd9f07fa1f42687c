"""The decode plan's host fast paths (issue 13) against the straightforward versions they replaced,
on randomised inputs: the selection index checks (shared selections checked once, not per head)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ucm_trt.config import SparseConfig
from ucm_trt.runtime import Engine, RuntimeConfig, TorchBackend
from ucm_trt.runtime.algorithms import make_policy

from .conftest import tiny_llama

BS = 16


@pytest.fixture(scope="module")
def engine():
    model = tiny_llama(layers=3, kv_heads=2)
    eng = Engine(TorchBackend(model, attention="reference"), make_policy("esa"),
                 sparse=SparseConfig(block_size=BS), config=RuntimeConfig(max_batch=4, max_seq_len=1024))
    yield eng
    eng.close()


def _reference_check(eng: Engine, writes, new_lens) -> str | None:
    """The per-head check as it was before the shared-selection fast path (the error text or None)."""
    bs = eng.sparse.block_size
    nb_all = np.array([-(-n // bs) for n in new_lens], dtype=np.int64)
    li = np.array([p[0] for p in writes], dtype=np.int64)
    ri = np.array([p[1] for p in writes], dtype=np.int64)
    w = max(1, int(eng._sel_hw[li, ri].max()))
    x = eng._sel_h.numpy()[li, ri, :, :w].astype(np.int64)
    nb = nb_all[ri][:, None, None]
    valid = x >= 0
    nv = valid.sum(-1, keepdims=True)
    bad = (x < -1) | (valid != (np.arange(w) < nv)) | (valid & (x >= nb))
    bad[..., 1:] |= valid[..., 1:] & (x[..., 1:] <= x[..., :-1])
    safe = np.where(valid & ~bad, x, 0).reshape(len(writes), -1)
    tables = eng.kv.tables_host.numpy()
    phys = np.take_along_axis(tables[li, ri].astype(np.int64), safe, axis=1).reshape(x.shape)
    not_resident = valid & ~bad & (phys == 0)
    if not (bad.any() or not_resident.any()):
        return None
    i, head, _ = (int(j[0]) for j in np.nonzero(bad | not_resident))
    ids = x[i, head][x[i, head] != -1].tolist()
    rule = ("sorted strictly ascending" if bad[i, head].any() else "is not resident")
    return f"layer {int(li[i])} row {int(ri[i])} (?) head {head} selection {ids[:16]}", rule


def _random_mirror(eng: Engine, g: np.random.Generator, fault: str | None):
    """Random sorted selections (shared across heads or per head) in the mirror, random resident
    tables, optionally one fault at a random entry/head."""
    L, B, H, M = eng._sel_h.shape
    new_lens = [int(g.integers(BS, 40 * BS)) for _ in range(B)]
    tables = eng.kv.tables_host.numpy()
    tables[:] = g.integers(1, 100, size=tables.shape)
    sel = eng._sel_h.numpy()
    sel[:] = -1
    writes = []
    for layer in range(L):
        for row in range(B):
            if g.random() < 0.3:
                continue
            nb = -(-new_lens[row] // BS)
            n = int(g.integers(1, nb + 1))
            heads = [np.sort(g.choice(nb, size=n, replace=False))] * H if g.random() < 0.6 else [
                np.sort(g.choice(nb, size=n, replace=False)) for _ in range(H)]
            for head, ids in enumerate(heads):
                sel[layer, row, head, :n] = ids
            eng._sel_hw[layer, row] = n
            writes.append((layer, row))
    if fault is not None:
        layer, row = writes[int(g.integers(len(writes)))]
        head = int(g.integers(H))
        n = int(eng._sel_hw[layer, row])
        ids = sel[layer, row, head, :n]
        if fault == "order" and n > 1:
            ids[0], ids[1] = ids[1], ids[0]
        elif fault == "range":
            ids[-1] = -(-new_lens[row] // BS)
        else:  # not resident
            tables[layer, row, ids[int(g.integers(n))]] = 0
    return writes, new_lens


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("fault", [None, "order", "range", "resident"])
def test_selection_check_equals_the_per_head_check(engine, seed, fault):
    g = np.random.default_rng(seed * 7 + hash(fault) % 1000)
    writes, new_lens = _random_mirror(engine, g, fault)
    want = _reference_check(engine, writes, new_lens)
    if want is None:
        engine._check_selections(writes, new_lens)
        return
    where, rule = want
    with pytest.raises(ValueError) as err:
        engine._check_selections(writes, new_lens)
    assert where in str(err.value) and rule in str(err.value)


def _reference_views(sels, new_lens, h, max_width):
    """Per layer, what the kernels must read: each row's selection then -1 (None = every block of the
    row), at the bucketed width of the layer's widest row; None where the whole layer is None."""
    from ucm_trt.runtime.cuda_graph import SELECTION_WIDTH_BUCKET

    out = []
    for per_row in sels:
        if all(s is None for s in per_row):
            out.append(None)
            continue
        rows = [torch.arange(-(-n // BS), dtype=torch.int32).expand(h, -1) if s is None else s
                for s, n in zip(per_row, new_lens, strict=True)]
        width = max(1, *(r.shape[1] for r in rows))
        width = min(max_width, -(-width // SELECTION_WIDTH_BUCKET) * SELECTION_WIDTH_BUCKET)
        v = torch.full((len(rows), h, width), -1, dtype=torch.int32)
        for i, r in enumerate(rows):
            v[i, :, : r.shape[1]] = r
        out.append(v)
    return out


@pytest.mark.parametrize("seed", range(6))
def test_selection_writes_equal_a_fresh_write_every_step(engine, seed):
    """Steps of random selections (kept objects, new ones, None rows and layers, widths growing and
    shrinking, the batch changing size): after each step the device views equal a mirror written
    from scratch, whatever the layer- and row-level reuse skipped."""
    g = np.random.default_rng(seed)
    L, B, H, M = engine._sel_h.shape
    engine.kv.tables_host.fill_(1)  # every block resident (the residency check passes)
    engine._sel_last = None
    engine._sel_h.fill_(-1)
    engine._sel_hw[:] = 0
    lens = [int(g.integers(BS, 30 * BS)) for _ in range(B)]
    last = None
    for _ in range(25):
        b = int(g.integers(1, B + 1)) if g.random() < 0.2 or last is None else len(last[0])
        lens = [n + int(g.integers(0, 2)) for n in lens]
        new_lens = lens[:b]
        sels = []
        for layer in range(L):
            per_row = []
            for row in range(b):
                u = g.random()
                keep = last is not None and row < len(last[layer]) and u < 0.6
                if keep and last[layer][row] is not None:
                    per_row.append(last[layer][row])
                elif u < 0.75:
                    per_row.append(None)
                else:
                    nb = -(-new_lens[row] // BS)
                    ids = np.sort(g.choice(nb, size=int(g.integers(1, min(nb, 40) + 1)), replace=False))
                    per_row.append(torch.from_numpy(ids.astype(np.int32)).expand(H, -1).contiguous())
            if g.random() < 0.15:
                per_row = [None] * b
            sels.append(per_row)
        views, widths = engine._write_selections(sels, new_lens, BS, b, H)
        want = _reference_views(sels, new_lens, H, M)
        for layer in range(L):
            if want[layer] is None:
                assert views[layer] is None and widths[layer] is None
            else:
                assert widths[layer] == want[layer].shape[-1]
                assert torch.equal(views[layer], want[layer]), f"layer {layer}"
        last = sels


def test_a_selection_of_the_wrong_shape_is_named(engine):
    """A changed row whose selection is not ``[Hkv, S]`` is a RuntimeError naming layer, row and
    shape; rows that did not change since the last step are not checked again."""
    L, B, H, _ = engine._sel_h.shape
    engine.kv.tables_host.fill_(1)
    engine._sel_last = None
    good = torch.arange(3, dtype=torch.int32).expand(H, -1).contiguous()
    sels = [[good, None] for _ in range(L)]
    engine._write_selections(sels, [100, 100], BS, 2, H)
    bad = [[good, None] for _ in range(L)]
    bad[L - 1][1] = torch.arange(3, dtype=torch.int32)
    with pytest.raises(RuntimeError, match=rf"layer {L - 1} row 1 selection must be \[Hkv={H}, S\], got shape \(3,\)"):
        engine._write_selections(bad, [100, 100], BS, 2, H)
