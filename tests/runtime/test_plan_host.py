"""The decode plan's host fast paths (issue 13) against the straightforward versions they replaced,
on randomised inputs: the selection index checks (shared selections checked once, not per head)."""

from __future__ import annotations

import numpy as np
import pytest

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
