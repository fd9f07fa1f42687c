"""Retrieval cost per sequence as the batch grows (issue 13 item 4).

One retrieval round = the offload policies' real retrieval task (ESA / GSA's
``_select_all``: :func:`~ucm_trt.sparse.batched.batched_dot_scores` then
:func:`~ucm_trt.sparse.batched.select_batched` over one request's ``[L, Hkv, D, nb]``
:class:`~ucm_trt.sparse.batched.BlockRepStore`) for each of ``B`` requests, submitted to the
runtime's :class:`~ucm_trt.runtime.worker.RetrievalWorker` (its threads split the requests) and
collected, as the policies do on a retrieval step. Paths:

* ``host`` float32 (the default runtime path) and ``host`` bfloat16 / float16 storage (half the
  bytes; scored in float32 after an upcast inside the matmul call);
* ``device``: representations on the GPU (``RetrievalConfig(representations="device")``), scoring
  and top-k there on a side stream (:func:`~ucm_trt.sparse.policies._offload.device_task`), only
  the selected ids copied back.
* ``host-pooled`` / ``device-pooled`` (not a runtime path yet: what it would gain): the B requests'
  representations held in ONE store ``[B*L, Hkv, D, nb]`` (equal lengths), retrieved by one task,
  one matmul and one selection for the whole batch instead of one task per request.

Reported per row: the round's wall time (median of ``repeats`` after ``warmup``), ms per sequence
per retrieval (round / B), and per decode step at retrieval stride R (/ R: a retrieval runs every
R steps). Every run also checks the paths' selections against the float32 host path on the same
data (``differing_layers``: layers whose selection differs; 0 expected for float32 on any device
except where two scores are within float32 rounding at the budget's edge).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch

from ucm_trt.config import Budget, SparseConfig
from ucm_trt.runtime.worker import RetrievalWorker
from ucm_trt.sparse.batched import BlockRepStore, batched_dot_scores, select_batched
from ucm_trt.sparse.policies._offload import device_task

__all__ = ["ScalingShape", "bench_batch_scaling", "retrieval_task"]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True, kw_only=True)
class ScalingShape:
    """Model shape of the retrieval (default: the 8B-class shape of issue 13, DESIGN §5's target)."""

    num_layers: int = 32
    num_q_heads: int = 32
    num_kv_heads: int = 8
    head_dim: int = 128


def retrieval_task(reps: torch.Tensor, q: torch.Tensor, nb: int, sparse: SparseConfig, hkv: int) -> torch.Tensor:
    """ESA's all-layer retrieval (``ESAPolicy._select_all``): ``[L, Hkv, S]`` on the reps' device."""
    return select_batched(batched_dot_scores(q.to(reps.device), reps), nb, sparse, "dot", hkv)


def _random_requests(shape: ScalingShape, nb: int, count: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``count`` requests' (representations ``[L, nb, Hkv, D]``, query ``[L, Hq, D]``), float32."""
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(shape.num_layers, nb, shape.num_kv_heads, shape.head_dim, generator=g),
             torch.randn(shape.num_layers, shape.num_q_heads, shape.head_dim, generator=g)) for _ in range(count)]


def _stores(shape: ScalingShape, data, device: str, dtype: torch.dtype) -> list[BlockRepStore]:
    out = []
    for reps, _ in data:
        st = BlockRepStore(num_layers=shape.num_layers, num_kv_heads=shape.num_kv_heads, head_dim=shape.head_dim,
                           capacity=reps.shape[1], device=device, dtype=dtype)
        st.append(reps)
        out.append(st)
    return out


def _same_selection(x: torch.Tensor, y: torch.Tensor) -> bool:
    """Equal ``[Hkv, S]`` selections up to trailing -1 padding (a pooled batch pads to its widest row)."""
    w = max(x.shape[-1], y.shape[-1])
    pad = lambda t: torch.nn.functional.pad(t, (0, w - t.shape[-1]), value=-1)  # noqa: E731
    return torch.equal(pad(x), pad(y))


def _round(worker: RetrievalWorker, tasks) -> list[torch.Tensor]:
    tickets = [worker.submit(t, what=f"bench request {i}") for i, t in enumerate(tasks)]
    return [t.result() for t in tickets]


