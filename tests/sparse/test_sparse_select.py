"""Selection: hypothesis properties and an explicit loop reference."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ucm_trt.config import Budget, SparseConfig
from ucm_trt.sparse.score import reduce_scores
from ucm_trt.sparse.select import (
    budget_counts,
    candidate_mask,
    forced_mask,
    mask_to_selection,
    num_blocks_from_seq_lens,
    select_blocks,
    select_blocks_by_count,
    selection_counts,
    selection_mask,
)

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# ---------------------------------------------------------------------------------------------
# loop reference


def _ref_forced(n: int, sink: int, local: int, min_blocks: int) -> set[int]:
    if n < min_blocks:
        return set(range(n))
    return {i for i in range(n) if i < sink or i >= n - local}


def _ref_count(budget: Budget, cand_scores: list[float]) -> int:
    n = len(cand_scores)
    if budget.kind == "top_k":
        return min(int(budget.value), n)
    if budget.kind == "ratio":
        return 0 if n == 0 else max(1, min(n, math.floor(budget.value * n + 1e-9)))
    if budget.kind == "threshold":
        return sum(1 for s in cand_scores if s >= budget.value)
    raise AssertionError("mass handled by property checks")


def _ref_select(scores: torch.Tensor, nb: list[int], cfg: SparseConfig) -> list[list[list[int]]]:
    out = []
    for b, n in enumerate(nb):
        rows = []
        for h in range(scores.shape[1]):
            forced = _ref_forced(n, cfg.sink_blocks, cfg.local_blocks, cfg.min_blocks)
            cands = [i for i in range(n) if i not in forced]
            vals = [float(scores[b, h, i]) for i in cands]
            order = sorted(range(len(cands)), key=lambda j: (-vals[j], cands[j]))
            c = _ref_count(cfg.budget, vals)
            rows.append(sorted(forced | {cands[j] for j in order[:c]}))
        out.append(rows)
    return out


def _rows(sel: torch.Tensor) -> list[list[list[int]]]:
    return [[[int(x) for x in row if x >= 0] for row in head] for head in sel.tolist()]


# ---------------------------------------------------------------------------------------------
# strategies


@st.composite
def budgets(draw) -> Budget:
    kind = draw(st.sampled_from(["top_k", "ratio", "threshold", "mass"]))
    if kind == "top_k":
        return Budget.top_k(draw(st.integers(1, 12)))
    if kind == "ratio":
        return Budget.ratio(draw(st.sampled_from([0.01, 0.125, 0.25, 0.3, 0.5, 0.99, 1.0])))
    if kind == "threshold":
        return Budget.threshold(draw(st.sampled_from([-2.0, -0.5, 0.0, 1.0, 3.0])))
    return Budget.mass(draw(st.sampled_from([0.1, 0.5, 0.9, 0.99, 1.0])))


@st.composite
def problems(draw, shared: bool | None = None):
    b = draw(st.integers(1, 3))
    h = draw(st.integers(1, 4))
    m = draw(st.integers(1, 24))
    nb = draw(st.lists(st.integers(0, m), min_size=b, max_size=b))
    mode = draw(st.sampled_from(["shared", "per_head"])) if shared is None else ("shared" if shared else "per_head")
    # small integer range so that ties happen often
    seed = draw(st.integers(0, 2**31 - 1))
    span = draw(st.sampled_from([1, 3, 100]))
    g = torch.Generator().manual_seed(seed)
    scores = torch.randint(-span, span + 1, (b, h, m), generator=g).to(torch.float32)
    cfg = SparseConfig(
        block_size=16,
        sink_blocks=draw(st.integers(0, 3)),
        local_blocks=draw(st.integers(1, 3)),
        min_blocks=draw(st.integers(1, 6)),
        budget=draw(budgets()),
        selection=mode,
    )
    return scores, torch.tensor(nb, dtype=torch.int32), cfg


def _run(scores: torch.Tensor, nb: torch.Tensor, cfg: SparseConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (selection, the scores the selector ranked [B, H', M])."""
    h = scores.shape[1]
    if cfg.selection == "shared":
        reduced = reduce_scores(scores, "dot")
        return select_blocks(reduced, nb, cfg, num_kv_heads=h), reduced
    return select_blocks(scores, nb, cfg), scores


# ---------------------------------------------------------------------------------------------
# properties


