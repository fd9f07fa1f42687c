"""All-layer CPU retrieval in a few batched torch calls (the offload policies' retrieval path).

The per-layer functions (:func:`ucm_trt.sparse.score.dot_scores` then
:func:`ucm_trt.sparse.policies.base.select_from_scores`, once per layer) are the reference; this
module computes the same selections for every layer of a request at once:

- :class:`BlockRepStore`   one request's block representations of ALL layers in one host tensor
  ``[L, Hkv, D, capacity]`` float32, appended to incrementally. The block axis is innermost so
  scoring every layer and KV head is one batched ``[1, D] x [D, nb]`` matmul that streams the
  representations once (the ``[.., nb, Hkv, D]`` layout of the per-layer path makes the same
  product several times slower on CPU).
- :func:`batched_dot_scores`  GQA-averaged queries ``[L, Hq, D]`` . representations -> ``[L, Hkv, nb]``.
- :func:`select_batched`      the selection of :func:`~ucm_trt.sparse.policies.base.select_from_scores`
  (forced sink / local windows, ``min_blocks``, every budget kind, shared or per-head selection,
  GSA's ``extra`` candidates, lower block id wins ties) for a batch of score rows in one pass:
  one ``topk`` finds each row's k-th best candidate score and ties at that score are resolved by
  a cumulative count, instead of a full stable sort per row.
- :func:`extend_selections`   append decode-generated blocks to a ``[L, Hkv, S]`` selection with
  tensor ops (the per-step ``plan`` of the offload policies).

Equivalence. Given the same scores, :func:`select_batched` returns exactly the per-layer
selections (ids, order, -1 padding; the width is the largest over the batch instead of per
layer, the extra columns are -1). The scores themselves are float32 dot products of the same
numbers: exact whenever the products and sums are exact (the tests use integer-valued data to
check the whole path bit for bit); on general data the matmul may sum the 128 products in a
different order than ``dot_scores``' ``vecdot``, so a score can differ in its last bits and a
selection can differ only where two blocks' scores are that close at the budget's edge.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ucm_trt._validation import (
    FLOAT_DTYPES,
    INT_DTYPES,
    check_non_negative_int,
    check_positive_int,
    check_tensor,
)
from ucm_trt.config import SCORINGS, SparseConfig
from ucm_trt.sparse.score import group_mean_query, reduce_scores
from ucm_trt.sparse.select import budget_counts

__all__ = ["BlockRepStore", "batched_dot_scores", "select_batched", "extend_selections"]


class BlockRepStore:
    """Block representations of every layer of one request: ``[L, Hkv, D, capacity]`` (float32 on
    the CPU by default; ``device`` / ``dtype`` place it elsewhere, e.g. on the GPU in half precision).

    Append-only: :meth:`append` writes blocks ``num_blocks ..`` and never changes a block already
    stored; when the capacity is exceeded it moves to a new, larger tensor (capacity grows by an
    eighth, at least 16 blocks: a GPU-resident store of a 128K-token request would transiently
    hold twice its bytes if it doubled, and decode appends only one block every block_size steps).
    A view from :meth:`reps` therefore stays valid and unchanged while later blocks are appended,
    which is what lets a retrieval task read it on a worker thread without a copy.
    """

    def __init__(
        self,
        *,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        capacity: int = 16,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        self.num_layers = check_positive_int("num_layers", num_layers)
        self.num_kv_heads = check_positive_int("num_kv_heads", num_kv_heads)
        self.head_dim = check_positive_int("head_dim", head_dim)
        cap = check_positive_int("capacity", capacity)
        if dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(f"dtype must be torch.float32, torch.float16 or torch.bfloat16, got {dtype!r}")
        self._buf = torch.empty(num_layers, num_kv_heads, head_dim, cap, dtype=dtype, device=device)
        self._n = 0

    @property
    def device(self) -> torch.device:
        return self._buf.device

    @property
    def dtype(self) -> torch.dtype:
        return self._buf.dtype

    @property
    def num_blocks(self) -> int:
        return self._n

    @property
    def capacity(self) -> int:
        return self._buf.shape[-1]

    @property
    def nbytes(self) -> int:
        """Bytes of the filled blocks (what one scoring pass reads)."""
        return self._n * self.num_layers * self.num_kv_heads * self.head_dim * self._buf.element_size()

    def append(self, reps: torch.Tensor) -> None:
        """Store ``reps`` ``[L, n, Hkv, D]`` (any float dtype, any device) as blocks ``num_blocks .. + n``."""
        L, h, d = self.num_layers, self.num_kv_heads, self.head_dim
        r = check_tensor("reps", reps, ndim=4, dtypes=FLOAT_DTYPES)
        if r.shape[0] != L or r.shape[2] != h or r.shape[3] != d:
            raise ValueError(f"reps must have shape [L={L}, n, Hkv={h}, D={d}], got {tuple(reps.shape)}")
        n = r.shape[1]
        if n == 0:
            return
        need = self._n + n
        if need > self.capacity:
            cap = max(need, self.capacity + max(16, self.capacity // 8))
            new = torch.empty(L, h, d, cap, dtype=self._buf.dtype, device=self._buf.device)
            new[..., : self._n] = self._buf[..., : self._n]
            self._buf = new
        self._buf[..., self._n : need] = r.permute(0, 2, 3, 1)
        self._n = need

    def reps(self) -> torch.Tensor:
        """``[L, Hkv, D, num_blocks]`` view of the stored blocks (block axis innermost)."""
        return self._buf[..., : self._n]

    def layer(self, layer: int) -> torch.Tensor:
        """Layer ``layer``'s blocks as ``[num_blocks, Hkv, D]`` (the per-layer functions' layout; a view)."""
        check_non_negative_int("layer", layer)
        if layer >= self.num_layers:
            raise ValueError(f"layer must be in [0, {self.num_layers}), got {layer}")
        return self._buf[layer, :, :, : self._n].permute(2, 0, 1)


def batched_dot_scores(q: torch.Tensor, reps: torch.Tensor) -> torch.Tensor:
    """ESA/GSA scores of every layer, float32 ``[L, Hkv, nb]``: ``mean_{h in group} q_h . r[kv, :, n]``.

    ``q [L, Hq, D]`` (one query token per layer), ``reps [L, Hkv, D, nb]`` (a
    :meth:`BlockRepStore.reps` view). Layer ``l`` equals ``dot_scores(q[l][None], r_l)[0]`` with
    ``r_l = reps[l].permute(2, 0, 1)``, up to float32 summation order (module docstring).
    """
    qt = check_tensor("q", q, ndim=3, dtypes=FLOAT_DTYPES)
    r = check_tensor("reps", reps, ndim=4, dtypes=FLOAT_DTYPES)
    L, hkv, d = r.shape[0], r.shape[1], r.shape[2]
    if qt.shape[0] != L or qt.shape[2] != d:
        raise ValueError(
            f"q must have shape [L={L}, Hq, D={d}] to match reps {tuple(reps.shape)}, got {tuple(q.shape)}"
        )
    if qt.device != r.device:
        raise ValueError(f"tensors must be on one device, got q on {qt.device}, reps on {r.device}")
    qg = group_mean_query(qt, hkv)  # [L, Hkv, D]
    if r.dtype == torch.float32:
        return torch.matmul(qg[:, :, None, :], r)[:, :, 0, :]
    # half-precision storage: upcast one layer at a time (a cache-sized float32 copy, not one of the
    # whole store), so the pass reads the half-size store once
    out = torch.empty(L, hkv, r.shape[-1], dtype=torch.float32, device=r.device)
    for layer in range(L):
        out[layer] = torch.matmul(qg[layer, :, None, :], r[layer].float())[:, 0, :]
    return out


def _num_blocks_arg(num_blocks: object, batch: int, max_blocks: int) -> torch.Tensor:
    if isinstance(num_blocks, torch.Tensor):
        nb = check_tensor("num_blocks", num_blocks, ndim=1, dtypes=INT_DTYPES, shape=(batch,)).to(torch.int64).cpu()
    else:
        nb = torch.full((batch,), check_non_negative_int("num_blocks", num_blocks), dtype=torch.int64)
    if nb.numel():
        lo, hi = int(nb.min()), int(nb.max())
        if lo < 0 or hi > max_blocks:
            raise ValueError(
                f"num_blocks must be in [0, {max_blocks}] (max_blocks = scores.shape[-1]), got {nb.tolist()}"
            )
    return nb


def _topk_mask(
    keyed: torch.Tensor, cand: torch.Tensor, counts: torch.Tensor, *, kth: torch.Tensor | None = None
) -> torch.Tensor:
    """Bool mask of the ``counts`` best candidates per row, lower id first on equal scores.

    Same set as ranking by a stable descending sort and keeping ranks ``< counts``: every
    candidate scoring above the row's ``counts``-th best score, plus the lowest-id candidates
    scoring exactly that much until the count is reached.
    """
    if kth is None:
        kmax = int(counts.max()) if counts.numel() else 0
        if kmax == 0:
            return torch.zeros_like(cand)
        top = torch.topk(keyed, kmax, dim=-1, largest=True, sorted=True).values
        kth = top.gather(-1, (counts - 1).clamp(min=0)[..., None])
    above = cand & (keyed > kth)
    tied = cand & (keyed == kth)
    need = counts - above.sum(-1)
    return above | (tied & (tied.cumsum(-1) <= need[..., None]))


def _mask_to_selection(mask: torch.Tensor) -> torch.Tensor:
    """Bool ``[B, H, M]`` -> int32 ``[B, H, S]`` ids ascending, -1 padded, ``S = max(1, most selected)``."""
    b, h, m = mask.shape
    counts = mask.sum(-1)
    width = max(1, int(counts.max()) if counts.numel() else 0)
    pos = torch.where(mask, mask.cumsum(-1) - 1, width)
    out = torch.full((b, h, width + 1), -1, dtype=torch.int32, device=mask.device)
    out.scatter_(-1, pos, torch.arange(m, dtype=torch.int32, device=mask.device).expand(b, h, m))
    return out[..., :width]


def select_batched(
    scores: torch.Tensor,
    num_blocks: int | torch.Tensor,
    sparse: SparseConfig,
    scoring: str,
    num_kv_heads: int,
    *,
    extra: int = 0,
) -> torch.Tensor:
    """Per-KV-head scores ``[B, Hkv, nb]`` (a row per layer) -> int32 selections ``[B, num_kv_heads, S]``.

    Row ``b`` equals ``select_from_scores(scores[b], num_blocks[b], sparse, scoring, num_kv_heads,
    extra=extra)`` (:mod:`ucm_trt.sparse.policies.base`) padded with -1 to the common width ``S``
    (the largest row count, at least 1). ``num_blocks``: an int for every row or int ``[B]``.
    The scores may live on any device (the GPU-resident-representation path selects on the GPU);
    the selection comes back on the scores' device.
    Shared selection reduces the scores over KV heads with :func:`~ucm_trt.sparse.score.reduce_scores`
    and repeats the one selection on ``num_kv_heads`` rows; per-head selection needs
    ``scores.shape[1] == num_kv_heads``. Scores of candidate blocks must be finite.
    """
    if not isinstance(sparse, SparseConfig):
        raise TypeError(f"sparse must be a SparseConfig, got {type(sparse).__name__}")
    if scoring not in SCORINGS:
        raise ValueError(f"scoring must be one of {', '.join(SCORINGS)}; got {scoring!r}")
    s = check_tensor("scores", scores, ndim=3, dtypes=FLOAT_DTYPES)
    heads = check_positive_int("num_kv_heads", num_kv_heads)
    check_non_negative_int("extra", extra)
    b, h, m = s.shape
    shared = sparse.selection == "shared"
    if not shared and h != heads:
        raise ValueError(f"num_kv_heads = {heads} must equal scores.shape[1] = {h} for per-head selection")
    nb = _num_blocks_arg(num_blocks, b, m)
    s = reduce_scores(s, scoring) if shared else s.float()  # [B, H', M]
    if b and bool((nb == nb[0]).all()):
        sel = _select_uniform(s, int(nb[0]), sparse, extra)
    else:
        sel = _select_general(s, nb, sparse, extra)
    if sel.shape[1] != heads:
        sel = sel.expand(b, heads, sel.shape[-1]).contiguous()
    return sel


def _bad_score(s: torch.Tensor, bad: torch.Tensor, offset: int = 0) -> ValueError:
    i, j, k = (int(x) for x in bad.nonzero()[0])
    return ValueError(
        f"scores must be finite for candidate blocks; scores[{i}, {j}, {k + offset}] = {float(s[i, j, k])}"
    )


def _select_general(s: torch.Tensor, nb: torch.Tensor, sparse: SparseConfig, extra: int) -> torch.Tensor:
    """Rows with different ``num_blocks``: masks over the whole block axis."""
    m = s.shape[-1]
    idx = torch.arange(m, device=s.device)
    n = nb[:, None].to(s.device)
    valid = idx < n
    forced = valid & ((idx < sparse.sink_blocks) | (idx >= n - sparse.local_blocks) | (n < sparse.min_blocks))
    cand = (valid & ~forced)[:, None, :].expand_as(s)
    bad = cand & ~torch.isfinite(s)
    if bool(bad.any()):
        raise _bad_score(s, bad)
    counts = budget_counts(sparse.budget, cand, s)
    if extra:
        counts = (counts + extra).minimum(cand.sum(-1))
    keyed = torch.where(cand, s, torch.full_like(s, float("-inf")))
    return _mask_to_selection(forced[:, None, :] | _topk_mask(keyed, cand, counts))


def _select_uniform(s: torch.Tensor, n: int, sparse: SparseConfig, extra: int) -> torch.Tensor:
    """Every row has ``n`` blocks (one request's layers): the candidates are the slice ``[lo, hi)``,
    the forced blocks ``[0, lo)`` and ``[hi, n)``; only the slice is scored and ranked."""
    b, h, _ = s.shape
    if n < sparse.min_blocks:
        lo = hi = n  # runs dense: every block forced
    else:
        lo = min(sparse.sink_blocks, n)
        hi = max(lo, n - sparse.local_blocks)
    c = hi - lo
    sc = s[..., lo:hi]
    if c:
        lo_v, hi_v = torch.aminmax(sc)  # NaN propagates: both finite <=> every candidate is finite
        if not (math.isfinite(float(lo_v)) and math.isfinite(float(hi_v))):
            raise _bad_score(sc, ~torch.isfinite(sc), lo)
    if sparse.budget.kind in ("top_k", "ratio"):  # the same count on every row
        k = int(budget_counts(sparse.budget, torch.ones(1, c, dtype=torch.bool))[0])
        chosen = _chosen_uniform(sc, min(k + extra, c)) if extra else _chosen_uniform(sc, k)
    else:
        counts = budget_counts(sparse.budget, torch.ones(1, 1, c, dtype=torch.bool, device=sc.device).expand_as(sc), sc)
        if extra:
            counts = (counts + extra).clamp(max=c)
        first = int(counts.flatten()[0])  # B >= 1 and H >= 1 here
        if bool((counts == first).all()):
            chosen = _chosen_uniform(sc, first)
        else:
            mask = torch.zeros(b, h, n, dtype=torch.bool, device=s.device)
            mask[..., :lo] = True
            mask[..., hi:] = True
            mask[..., lo:hi] = _topk_mask(sc, torch.ones_like(sc, dtype=torch.bool), counts)
            return _mask_to_selection(mask)
    dev = s.device
    parts = [torch.arange(lo, dtype=torch.int32, device=dev).expand(b, h, lo), chosen + lo,
             torch.arange(hi, n, dtype=torch.int32, device=dev).expand(b, h, n - hi)]
    sel = torch.cat(parts, dim=-1)
    if sel.shape[-1] == 0:
        return torch.full((b, h, 1), -1, dtype=torch.int32, device=dev)
    return sel


def _kth_best(sc: torch.Tensor, k: int, *, use_topk: bool) -> torch.Tensor:
    """``[B, H, 1]``: the ``k``-th best score of every row (``1 <= k < c``).

    ``numpy.partition`` (introselect; about twice as fast as ``torch.topk`` on the CPU) or
    ``torch.topk`` (any device; the GPU-resident path)."""
    if use_topk:
        return torch.topk(sc, k, dim=-1, largest=True, sorted=False).values.amin(-1, keepdim=True)
    c = sc.shape[-1]
    return torch.from_numpy(np.partition(sc.detach().numpy(), c - k, axis=-1)[..., c - k : c - k + 1])


def _chosen_uniform(sc: torch.Tensor, k: int, *, use_topk: bool | None = None) -> torch.Tensor:
    """int32 ``[B, H, k]``: ids (within the slice, ascending) of the ``k`` best of every row.

    The k-th best score of each row comes from :func:`_kth_best` (``use_topk``: ``None`` = numpy
    on the CPU, ``torch.topk`` elsewhere); the candidates scoring at least that much are the
    answer unless one outside the top k ties it, then the lower ids win (:func:`_topk_mask`).
    """
    b, h, c = sc.shape
    dev = sc.device
    if k == 0:
        return torch.zeros(b, h, 0, dtype=torch.int32, device=dev)
    if k == c:
        return torch.arange(c, dtype=torch.int32, device=dev).expand(b, h, c)
    kth = _kth_best(sc, k, use_topk=dev.type != "cpu" if use_topk is None else use_topk)
    mask = sc >= kth
    if not bool((mask.sum(-1) == k).all()):
        counts = torch.full((b, h), k, dtype=torch.int64, device=dev)
        mask = _topk_mask(sc, torch.ones_like(mask), counts, kth=kth)
    return mask.nonzero()[:, -1].to(torch.int32).view(b, h, k)


def extend_selections(sel: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """Append blocks ``start .. stop-1`` to every row of ``sel`` ``[..., S]`` (int32, sorted, -1 padded,
    every id ``< start``) -> int32 ``[..., S']`` sorted, -1 padded, ``S' = max(1, longest row)``.

    Row for row the same as :func:`~ucm_trt.sparse.policies.base.extend_selection`, for all layers
    at once; the width is the largest over all rows.
    """
    t = check_tensor("sel", sel, dtypes=(torch.int32,))
    if t.dim() < 1:
        raise ValueError(f"sel must have at least 1 dimension [..., S], got shape {tuple(sel.shape)}")
    check_non_negative_int("start", start)
    check_non_negative_int("stop", stop)
    if stop < start:
        raise ValueError(f"stop must be >= start, got start={start}, stop={stop}")
    if t.numel() and (int(t.min()) < -1 or int(t.max()) >= start):
        raise ValueError(
            f"sel entries must be -1 (padding) or block ids < start = {start} (the appended blocks), "
            f"got values in [{int(t.min())}, {int(t.max())}]"
        )
    valid = t >= 0
    counts = valid.sum(-1)
    add = stop - start
    most = int(counts.max()) if counts.numel() else 0
    width = max(1, most + add)
    out = torch.full((*t.shape[:-1], width), -1, dtype=torch.int32)
    keep = min(width, t.shape[-1])
    # valid ids sit at the front of each row (sorted, -1 padded): copying the prefix keeps them
    out[..., :keep] = t[..., :keep]
    if add:
        pos = counts[..., None] + torch.arange(add)
        out.scatter_(-1, pos, torch.arange(start, stop, dtype=torch.int32).expand(*t.shape[:-1], add))
    return out