def bench_batch_scaling(
    *,
    shape: ScalingShape,
    num_blocks: int,
    batches: list[int],
    worker_threads: list[int],
    intra_op_threads: list[int],
    paths: list[tuple[str, str]],
    ratio: float = 0.125,
    strides: tuple[int, ...] = (1, 4, 8),
    warmup: int = 1,
    repeats: int = 5,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Rows of (path, dtype, batch, worker threads, intra-op threads): round ms, ms per sequence
    per retrieval and per decode step at each stride (module docstring). ``paths``: pairs
    ``(where, dtype)``, where ``"host"``, ``"device"`` (CUDA), ``"host-pooled"`` or
    ``"device-pooled"``, and dtype a ``_DTYPES`` name."""
    sparse = SparseConfig(block_size=128, budget=Budget.ratio(ratio), sink_blocks=1, local_blocks=2)
    rows = []
    before = torch.get_num_threads()
    data = _random_requests(shape, num_blocks, max(batches), seed)  # the first B are batch B's requests
    try:
        for batch in batches:
            ref = None
            for where, dname in paths:
                if where not in ("host", "device", "host-pooled", "device-pooled"):
                    raise ValueError(f"paths: where must be host, device, host-pooled or device-pooled, got {where!r}")
                device = "cuda" if where.startswith("device") else "cpu"
                pooled = where.endswith("-pooled")
                queries = [q for _, q in data[:batch]]
                stream = torch.cuda.Stream() if device == "cuda" else None
                if pooled:
                    joined = [(torch.cat([r for r, _ in data[:batch]]), torch.cat(queries))]
                    stores = _stores(ScalingShape(num_layers=batch * shape.num_layers, num_q_heads=shape.num_q_heads,
                                                  num_kv_heads=shape.num_kv_heads, head_dim=shape.head_dim),
                                     joined, device, _DTYPES[dname])
                    queries = [joined[0][1]]
                    del joined
                else:
                    stores = _stores(shape, data[:batch], device, _DTYPES[dname])
                per_seq_bytes = stores[0].nbytes // (batch if pooled else 1)

                def tasks(stores=stores, queries=queries, stream=stream):
                    fns = [partial(retrieval_task, st.reps(), q, num_blocks, sparse, shape.num_kv_heads)
                           for st, q in zip(stores, queries, strict=True)]
                    return [device_task(f, stream) for f in fns] if stream is not None else fns

                combos = [(t, i) for t in worker_threads for i in intra_op_threads]
                if device == "cuda":
                    combos = [(t, 1) for t in worker_threads]  # the CPU threads only wait
                if pooled:  # one task: worker threads do not matter
                    combos = [(1, i) for i in ([1] if device == "cuda" else intra_op_threads)]
                for wt, it in combos:
                    torch.set_num_threads(it)
                    worker = RetrievalWorker(wt)
                    try:
                        for _ in range(warmup):
                            sels = _round(worker, tasks())
                        times = []
                        for _ in range(repeats):
                            t0 = time.perf_counter()
                            sels = _round(worker, tasks())
                            times.append(time.perf_counter() - t0)
                    finally:
                        worker.shutdown()
                    if pooled:
                        sels = list(sels[0].split(shape.num_layers))
                    if ref is None:
                        ref = sels  # the first path (host float32 by convention) is the reference
                    differing = sum(int(not _same_selection(a[layer], b[layer]))
                                    for a, b in zip(ref, sels, strict=True) for layer in range(shape.num_layers))
                    round_ms = 1e3 * statistics.median(times)
                    per_seq = round_ms / batch
                    rows.append({
                        "path": where, "rep_dtype": dname, "batch": batch, "worker_threads": wt,
                        "intra_op_threads": it, "num_blocks": num_blocks, "round_ms": round(round_ms, 3),
                        "round_ms_min_max": [round(1e3 * min(times), 3), round(1e3 * max(times), 3)],
                        "ms_per_seq_per_retrieval": round(per_seq, 3),
                        **{f"ms_per_seq_per_step_R{r}": round(per_seq / r, 3) for r in strides},
                        "rep_bytes_per_seq": per_seq_bytes,
                        "effective_gb_per_s": round(per_seq_bytes * batch / (round_ms * 1e-3) / 1e9, 2),
                        "differing_layers_vs_first_path": differing,
                    })
                del stores, queries
                if device == "cuda":
                    torch.cuda.empty_cache()
    finally:
        torch.set_num_threads(before)
    return rows