@SETTINGS
@given(problems())
def test_selection_format_and_windows(problem) -> None:
    scores, nb, cfg = problem
    sel, _ = _run(scores, nb, cfg)
    b, h, _ = scores.shape
    assert sel.dtype == torch.int32 and sel.shape[:2] == (b, h)
    for bi in range(b):
        n = int(nb[bi])
        forced = _ref_forced(n, cfg.sink_blocks, cfg.local_blocks, cfg.min_blocks)
        for hi in range(h):
            row = sel[bi, hi].tolist()
            ids = [x for x in row if x >= 0]
            # -1 padding only at the end, ids sorted strictly (no duplicates), in range
            assert row == ids + [-1] * (len(row) - len(ids))
            assert ids == sorted(set(ids))
            assert all(0 <= x < n for x in ids)
            # windows always present (incl. the partial last block = block n-1)
            assert forced <= set(ids)
            if n > 0:
                assert n - 1 in ids
        # at least one row fills the width (no needless padding)
    assert int(selection_counts(sel).max()) == sel.shape[-1] or int(nb.max()) == 0


@SETTINGS
@given(problems())
def test_selection_matches_loop_reference(problem) -> None:
    scores, nb, cfg = problem
    if cfg.budget.kind == "mass":
        return  # checked by its defining property below (float sums near the target)
    sel, ranked = _run(scores, nb, cfg)
    want = _ref_select(ranked, nb.tolist(), cfg)
    if cfg.selection == "shared":
        want = [[r[0]] * scores.shape[1] for r in want]
    assert _rows(sel) == want


@SETTINGS
@given(problems())
def test_budget_respected(problem) -> None:
    scores, nb, cfg = problem
    sel, ranked = _run(scores, nb, cfg)
    bud = cfg.budget
    for bi, n in enumerate(nb.tolist()):
        forced = _ref_forced(n, cfg.sink_blocks, cfg.local_blocks, cfg.min_blocks)
        cands = [i for i in range(n) if i not in forced]
        for hi in range(sel.shape[1]):
            ids = {x for x in sel[bi, hi].tolist() if x >= 0}
            kept = sorted(ids - forced)
            assert set(kept) <= set(cands)
            hr = 0 if cfg.selection == "shared" else hi
            cs = [float(ranked[bi, hr, i]) for i in cands]
            ks = [float(ranked[bi, hr, i]) for i in kept]
            if bud.kind == "top_k":
                assert len(kept) == min(int(bud.value), len(cands))
            elif bud.kind == "ratio":
                want = 0 if not cands else max(1, math.floor(bud.value * len(cands) + 1e-9))
                assert len(kept) == min(want, len(cands))
                assert len(kept) <= max(1, bud.value * len(cands) + 1e-9)
            elif bud.kind == "threshold":
                assert all(s >= bud.value for s in ks)
                assert len(kept) == sum(1 for s in cs if s >= bud.value)
            else:  # mass: smallest prefix of the best candidates whose softmax mass covers the target
                if not cands:
                    assert not kept
                    continue
                top = max(cs)
                w = sorted((math.exp(s - top) for s in cs), reverse=True)
                total = sum(w)
                c = len(kept)
                assert c >= 1
                assert sum(w[:c]) / total >= bud.value - 1e-9 or c == len(cands)
                assert sum(w[: c - 1]) / total < bud.value + 1e-9
            # kept candidates are the best ones: nothing left out scores higher than a kept one
            left = [float(ranked[bi, hr, i]) for i in cands if i not in ids]
            if ks and left:
                assert min(ks) >= max(left)


@SETTINGS
@given(problems(), st.data())
def test_select_all_when_budget_covers_everything_or_short(problem, data) -> None:
    scores, nb, cfg = problem
    everything = data.draw(
        st.sampled_from([Budget.ratio(1.0), Budget.top_k(24), Budget.threshold(-1e9), Budget.mass(1.0)])
    )
    import dataclasses

    cfg = dataclasses.replace(cfg, budget=everything)
    sel, _ = _run(scores, nb, cfg)
    for bi, n in enumerate(nb.tolist()):
        for hi in range(sel.shape[1]):
            assert [x for x in sel[bi, hi].tolist() if x >= 0] == list(range(n))
    # sequences shorter than min_blocks select all whatever the budget
    cfg2 = dataclasses.replace(cfg, budget=Budget.top_k(1), min_blocks=30)
    sel2, _ = _run(scores, nb, cfg2)
    for bi, n in enumerate(nb.tolist()):
        for hi in range(sel2.shape[1]):
            assert [x for x in sel2[bi, hi].tolist() if x >= 0] == list(range(n))


@SETTINGS
@given(problems(shared=True))
def test_shared_rows_identical(problem) -> None:
    scores, nb, cfg = problem
    sel, _ = _run(scores, nb, cfg)
    assert torch.equal(sel, sel[:, :1].expand_as(sel))


