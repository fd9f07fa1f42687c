"""Selection turnover: how many selected blocks change between consecutive retrievals, and a
query model that reproduces a chosen turnover on a random-weight model.

Definitions (the same everywhere in ucm-trt: runtime stats, the SmolLM2 measurement, benchmarks):

* **Turnover of one retrieval** for one row (a layer, or a layer and KV head): the fraction of the
  blocks it selects that the previous retrieval of the same row did not select,
  ``|new \\ old| / |new|``. These are the blocks an offload runtime must load (before its LRU
  cache). :func:`selection_turnover` computes it for selections in the runtime's format
  (int32 ``[..., S]``, sorted, -1 padded).
* **Top-k turnover**: the same restricted to the budget's candidates (the sink and local windows,
  always selected, left out): ``|new_k \\ old_k| / |new_k|``. Random queries give about
  ``1 - budget ratio`` here, whatever the model.

Why a query model. A random-weight model's queries are unrelated from one decode step to the next,
so every retrieval replaces most of its top-k blocks (about ``1 - ratio``), which no trained model
does (SmolLM2: ``benchmarks/results/runtime/turnover_smollm2_*.json``). :class:`QueryDrift`
replaces the retrieval queries of an offload policy (an explicit option,
``RetrievalConfig(query_drift=QueryDrift(...))``; the model's own forward is untouched) by a
first-order autoregressive drift that starts at the model's real query (offload policies: the
query of the request's prefill retrieval, decode step 0)::

    u_s0 = q_s0 / |q_s0|                                   per layer and query head
    u_s  = a * u_(s-1) + sqrt(1 - a^2) * n_s,  n_s ~ N(0, I_D / D)      each decode step s
    q_s  = |q_s0| * u_s / |u_s|

``a = persistence`` in [0, 1]: 1 freezes the query (turnover 0), 0 draws an independent random
query every step (the random-model worst case). Over ``dt`` steps the drift composes exactly to
``a**dt``, so a policy that reads the query only on its retrieval steps (every ``R`` steps) sees
``a**R`` between retrievals. :func:`calibrate_persistence` finds the ``a`` that gives a target
top-k turnover on given block representations with the runtime's own scoring and selection;
``QueryDrift(target_turnover=t)`` has the policy do that once, on its first drifting request
(its prompt's representations, its query, the policy's budget and stride), and use the ``a`` found
for every request (ESA and GSA; the policy's ``stats()`` report ``a`` and the turnover reached).
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass

import torch

from ucm_trt._validation import FLOAT_DTYPES, check_positive_int, check_tensor
from ucm_trt.config import SparseConfig
from ucm_trt.sparse.batched import select_batched
from ucm_trt.sparse.score import group_mean_query

__all__ = [
    "DriftingQuery",
    "QueryDrift",
    "calibrate_persistence",
    "selection_turnover",
    "topk_part",
    "turnover_counts",
]


def _member_mask(sel: torch.Tensor, width: int) -> torch.Tensor:
    """int ``[..., S]`` ids (-1 padded) -> bool ``[..., width]`` membership."""
    mask = torch.zeros(*sel.shape[:-1], width + 1, dtype=torch.bool, device=sel.device)
    idx = torch.where(sel >= 0, sel.long(), torch.full_like(sel, width, dtype=torch.long))
    mask.scatter_(-1, idx, True)
    return mask[..., :width]


def selection_turnover(old: torch.Tensor, new: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Blocks of ``new`` not in ``old``, and blocks in ``new``, per row.

    ``old``, ``new``: int ``[..., S_old]`` / ``[..., S_new]`` selections (block ids, -1 padding,
    any order) with the same leading shape. Returns int64 ``(changed, selected)`` of that leading
    shape; the turnover of a row is ``changed / selected`` (undefined where ``selected`` is 0).
    """
    o = check_tensor("old", old, dtypes=(torch.int16, torch.int32, torch.int64))
    n = check_tensor("new", new, dtypes=(torch.int16, torch.int32, torch.int64))
    if o.dim() < 1 or n.dim() < 1 or o.shape[:-1] != n.shape[:-1]:
        raise ValueError(
            f"old and new must be [..., S] with the same leading shape, got {tuple(o.shape)} and {tuple(n.shape)}"
        )
    width = 1 + max(int(o.max()) if o.numel() else -1, int(n.max()) if n.numel() else -1, 0)
    mo, mn = _member_mask(o, width), _member_mask(n, width)
    return (mn & ~mo).sum(-1), mn.sum(-1)


