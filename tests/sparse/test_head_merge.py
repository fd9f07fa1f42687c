"""``HeadMerge``: what each KV head attends of a per-head retrieval (esa, gsa, gsa-on-device, kvstar).
``union_kv_heads`` and its fixed-width device form against a set-based reference, the option's validation and presets, and through the runtime: with
``mode="union"`` every head of a layer attends exactly the union of the blocks the heads select on their
own (``mode="own"``), and the loaded blocks stay the same."""

from __future__ import annotations

import pytest
import torch

from ucm_trt.config import Budget, DenseLayers, HeadMerge, SparseConfig
from ucm_trt.runtime.algorithms import DEFAULT_HEAD_MERGE, HEAD_MERGE, make_policy
from ucm_trt.sparse.policies import ESAPolicy, GSAOnDevicePolicy, GSAPolicy, KVStarPolicy
from ucm_trt.sparse.select import union_kv_heads, union_kv_heads_fixed


def _rows(sel: torch.Tensor) -> list[set[int]]:
    return [set(r[r >= 0].tolist()) for r in sel]


def test_head_merge_validation():
    assert HeadMerge().mode == "own"
    with pytest.raises(ValueError, match=r"HeadMerge.mode must be one of own, union; got 'all'"):
        HeadMerge(mode="all")
    for cls in (ESAPolicy, GSAPolicy, GSAOnDevicePolicy, KVStarPolicy):
        with pytest.raises(TypeError, match="head_merge must be a HeadMerge or None, got str"):
            cls(head_merge="union")
        assert cls().head_merge == HeadMerge()
    with pytest.raises(ValueError, match="algorithm 'rerope' cannot be combined with head_merge="):
        make_policy("rerope", head_merge=HeadMerge(mode="union"))


def test_presets():
    assert DEFAULT_HEAD_MERGE == HeadMerge(mode="union") == HEAD_MERGE["default"]
    assert HEAD_MERGE["ucm"] == HeadMerge()
    for algo in ("esa", "gsa", "gsa-on-device", "kvstar"):
        own = algo == "gsa-on-device"  # HEAD_MERGE_OWN: its union showed no gain on the grid
        assert make_policy(algo).head_merge == (HeadMerge() if own else DEFAULT_HEAD_MERGE)
        assert make_policy(algo, preset="ucm").head_merge == HeadMerge()
        for preset in ("default", "ucm"):
            for mode in ("own", "union"):
                assert make_policy(algo, preset=preset, head_merge=HeadMerge(mode=mode)).head_merge.mode == mode


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
def test_union_kv_heads_matches_sets(dtype):
    g = torch.Generator().manual_seed(3)
    b, h, s, nb = 5, 3, 6, 20
    sel = torch.full((b, h, s), -1, dtype=dtype)
    for i in range(b):
        for j in range(h):
            n = int(torch.randint(0, s + 1, (1,), generator=g))
            ids = torch.randperm(nb, generator=g)[:n].sort().values
            sel[i, j, :n] = ids.to(dtype)
    got = union_kv_heads(sel, nb)
    assert got.dtype == dtype and got.shape[:2] == (b, h)
    for i in range(b):
        want = set().union(*_rows(sel[i]))
        for j in range(h):
            row = got[i, j]
            ids = row[row >= 0].tolist()
            assert ids == sorted(want)  # ascending, each block once
            assert bool((row[len(ids):] == -1).all())  # -1 padded at the end
    assert got.shape[-1] == max(1, max(len(set().union(*_rows(sel[i]))) for i in range(b)))
    with pytest.raises(ValueError, match=r"selection entries must be -1 \(padding\) or block ids in \[0, 4\)"):
        union_kv_heads(sel, 4)


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("b,h,s,nb", [(5, 3, 6, 20), (4, 8, 5, 12), (3, 2, 1, 1), (2, 4, 7, 64)])
def test_union_kv_heads_fixed_equals_the_union_at_its_width(dtype, b, h, s, nb):
    """The sync-free form gives the rows of :func:`union_kv_heads`, padded with -1 to its fixed width
    ``min(H * S, max_blocks)`` (which always holds the union): permuted ids, empty rows, heads that all
    pick the same blocks, a union that fills the table (nb=12 < 8 * 5), one block."""
    g = torch.Generator().manual_seed(b * 100 + h * 10 + s)
    sel = torch.full((b, h, s), -1, dtype=dtype)
    for i in range(b):
        for j in range(h):
            n = int(torch.randint(0, min(s, nb) + 1, (1,), generator=g)) if i else min(s, nb)
            ids = torch.randperm(nb, generator=g)[:n].sort().values if i != 1 else torch.arange(min(n, nb))
            sel[i, j, :n] = ids.to(dtype)
    sel[-1, 0] = -1  # a head with nothing selected
    got = union_kv_heads_fixed(sel, nb)
    ref = union_kv_heads(sel, nb)
    width = max(1, min(h * s, nb))
    assert got.dtype == dtype and tuple(got.shape) == (b, h, width) and got.is_contiguous()
    k = ref.shape[-1]
    assert torch.equal(got[..., :k], ref) and bool((got[..., k:] == -1).all())
    for i in range(b):  # and against sets, independently of union_kv_heads
        want = sorted(set().union(*_rows(sel[i])))
        assert all(r[r >= 0].tolist() == want for r in got[i])