@SETTINGS
@given(problems(), st.integers(0, 2**31 - 1))
def test_ties_deterministic_lower_id_wins(problem, seed) -> None:
    scores, nb, cfg = problem
    const = torch.zeros_like(scores)  # every candidate ties
    sel1, _ = _run(const, nb, cfg)
    sel2, _ = _run(const.clone(), nb, cfg)
    assert torch.equal(sel1, sel2)
    if cfg.budget.kind in ("top_k", "ratio"):
        for bi, n in enumerate(nb.tolist()):
            forced = _ref_forced(n, cfg.sink_blocks, cfg.local_blocks, cfg.min_blocks)
            cands = [i for i in range(n) if i not in forced]
            for hi in range(sel1.shape[1]):
                kept = sorted({x for x in sel1[bi, hi].tolist() if x >= 0} - forced)
                assert kept == cands[: len(kept)]
    # values past num_blocks never matter (even NaN)
    g = torch.Generator().manual_seed(seed)
    noisy = scores.clone()
    idx = torch.arange(scores.shape[-1])
    past = idx[None, None, :] >= nb[:, None, None].long()
    noisy[past.expand_as(noisy)] = float("nan")
    noisy2 = torch.where(past, torch.randn(scores.shape, generator=g) * 100, scores)
    assert torch.equal(_run(noisy, nb, cfg)[0], _run(scores, nb, cfg)[0])
    assert torch.equal(_run(noisy2, nb, cfg)[0], _run(scores, nb, cfg)[0])


def test_per_head_rows_differ_and_example() -> None:
    cfg = SparseConfig(block_size=16, sink_blocks=1, local_blocks=2, min_blocks=4, budget=Budget.top_k(2),
                       selection="per_head")
    scores = torch.tensor([[[0, 5, 1, 4, 2, 0, 9, 9], [0, 1, 5, 2, 4, 0, 9, 9]]], dtype=torch.float32)
    nb = torch.tensor([8], dtype=torch.int32)
    sel = select_blocks(scores, nb, cfg)
    assert sel.tolist() == [[[0, 1, 3, 6, 7], [0, 2, 4, 6, 7]]]
    # partial last block at 6 blocks: blocks 4, 5 are the local window
    sel = select_blocks(scores, torch.tensor([6], dtype=torch.int32), cfg)
    assert sel.tolist() == [[[0, 1, 3, 4, 5], [0, 2, 3, 4, 5]]]


def test_fixed_width_output_and_by_count() -> None:
    cfg = SparseConfig(block_size=16, budget=Budget.top_k(1), min_blocks=1, selection="shared")
    scores = torch.arange(10, dtype=torch.float32).reshape(1, 1, 10)
    sel = select_blocks(scores, torch.tensor([10], dtype=torch.int32), cfg, num_kv_heads=3, max_selected=8)
    assert sel.shape == (1, 3, 8)
    assert sel[0, 0].tolist() == [0, 7, 8, 9, -1, -1, -1, -1]
    with pytest.raises(ValueError, match="max_selected"):
        select_blocks(scores, torch.tensor([10], dtype=torch.int32), cfg, max_selected=3)
    by = select_blocks_by_count(scores.expand(1, 2, 10), torch.tensor([10], dtype=torch.int32),
                                torch.tensor([[0, 3]]), sink_blocks=1, local_blocks=2)
    assert _rows(by) == [[[0, 8, 9], [0, 5, 6, 7, 8, 9]]]


@SETTINGS
@given(problems())
def test_mask_helpers_roundtrip(problem) -> None:
    scores, nb, cfg = problem
    sel, _ = _run(scores, nb, cfg)
    m = scores.shape[-1]
    mask = selection_mask(sel, m)
    assert mask.shape == scores.shape and mask.dtype == torch.bool
    assert torch.equal(mask_to_selection(mask, sel.shape[-1]), sel)
    assert torch.equal(mask.sum(-1), selection_counts(sel))
    forced = forced_mask(nb, m, sink_blocks=cfg.sink_blocks, local_blocks=cfg.local_blocks,
                         min_blocks=cfg.min_blocks)
    cand = candidate_mask(nb, m, sink_blocks=cfg.sink_blocks, local_blocks=cfg.local_blocks,
                          min_blocks=cfg.min_blocks)
    assert not bool((forced & cand).any())
    assert torch.equal((forced | cand).sum(-1), nb.long())
    assert bool((mask | ~forced[:, None]).all())


