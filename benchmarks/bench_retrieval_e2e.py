"""What CPU retrieval costs a decode step, and what GPU-resident representations save (GPU; issue 13 item 4).

ESA / GSA with offload on the Llama-3.2-1B-shaped random model (``bench_runtime.llama_1b_random``),
B sequences of C tokens decoded together, CUDA graphs on, for each retrieval option:
representations on the host (CPU worker threads) or the device, with the model's queries (random
weights: the worst-case turnover) or ``QueryDrift(target_turnover=t)`` (a realistic turnover), plus
dense at the same batch. Per run: mean steady decode step, tokens/s, the main thread's wait for
retrieval per decode step, retrieval busy time per decode step, overlap, plan ms, H2D per step, and
the top-k turnover the run had.

    PYTHONPATH=python python benchmarks/bench_retrieval_e2e.py --out OUT_DIR          # about 2 minutes on an H100

Writes OUT_DIR/retrieval_e2e_<card>_<date>.json and prints a table last.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))

from bench_runtime import llama_1b_random  # noqa: E402

from ucm_trt.config import Budget, SparseConfig  # noqa: E402
from ucm_trt.runtime import Engine, RuntimeConfig, SamplingParams, TorchBackend  # noqa: E402
from ucm_trt.runtime.algorithms import make_policy, sparse_config_for  # noqa: E402
from ucm_trt.sparse.policies import RetrievalConfig  # noqa: E402
from ucm_trt.sparse.turnover import QueryDrift  # noqa: E402


def run(model, algorithm: str, retrieval: RetrievalConfig | None, args) -> dict:
    sparse = sparse_config_for(algorithm, SparseConfig(block_size=args.block_size, budget=Budget.ratio(args.ratio),
                                                       retrieval_stride=args.stride))
    policy = make_policy(algorithm, retrieval=retrieval)
    bs, ctx, b = args.block_size, args.context, args.batch
    max_seq = ctx + args.decode_steps + 1
    max_blocks = -(-max_seq // bs)
    device_blocks = max_blocks + int(b * max_blocks * 0.3) + 1 if policy.offload else None
    rt = RuntimeConfig(max_batch=b, max_seq_len=max_seq, prefill_chunk=4096, cache_blocks=2,
                       num_device_blocks=device_blocks, retrieval_threads=args.retrieval_threads, cuda_graph=True)
    engine = Engine(TorchBackend(model, attention="triton", validate=False), policy, sparse=sparse, config=rt)
    g = torch.Generator().manual_seed(ctx)
    prompts = [torch.randint(0, model.config.vocab_size, (ctx,), generator=g).tolist() for _ in range(b)]
    torch.cuda.synchronize()
    engine.generate(prompts, SamplingParams(max_new_tokens=args.decode_steps))
    torch.cuda.synchronize()
    stats = engine.stats()
    dec = [r.seconds for r in engine.metrics.steps if r.kind == "decode"]
    engine.close()
    del engine
    torch.cuda.empty_cache()
    tail = dec[4:]  # the first steps compile kernels and capture graphs
    mean_ms = 1e3 * sum(tail) / len(tail)
    pol = stats.get("policy") or {}
    n_dec = len(dec)
    row = {
        "algorithm": algorithm,
        "representations": None if retrieval is None else retrieval.representations,
        "rep_dtype": None if retrieval is None else str(retrieval.rep_dtype).removeprefix("torch."),
        "query_drift_target": None if retrieval is None or retrieval.query_drift is None
        else retrieval.query_drift.target_turnover,
        "batch": b, "context": ctx, "decode_steps": n_dec,
        "step_ms_mean_steady": round(mean_ms, 3),
        "step_ms_median_steady": round(1e3 * sorted(tail)[len(tail) // 2], 3),
        "tokens_per_s_steady": round(b * 1e3 / mean_ms, 1),
        "retrieval_wait_ms_per_step": None if stats.get("retrieval_wait_ms") is None
        else round(stats["retrieval_wait_ms"] / n_dec, 3),
        "retrieval_busy_ms_per_step": None if stats.get("retrieval_busy_ms") is None
        else round(stats["retrieval_busy_ms"] / n_dec, 3),
        **{k: stats.get(k) for k in ("retrieval_tasks", "retrieval_mean_ms", "retrieval_overlap", "decode_plan_ms_mean",
                                      "decode_bytes_h2d_per_step", "cache_hit_rate", "cuda_graph_replays")},
        **{k: pol.get(k) for k in ("topk_turnover", "selection_turnover", "query_drift_persistence",
                                    "query_drift_calibrated_turnover", "representation_bytes_peak",
                                    "selected_block_fraction")},
    }
    print(json.dumps(row), flush=True)
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--context", type=int, default=32768)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--decode-steps", type=int, default=48)
    p.add_argument("--block-size", type=int, default=64)
    p.add_argument("--ratio", type=float, default=0.125)
    p.add_argument("--stride", type=int, default=4)
    p.add_argument("--retrieval-threads", type=int, default=4)
    p.add_argument("--target-turnover", type=float, default=0.14,
                   help="QueryDrift target (SmolLM2's measured top-k turnover: benchmarks/results/runtime/turnover_smollm2_8k.json)")
    p.add_argument("--algorithms", nargs="+", default=["esa"])
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_retrieval_e2e.py needs a CUDA GPU", file=sys.stderr)
        return 2
    card = torch.cuda.get_device_name(0)
    started = dt.datetime.now(dt.timezone.utc)
    model = llama_1b_random(torch.bfloat16, "cuda", args.context + args.decode_steps + 16)
    drift = QueryDrift(target_turnover=args.target_turnover)
    rows = [run(model, "dense", None, args)]
    for alg in args.algorithms:
        for where, dtype, qd in (("host", torch.float32, None), ("device", torch.float32, None),
                                 ("host", torch.float32, drift), ("device", torch.bfloat16, drift)):
            rows.append(run(model, alg, RetrievalConfig(representations=where, rep_dtype=dtype, query_drift=qd), args))
    result = {"what": "decode step cost of CPU vs GPU-resident retrieval (issue 13 item 4)", "card": card,
              "torch": torch.__version__, "cpu_count": os.cpu_count(), "date_utc": started.strftime("%Y-%m-%d %H:%M"),
              "model": "llama1b-random (16 layers, 32 q / 8 kv heads, head_dim 64, bf16)",
              "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
              "seconds": round(time.time() - started.timestamp(), 1), "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"retrieval_e2e_{card.replace(' ', '-')}_{started:%Y-%m-%d}.json"
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {path}")
    print(f"{'alg':>5} {'reps':>6} {'dtype':>8} {'drift':>5} {'step ms':>8} {'tok/s':>7} {'wait/step':>9} "
          f"{'busy/step':>9} {'overlap':>7} {'topk turn':>9} {'rep MB':>7}")
    for r in rows:
        def f(v, fmt):
            return format(v, fmt) if isinstance(v, (int, float)) else "-"
        print(f"{r['algorithm']:>5} {r['representations'] or '-':>6} {r['rep_dtype'] or '-':>8} "
              f"{f(r['query_drift_target'], '.2f'):>5} {r['step_ms_mean_steady']:>8.2f} {r['tokens_per_s_steady']:>7.0f} "
              f"{f(r['retrieval_wait_ms_per_step'], '.2f'):>9} {f(r['retrieval_busy_ms_per_step'], '.2f'):>9} "
              f"{f(r['retrieval_overlap'], '.2f'):>7} {f(r['topk_turnover'], '.3f'):>9} "
              f"{f((r['representation_bytes_peak'] or 0) / 1e6, '.1f'):>7}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