def topk_part(sel: torch.Tensor, num_blocks: int, sparse: SparseConfig) -> torch.Tensor:
    """``sel`` with the always-selected blocks of a ``num_blocks``-block prompt (sink ``[0, sink)``,
    local ``[num_blocks - local, num_blocks)``, and every block past the prompt) set to -1."""
    t = check_tensor("sel", sel, dtypes=(torch.int16, torch.int32, torch.int64))
    if not isinstance(sparse, SparseConfig):
        raise TypeError(f"sparse must be a SparseConfig, got {type(sparse).__name__}")
    lo, hi = _topk_range(num_blocks, sparse)
    keep = (t >= lo) & (t < hi)
    return torch.where(keep, t, torch.full_like(t, -1))


def turnover_counts(
    old: torch.Tensor, old_nb: int, new: torch.Tensor, new_nb: int, sparse: SparseConfig
) -> tuple[int, int, int, int]:
    """``(changed, selected, topk_changed, topk_selected)`` summed over all rows: what
    :func:`selection_turnover` of ``(old, new)`` and of their :func:`topk_part` (at ``old_nb`` /
    ``new_nb`` blocks) sum to, in a few vector operations (one ``searchsorted`` per row instead of
    block-wide masks). ``old`` must be in the runtime's selection format: ids ascending, -1 padding
    at the end of each row (``new`` may be in any order)."""
    o = check_tensor("old", old, dtypes=(torch.int16, torch.int32, torch.int64))
    n = check_tensor("new", new, dtypes=(torch.int16, torch.int32, torch.int64))
    if o.dim() < 1 or n.dim() < 1 or o.shape[:-1] != n.shape[:-1]:
        raise ValueError(
            f"old and new must be [..., S] with the same leading shape, got {tuple(o.shape)} and {tuple(n.shape)}"
        )
    rows = math.prod(n.shape[:-1])
    o = o.reshape(rows, o.shape[-1]).to(torch.int32).contiguous()
    n = n.reshape(rows, n.shape[-1]).to(torch.int32).contiguous()
    valid = n >= 0
    if o.shape[-1]:
        o = torch.where(o >= 0, o, torch.full_like(o, torch.iinfo(torch.int32).max))  # still ascending
        idx = torch.searchsorted(o, n).clamp(max=o.shape[-1] - 1)
        found = valid & (o.gather(-1, idx) == n)
    else:
        found = torch.zeros_like(valid)
    lo_o, hi_o = _topk_range(old_nb, sparse)
    lo_n, hi_n = _topk_range(new_nb, sparse)
    in_new = valid & (n >= lo_n) & (n < hi_n)
    in_old = found & (n >= lo_o) & (n < hi_o)
    return int((valid & ~found).sum()), int(valid.sum()), int((in_new & ~in_old).sum()), int(in_new.sum())


def _topk_range(num_blocks: int, sparse: SparseConfig) -> tuple[int, int]:
    lo = min(sparse.sink_blocks, num_blocks)
    return lo, max(lo, num_blocks - sparse.local_blocks)