def test_budget_counts_and_num_blocks() -> None:
    cand = torch.tensor([[True] * 10, [False] * 10])
    assert budget_counts(Budget.ratio(0.25), cand).tolist() == [2, 0]
    assert budget_counts(Budget.ratio(0.01), cand).tolist() == [1, 0]
    assert budget_counts(Budget.top_k(3), cand).tolist() == [3, 0]
    s = torch.tensor([[10.0] + [0.0] * 9, [0.0] * 10])
    assert budget_counts(Budget.mass(0.99), cand, s).tolist() == [1, 0]
    assert budget_counts(Budget.mass(1.0), cand, s).tolist() == [10, 0]
    assert budget_counts(Budget.threshold(0.0), cand, s).tolist() == [10, 0]
    assert num_blocks_from_seq_lens(torch.tensor([0, 1, 16, 17]), 16).tolist() == [0, 1, 1, 2]


# ---------------------------------------------------------------------------------------------
# bad input

CFG = SparseConfig(block_size=16, budget=Budget.top_k(2), selection="per_head")
NB = torch.tensor([4], dtype=torch.int32)
S = torch.zeros(1, 2, 6)


@pytest.mark.parametrize(
    ("call", "exc", "match"),
    [
        (lambda: select_blocks(S[0], NB, CFG), ValueError, "scores"),
        (lambda: select_blocks(S.long(), NB, CFG), TypeError, "scores"),
        (lambda: select_blocks([[0.0]], NB, CFG), TypeError, "scores"),
        (lambda: select_blocks(S, NB.float(), CFG), TypeError, "num_blocks"),
        (lambda: select_blocks(S, torch.tensor([4, 4], dtype=torch.int32), CFG), ValueError, "num_blocks"),
        (lambda: select_blocks(S, torch.tensor([7], dtype=torch.int32), CFG), ValueError, "num_blocks"),
        (lambda: select_blocks(S, torch.tensor([-1], dtype=torch.int32), CFG), ValueError, "num_blocks"),
        (lambda: select_blocks(S, NB, "cfg"), TypeError, "config"),
        (lambda: select_blocks(S, NB, CFG, num_kv_heads=3), ValueError, "num_kv_heads"),
        (lambda: select_blocks(S, NB, CFG, max_selected=0), ValueError, "max_selected"),
        (lambda: select_blocks(S, NB, SparseConfig(block_size=16, selection="shared")), ValueError, "reduce"),
        (lambda: select_blocks(torch.full((1, 2, 6), float("nan")), NB, CFG), ValueError, "finite"),
        (lambda: select_blocks_by_count(S, NB, -1, sink_blocks=1, local_blocks=1), ValueError, "counts"),
        (lambda: select_blocks_by_count(S, NB, torch.ones(3, 3, dtype=torch.int64), sink_blocks=1,
                                        local_blocks=1), ValueError, "counts"),
        (lambda: select_blocks_by_count(S, NB, 1, sink_blocks=1, local_blocks=0), ValueError, "local_blocks"),
        (lambda: select_blocks_by_count(S, NB, 1.5, sink_blocks=1, local_blocks=1), TypeError, "counts"),
        (lambda: selection_mask(torch.tensor([[[0, 7]]], dtype=torch.int32), 6), ValueError, "selection"),
        (lambda: selection_mask(torch.tensor([[[0, -2]]], dtype=torch.int32), 6), ValueError, "selection"),
        (lambda: selection_mask(torch.zeros(1, 2, 3), 6), TypeError, "selection"),
        (lambda: selection_mask(torch.zeros(2, 3, dtype=torch.int32), 6), ValueError, "selection"),
        (lambda: mask_to_selection(torch.zeros(1, 2, 3)), TypeError, "mask"),
        (lambda: mask_to_selection(torch.ones(1, 1, 3, dtype=torch.bool), 2), ValueError, "max_selected"),
        (lambda: selection_counts(torch.zeros(3, dtype=torch.int32)), ValueError, "selection"),
        (lambda: budget_counts("top_k", torch.ones(1, 3, dtype=torch.bool)), TypeError, "budget"),
        (lambda: budget_counts(Budget.mass(0.5), torch.ones(1, 3, dtype=torch.bool)), ValueError, "scores"),
        (lambda: budget_counts(Budget.top_k(1), torch.ones(1, 3)), TypeError, "candidates"),
        (lambda: forced_mask(NB, 3, sink_blocks=1, local_blocks=1), ValueError, "num_blocks"),
        (lambda: forced_mask(NB, 6, sink_blocks=-1, local_blocks=1), ValueError, "sink_blocks"),
        (lambda: candidate_mask(NB, 6, sink_blocks=1, local_blocks=1, min_blocks=0), ValueError, "min_blocks"),
        (lambda: num_blocks_from_seq_lens(torch.tensor([-1]), 16), ValueError, "seq_lens"),
        (lambda: num_blocks_from_seq_lens(torch.tensor([1]), 0), ValueError, "block_size"),
    ],
)
def test_bad_input(call, exc, match) -> None:
    with pytest.raises(exc, match=match):
        call()