@pytest.mark.parametrize("algo", ["esa", "gsa", "kvstar"])
def test_union_through_the_engine(algo):
    """Tiny Llama (2 KV heads), per-head selection, ratio 0.25, one prompt of 200 tokens: at the first decode
    step (its selection comes from the prefill's queries, the same in both runs) ``union`` gives every KV head
    of a layer the union of the rows ``own`` gives, and loads no other block."""
    from tests.runtime.conftest import tiny_llama
    from ucm_trt.runtime import Engine, RuntimeConfig, SamplingParams, TorchBackend
    from ucm_trt.runtime.algorithms import sparse_config_for

    sparse = sparse_config_for(algo, SparseConfig(block_size=16, budget=Budget.ratio(0.25), selection="per_head"))
    prompt = torch.randint(0, 256, (200,), generator=torch.Generator().manual_seed(11)).tolist()
    model = tiny_llama()
    first: dict[str, list[torch.Tensor]] = {}
    for mode in ("own", "union"):
        policy = make_policy(algo, head_merge=HeadMerge(mode=mode), dense_layers=DenseLayers())
        plan = policy.plan

        def record(reqs, plan=plan, mode=mode):
            out = plan(reqs)
            first.setdefault(mode, [per_row[0] for per_row in out])
            return out

        policy.plan = record
        with Engine(TorchBackend(model, attention="reference"), policy, sparse=sparse,
                    config=RuntimeConfig(max_batch=1, max_seq_len=512, prefill_chunk=64, cache_blocks=0)) as eng:
            res = eng.generate([prompt], SamplingParams(max_new_tokens=3))[0]
            assert len(res.token_ids) == 3
            frac = eng.stats()["policy"]["selected_block_fraction"]
            assert 0 < frac <= 1
    differs = False
    for own, union in zip(first["own"], first["union"], strict=True):
        rows_own, rows_union = _rows(own), _rows(union)
        want = set().union(*rows_own)
        assert all(r == want for r in rows_union), (rows_own, rows_union)
        differs |= any(r != want for r in rows_own)
    assert differs, "the heads selected the same blocks in every layer: the test shows nothing"


def test_gsa_on_device_union_through_the_engine():
    """GSA On-Device (PyTorch path, tiny Llama with 2 KV heads, per-head selection): at the first decode
    step (same prompt, same prefill, so the same per-head selections) ``union`` gives every KV head of a
    layer the union of the rows ``own`` gives that layer; the heads of ``own`` differ somewhere."""
    from tests.runtime.conftest import tiny_llama
    from ucm_trt.config import GSAOnDeviceConfig
    from ucm_trt.runtime import Engine, RuntimeConfig, SamplingParams, TorchBackend
    from ucm_trt.runtime.algorithms import sparse_config_for

    sparse = sparse_config_for("gsa-on-device", SparseConfig(block_size=16, selection="per_head"))
    prompt = torch.randint(0, 256, (200,), generator=torch.Generator().manual_seed(11)).tolist()
    model = tiny_llama()
    first: dict[str, dict[int, torch.Tensor]] = {}
    for mode in ("own", "union"):
        policy = make_policy("gsa-on-device", head_merge=HeadMerge(mode=mode), dense_layers=DenseLayers(),
                             gsa_on_device=GSAOnDeviceConfig(top_k_tokens=64, seq_len_threshold=0))
        select = policy.layer_selection

        def record(layer, q, step, select=select, mode=mode):
            sel = select(layer, q, step)
            if sel is not None:
                first.setdefault(mode, {}).setdefault(layer, sel[0].clone())
            return sel

        policy.layer_selection = record
        with Engine(TorchBackend(model, attention="reference"), policy, sparse=sparse,
                    config=RuntimeConfig(max_batch=1, max_seq_len=512, prefill_chunk=64)) as eng:
            res = eng.generate([prompt], SamplingParams(max_new_tokens=3))[0]
            assert len(res.token_ids) == 3
    assert set(first["own"]) == set(first["union"]) and first["own"]
    differs = False
    for layer, own in first["own"].items():
        rows_own, rows_union = _rows(own), _rows(first["union"][layer])
        want = set().union(*rows_own)
        assert all(r == want for r in rows_union), (layer, rows_own, rows_union)
        differs |= any(r != want for r in rows_own)
    assert differs, "the heads selected the same blocks in every layer: the test shows nothing"
