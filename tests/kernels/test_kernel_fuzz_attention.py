"""Hypothesis fuzz over the paged attention kernel's inputs (issue 17 items 3 and 5).

Block tables with ids outside the pool, lengths past the table or below the chunk, selection ids
out of range, unsorted or repeated, odd head dims and group sizes. The pool handed to the kernel is
a view inside a NaN-filled buffer, so any read outside it shows up as NaN. For every draw:

* with ``validate=False`` and a guard the launch never crashes and never reads outside the pool
  (no NaN in the output); a selection id < -1 or >= the table width always sets the guard flag;
* with ``validate=True`` the launcher either refuses with a one-line error naming the argument, or
  the input is valid: then the unvalidated launch leaves the guard flag clear and matches
  :func:`ucm_trt.reference.paged_sparse_attention`.
"""

from __future__ import annotations

import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from ucm_trt import reference as R
from ucm_trt.kernels import AttentionLaunch, paged_sparse_attention
from ucm_trt.kernels.attention import ATTENTION_GUARD_CODES, GUARD_BAD_SELECTION
from ucm_trt.kernels.guard import IndexGuard
from ucm_trt.testing.tolerances import tolerances_for

from .conftest import DEVICE

ARGS = ("q", "kv_pool", "block_table", "seq_lens", "selection")


@settings(max_examples=30, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])  # fmt: skip
@given(data=st.data())
def test_fuzz_paged_attention(data):
    bs = data.draw(st.sampled_from([16, 32]), label="bs")
    hkv = data.draw(st.integers(1, 2), label="hkv")
    group = data.draw(st.integers(1, 3), label="group")
    d = data.draw(st.sampled_from([16, 32, 48, 24]), label="d")  # 24 is refused (not a multiple of 16)
    b = data.draw(st.integers(1, 3), label="batch")
    mb = data.draw(st.integers(1, 4), label="max_blocks")
    nphys = data.draw(st.integers(1, 8), label="num_blocks")
    tq = data.draw(st.integers(1, 3), label="tq")
    valid = data.draw(st.booleans(), label="start from a valid input")
    if valid:  # lengths the table holds, entries in the pool, sorted selections of each sequence's blocks
        seq = data.draw(st.lists(st.integers(tq, mb * bs), min_size=b, max_size=b), label="seq_lens")
        table = data.draw(st.lists(st.lists(st.integers(0, nphys - 1), min_size=mb, max_size=mb), min_size=b,
                                   max_size=b), label="block_table")  # fmt: skip
    else:
        seq = data.draw(st.lists(st.integers(-2, mb * bs + 20), min_size=b, max_size=b), label="seq_lens")
        table = data.draw(st.lists(st.lists(st.integers(-3, nphys + 2), min_size=mb, max_size=mb), min_size=b,
                                   max_size=b), label="block_table")  # fmt: skip
    width = data.draw(st.integers(0, mb + 1), label="selection width (0 = None)")
    sel = None
    if width:
        rows = []
        for i in range(b * hkv):
            if valid:
                nb = -(-seq[i // hkv] // bs)
                ids = sorted(data.draw(st.sets(st.integers(0, nb - 1), max_size=min(width, nb)), label="ids"))
                rows.append(ids + [-1] * (width - len(ids)))
            else:
                rows.append(data.draw(st.lists(st.integers(-3, mb + 2), min_size=width, max_size=width), label="ids"))
        sel = torch.tensor(rows, dtype=torch.int32).view(b, hkv, width).to(DEVICE)
    splits = data.draw(st.sampled_from([None, 1, 3]), label="num_splits")

    gen = torch.Generator().manual_seed(0)
    pad = torch.full((2, 2, hkv, bs, d), float("nan"))
    inner = torch.randn((nphys, 2, hkv, bs, d), generator=gen)
    pool = torch.cat([pad, inner, pad]).to(DEVICE)[2 : 2 + nphys]  # memory just outside is NaN
    q = torch.randn((b, hkv * group, tq, d), generator=gen).to(DEVICE)
    bt = torch.tensor(table, dtype=torch.int32).to(DEVICE)
    sl = torch.tensor(seq, dtype=torch.int32).to(DEVICE)
    launch = AttentionLaunch(num_splits=splits)

    try:
        ref_ok = True
        paged_sparse_attention(q, pool, bt, sl, sel, launch=launch)  # validate=True
    except (ValueError, TypeError) as err:
        ref_ok = False
        msg = str(err)
        event(f"refused: {msg.split(' ')[0]}")
        assert "\n" not in msg, f"refusal must be one line: {msg!r}"
        assert any(n in msg for n in ARGS + ("head_dim",)), f"refusal must name the argument: {msg!r}"
        if d % 16:
            return  # a shape refusal: nothing to launch unvalidated either
    guard = IndexGuard(DEVICE, ATTENTION_GUARD_CODES)
    out = paged_sparse_attention(q, pool, bt, sl, sel, validate=False, guard=guard, launch=launch)
    assert not torch.isnan(out).any(), "read outside the pool (or of a NaN slot)"
    flag = guard.value()
    if sel is not None and bool(((sel < -1) | (sel >= mb)).any()):
        assert flag >= GUARD_BAD_SELECTION, f"out-of-range selection id not flagged (flag {flag})"
    if ref_ok:
        event("valid input")
        assert flag == 0, f"valid input flagged: {ATTENTION_GUARD_CODES.get(flag, flag)}"
        ref = R.paged_sparse_attention(q, pool, bt, sl, sel)
        torch.testing.assert_close(out, ref, **tolerances_for(torch.float32))