@dataclass(frozen=True, kw_only=True)
class QueryDrift:
    """Retrieval queries that drift slowly from the model's real query (module docstring).

    Exactly one of ``persistence`` and ``target_turnover`` is given.

    Attributes
    ----------
    persistence:
        ``a`` in [0, 1]: the correlation kept per decode step. 1 = frozen query, 0 = a fresh
        random query every step.
    target_turnover:
        The top-k turnover per retrieval wanted, in [0, 1]; the policy calibrates ``a`` once
        (:func:`calibrate_persistence`, module docstring).
    seed:
        Seeds each request's noise (with the request id), so runs repeat exactly.
    """

    persistence: float | None = None
    target_turnover: float | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if (self.persistence is None) == (self.target_turnover is None):
            raise ValueError(
                "QueryDrift needs exactly one of persistence= and target_turnover=, got "
                f"persistence={self.persistence!r}, target_turnover={self.target_turnover!r}"
            )
        for name in ("persistence", "target_turnover"):
            v = getattr(self, name)
            if v is None:
                continue
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not 0.0 <= v <= 1.0:
                raise ValueError(f"QueryDrift.{name} must be a number in [0, 1], got {v!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"QueryDrift.seed must be an int >= 0, got {self.seed!r}")

    def per_retrieval(self, stride: int) -> float:
        """The correlation between two retrievals ``stride`` decode steps apart: ``a ** stride``."""
        if self.persistence is None:
            raise ValueError("per_retrieval needs QueryDrift.persistence (this one has a target_turnover)")
        return float(self.persistence) ** check_positive_int("stride", stride)

    def start(self, rid: str, step: int, q: torch.Tensor, *, persistence: float | None = None) -> DriftingQuery:
        """A request's drifting query, starting at the model's query ``q [..., D]`` at decode ``step``.
        ``persistence``: the calibrated ``a`` (needed, and only allowed, with ``target_turnover``)."""
        if not isinstance(rid, str):
            raise TypeError(f"rid must be a str, got {type(rid).__name__}")
        if (persistence is None) != (self.target_turnover is None):
            raise ValueError("start(persistence=) must be given exactly when QueryDrift has a target_turnover")
        a = self.persistence if persistence is None else persistence
        if not 0.0 <= float(a) <= 1.0:
            raise ValueError(f"persistence must be in [0, 1], got {a!r}")
        seed = (self.seed * 1_000_003 + zlib.crc32(rid.encode())) % (2**63)
        return DriftingQuery(q, step=step, persistence=float(a), seed=seed)


class DriftingQuery:
    """One request's drifting query state (made by :meth:`QueryDrift.start`)."""

    def __init__(self, q: torch.Tensor, *, step: int, persistence: float, seed: int) -> None:
        q0 = check_tensor("q", q, dtypes=FLOAT_DTYPES).float()
        if q0.dim() < 1 or q0.shape[-1] == 0:
            raise ValueError(f"q must have shape [..., D] with D >= 1, got {tuple(q.shape)}")
        if isinstance(step, bool) or not isinstance(step, int):
            raise TypeError(f"step must be an int, got {step!r}")
        norm = q0.norm(dim=-1, keepdim=True)
        if not bool(torch.isfinite(norm).all()):
            raise ValueError("q must be finite")
        self._norm = norm.cpu()
        # a zero query keeps norm 0 (it scores every block 0); its direction is still drawn
        self._u = (q0 / norm.clamp(min=1e-30)).cpu()
        self._step = step
        self._a = persistence
        self._gen = torch.Generator().manual_seed(seed)

    @property
    def step(self) -> int:
        return self._step

    @property
    def shape(self) -> torch.Size:
        """The query's shape (that of the starting query)."""
        return self._u.shape

    def fill(self, out: torch.Tensor, step: int) -> None:
        """:meth:`at` ``step``, written into ``out`` (a float32 CPU tensor of :attr:`shape`): lets a
        retrieval task draw the drift on its worker thread instead of the caller's."""
        out.copy_(self.at(step))

    def at(self, step: int) -> torch.Tensor:
        """The query at decode ``step`` (not earlier than the last one asked), float32 CPU, the
        shape of the starting query. Advances the state by ``step - last step`` drift steps at once."""
        if isinstance(step, bool) or not isinstance(step, int):
            raise TypeError(f"step must be an int, got {step!r}")
        if step < self._step:
            raise ValueError(f"step must not go back: asked for step {step} after step {self._step}")
        dt = step - self._step
        if dt:
            c = self._a**dt
            d = self._u.shape[-1]
            noise = torch.randn(self._u.shape, generator=self._gen) / math.sqrt(d)
            self._u = c * self._u + math.sqrt(max(0.0, 1.0 - c * c)) * noise
            self._step = step
        unit = self._u / self._u.norm(dim=-1, keepdim=True).clamp(min=1e-30)
        return self._norm * unit


def calibrate_persistence(
    target: float,
    reps: torch.Tensor,
    q0: torch.Tensor,
    sparse: SparseConfig,
    *,
    retrievals: int = 24,
    streams: int = 8,
    seed: int = 0,
    tol: float = 0.005,
) -> tuple[float, float]:
    """The :class:`QueryDrift` persistence whose mean top-k turnover per retrieval is ``target``.

    Simulates the retrievals of an ESA/GSA-style policy (dot scores of the GQA-averaged query with
    mean-K representations, :func:`~ucm_trt.sparse.batched.select_batched` under ``sparse``, one
    retrieval every ``sparse.retrieval_stride`` steps) with ``streams`` independent drifting queries
    started at ``q0`` ``[L, Hq, D]`` over ``reps`` ``[L, Hkv, D, nb]`` (a
    :meth:`~ucm_trt.sparse.batched.BlockRepStore.reps` view, e.g. of a random-weight model's
    prompt), and bisects ``a`` (turnover falls as ``a`` rises; every ``a`` sees the same noise).
    Returns ``(a, turnover at a)``; the turnover is changed / selected top-k blocks summed over
    layers, KV-head rows, streams and ``retrievals`` consecutive retrievals. One run's turnover
    scatters around it (fewer selected blocks, more scatter: a 2-layer model with 7 chosen blocks
    per layer gave 0.13-0.24 over 15 retrievals at the ``a`` of 0.19); ``streams`` x ``retrievals``
    sets the calibration's own precision. ``tol``: stop when within this of ``target``.
    """
    if isinstance(target, bool) or not isinstance(target, (int, float)) or not 0.0 <= target <= 1.0:
        raise ValueError(f"target must be a turnover in [0, 1], got {target!r}")
    r = check_tensor("reps", reps, ndim=4, dtypes=FLOAT_DTYPES)
    q = check_tensor("q0", q0, ndim=3, dtypes=FLOAT_DTYPES)
    check_positive_int("retrievals", retrievals)
    check_positive_int("streams", streams)
    if not isinstance(sparse, SparseConfig):
        raise TypeError(f"sparse must be a SparseConfig, got {type(sparse).__name__}")
    L, hkv, d, nb = r.shape
    if q.shape[0] != L or q.shape[2] != d:
        raise ValueError(f"q0 must have shape [L={L}, Hq, D={d}] to match reps {tuple(r.shape)}, got {tuple(q.shape)}")
    stride = sparse.retrieval_stride
    rf = r.float()

    def select(qs: torch.Tensor) -> torch.Tensor:
        """``qs [K, L, Hq, D]`` -> top-k parts ``[K * L, Hkv, S]``: one matmul reads the reps once for all K."""
        qg = group_mean_query(qs.to(rf.device), hkv).permute(1, 2, 0, 3)  # [L, Hkv, K, D]
        scores = torch.matmul(qg, rf).permute(2, 0, 1, 3).reshape(-1, hkv, nb)  # [K * L, Hkv, nb]
        return topk_part(select_batched(scores, nb, sparse, "dot", hkv).cpu(), nb, sparse)

    def turnover(a: float) -> float:
        drift = QueryDrift(persistence=a, seed=seed)
        dqs = [drift.start(f"calibration-{k}", 0, q) for k in range(streams)]
        prev, changed, selected = None, 0, 0
        for i in range(retrievals + 1):
            sel = select(torch.stack([dq.at(i * stride) for dq in dqs]))
            if prev is not None:
                c, n = selection_turnover(prev, sel)
                changed, selected = changed + int(c.sum()), selected + int(n.sum())
            prev = sel
        return changed / selected if selected else 0.0

    lo, hi = 0.0, 1.0
    t_lo, t_hi = turnover(lo), turnover(hi)
    if target >= t_lo:
        return lo, t_lo
    if target <= t_hi:
        return hi, t_hi
    a, t = hi, t_hi
    for _ in range(30):
        a = 0.5 * (lo + hi)
        t = turnover(a)
        if abs(t - target) <= tol:
            break
        if t > target:
            lo = a
        else:
            hi = a
    return a, t
