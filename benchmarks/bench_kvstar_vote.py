"""KVStar's CPU vote at the 8B / 128K geometry vs ESA's retrieval at the same geometry (issue 13).

What runs (CPU only, random data, no model): one request's retrieval task as the retrieval worker runs
it, built from the library's own objects:

* KVStar: 2047 prompt blocks of 64 tokens, 8 KV heads, 32 query heads, head_dim 128,
  ``KVStarConfig`` defaults (25% channels = 32 kept, 2 tokens merged = 32 sub-blocks per block, a
  stride of 8 voting queries unless ``--stride``); per layer a :class:`PreparedVote` of random fp16
  sub-block representations over the candidate blocks of ``SparseConfig(block_size=64,
  budget=ratio 1/8)`` (sink 1, local 2). ``vote ms/layer`` times ``PreparedVote.scores`` alone;
  ``task ms`` times ``KVStarPolicy._select_all`` (every layer's vote, then one batched selection),
  which is what a worker task runs per request.
* ESA: ``ESAPolicy._select_all`` on a ``BlockRepStore`` of random float32 mean-K representations
  ``[32, 8, 128, 2047]`` with one decode query per layer (its per-task cost at the same geometry).

``--layers-distinct N`` builds N distinct layers' votes and cycles them over the 32 layers (a layer's
vote streams ~67 MB, far larger than any cache, so cycling does not flatter the timing; it keeps the
benchmark's memory small on a shared box). ``--concurrent T``: T tasks at once on a
``RetrievalWorker(T)`` (what a step of T requests does), ms per task = wall / T.

Each row records a digest of the selections it computed (same seed -> same inputs), so a "before"
and an "after" row of the same settings show whether the selections are equal.

    PYTHONPATH=python python benchmarks/bench_kvstar_vote.py \
        --out benchmarks/results/cpu/kvstar_vote_2core-epyc_2026-12-07.json --label before
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

_HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(_HERE.parent / "python"))

from ucm_trt.bench.cpu import machine_facts  # noqa: E402
from ucm_trt.config import Budget, KVStarConfig, SparseConfig  # noqa: E402
from ucm_trt.runtime.worker import RetrievalWorker  # noqa: E402
from ucm_trt.sparse.batched import BlockRepStore  # noqa: E402
from ucm_trt.sparse.policies.base import ModelShape, PolicyRuntime  # noqa: E402
from ucm_trt.sparse.policies.esa import ESAPolicy  # noqa: E402
from ucm_trt.sparse.policies.kvstar import KVStarPolicy, KVStarRequestState, PreparedVote  # noqa: E402
from ucm_trt.sparse.representations import SubBlockRepr  # noqa: E402
from ucm_trt.sparse.select import candidate_mask  # noqa: E402


def _ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x]


def _digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().numpy().tobytes()).hexdigest()[:16]


def _bind(policy, shape: ModelShape, sparse: SparseConfig, worker=None):
    policy.bind(PolicyRuntime(shape=shape, sparse=sparse, kv=None, worker=worker, device=torch.device("cpu")))
    return policy


def _timed(fn, repeats: int, warmup: int) -> tuple[list[float], object, list[float]]:
    """Wall ms per call, the last result, and the process's CPU ms per call (all its threads: on a
    loaded shared box the CPU time is the steadier figure of the work done)."""
    out = None
    for _ in range(warmup):
        out = fn()
    times, cpu = [], []
    for _ in range(repeats):
        c0, t0 = time.process_time(), time.perf_counter()
        out = fn()
        times.append(1e3 * (time.perf_counter() - t0))
        cpu.append(1e3 * (time.process_time() - c0))
    return times, out, cpu


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="JSON file; rows are appended when it exists")
    p.add_argument("--label", required=True, help="e.g. before / after")
    p.add_argument("--blocks", type=int, default=2047, help="prompt blocks")
    p.add_argument("--block-size", type=int, default=64)
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--layers-distinct", type=int, default=8)
    p.add_argument("--stride", type=int, default=KVStarConfig().retrieval_stride, help="voting queries (R)")
    p.add_argument("--threads", type=_ints, default=[1, 2], help="torch intra-op threads of the single-task rows")
    p.add_argument("--concurrent", type=_ints, default=[2], help="tasks at once on a RetrievalWorker (0: none)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--no-esa", action="store_true")
    args = p.parse_args(argv)

    hq, hkv, d, L, nb, bs = 32, 8, 128, args.layers, args.blocks, args.block_size
    kcfg = KVStarConfig(retrieval_stride=args.stride)
    m, dp = bs // kcfg.token_merge, kcfg.kept_channels(d)
    shape = ModelShape(num_layers=L, num_q_heads=hq, num_kv_heads=hkv, head_dim=d, rope_theta=5e5,
                       max_positions=1 << 18)
    base = SparseConfig(block_size=bs, budget=Budget.ratio(1 / 8))
    ksparse = SparseConfig(block_size=bs, budget=Budget.ratio(1 / 8), scoring="kvstar_vote", representation="subblock")
    g = torch.Generator().manual_seed(0)
    cand = candidate_mask(torch.tensor([nb], dtype=torch.int32), nb, sink_blocks=ksparse.sink_blocks,
                          local_blocks=ksparse.local_blocks, min_blocks=ksparse.min_blocks)[0]
    t0 = time.perf_counter()
    distinct = []
    for _ in range(min(args.layers_distinct, L)):
        vals = torch.randn(nb, m, hkv, dp, generator=g).half()
        counts = torch.full((nb, m), kcfg.token_merge, dtype=torch.int32)
        ch = torch.stack([torch.randperm(d, generator=g)[:dp].sort().values for _ in range(hkv)])
        distinct.append(PreparedVote(SubBlockRepr(values=vals, counts=counts, channels=ch), cand))
        del vals
    prepare_ms = 1e3 * (time.perf_counter() - t0) / len(distinct)
    votes = [distinct[i % len(distinct)] for i in range(L)]
    group = list(torch.randn(L, hq, args.stride, d, generator=g))  # per layer [Hq, R, D]
    kv = _bind(KVStarPolicy(kcfg), shape, ksparse)
    st = KVStarRequestState(dense=False, votes=votes, sel_nb=nb)
    esa_q = torch.randn(L, hq, d, generator=g)
    store = None
    if not args.no_esa:
        store = BlockRepStore(num_layers=L, num_kv_heads=hkv, head_dim=d, capacity=nb)
        store.append(torch.randn(L, nb, hkv, d, generator=g))
        esa = _bind(ESAPolicy(), shape, base)

    n_pos = int(cand.sum()) * m
    flops = 2 * L * hq * args.stride * dp * n_pos  # the vote's logits (multiply-adds x 2)
    rows = []
    before_threads = torch.get_num_threads()
    try:
        for t in args.threads:
            torch.set_num_threads(t)
            vote_t, _, vote_c = _timed(lambda: votes[0].scores(group[0]), args.repeats * 3, args.warmup)
            task_t, sel, task_c = _timed(lambda: kv._select_all(st, group), args.repeats, args.warmup)
            row = {"label": args.label, "what": "single task", "intra_op_threads": t, "concurrent_tasks": 1,
                   "stride": args.stride, "vote_ms_per_layer": statistics.median(vote_t),
                   "vote_ms_per_layer_all": vote_t, "vote_cpu_ms_per_layer": statistics.median(vote_c),
                   "kvstar_task_ms": statistics.median(task_t), "kvstar_task_ms_all": task_t,
                   "kvstar_task_cpu_ms": statistics.median(task_c), "kvstar_task_cpu_ms_all": task_c,
                   "kvstar_gflops": flops / (1e6 * statistics.median(task_t)),
                   "selection_digest": _digest(sel)}
            if store is not None:
                esa_t, esel, esa_c = _timed(lambda: esa._select_all(store.reps(), nb, esa_q), args.repeats * 3,
                                            args.warmup)
                row |= {"esa_task_ms": statistics.median(esa_t), "esa_task_ms_all": esa_t,
                        "esa_task_cpu_ms": statistics.median(esa_c),
                        "kvstar_over_esa": statistics.median(task_t) / statistics.median(esa_t),
                        "kvstar_over_esa_cpu": statistics.median(task_c) / statistics.median(esa_c),
                        "esa_selection_digest": _digest(esel)}
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if not k.endswith("_all")}), flush=True)
        torch.set_num_threads(before_threads)
        for n in (c for c in args.concurrent if c > 0):
            worker = RetrievalWorker(n)
            kvw = _bind(KVStarPolicy(kcfg), shape, ksparse, worker)

            def run_batch(kvw=kvw, worker=worker, n=n):
                tickets = [worker.submit(lambda: kvw._select_all(st, group), what=f"bench {i}") for i in range(n)]
                return [tk.result() for tk in tickets]

            try:
                wall, sels, cpu = _timed(run_batch, args.repeats, args.warmup)
            finally:
                worker.shutdown()
            row = {"label": args.label, "what": f"{n} tasks at once on RetrievalWorker({n})", "concurrent_tasks": n, "stride": args.stride,
                   "worker_intra_op_threads": getattr(worker, "intra_op_threads", "torch default (no option)"),
                   "kvstar_task_ms": statistics.median(wall) / n, "batch_wall_ms_all": wall,
                   "kvstar_task_cpu_ms": statistics.median(cpu) / n,
                   "selection_digest": _digest(sels[0]),
                   "all_tasks_equal": all(torch.equal(s, sels[0]) for s in sels)}
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if not k.endswith("_all")}), flush=True)
    finally:
        torch.set_num_threads(before_threads)

    settings = {"blocks": nb, "block_size": bs, "layers": L, "layers_distinct": len(distinct), "q_heads": hq,
                "kv_heads": hkv, "head_dim": d, "kept_channels": dp, "sub_blocks_per_block": m,
                "stride": args.stride, "candidate_positions_per_head": n_pos, "budget": "ratio 1/8",
                "vote_gflop_per_task": flops / 1e9, "prepare_ms_per_layer": prepare_ms,
                "repeats": args.repeats, "warmup": args.warmup, "load_average_end": os.getloadavg()}
    doc = {"what": "KVStar CPU vote vs ESA retrieval per task at the 8B / 128K geometry (issue 13)", "runs": []}
    if args.out.exists():
        doc = json.loads(args.out.read_text())
    doc["runs"].append({"label": args.label, "machine": machine_facts(), "settings": settings, "rows": rows})
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
