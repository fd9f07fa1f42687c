"""Selection turnover of SmolLM2-135M-Instruct during greedy decode (issue 13 item 2).

Real post-RoPE Q/K, dense decode, offline retrieval with the runtime's scoring and selection
(``ucm_trt.eval.turnover``). For each block size, budget ratio, selection mode (shared / per KV
head) and retrieval stride R: the fraction of the top-k blocks that change between consecutive
retrievals, per layer and KV head, next to the same with random queries (the random-weight case).

    PYTHONPATH=python .venv/bin/python benchmarks/turnover_smollm2.py \\
        --out benchmarks/results/runtime/turnover_smollm2_8k.json

CPU only; about 2-4 minutes per prompt on 2 shared cores. Prints a short table last.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

from ucm_trt.eval.turnover import decode_with_queries, turnover_table
from ucm_trt.models import load_smollm2
from ucm_trt.models.prompts import haystack_text

QUESTIONS = (
    "\n\nSummarize the text above in a few sentences.\nSummary:",
    "\n\nWhat is the most important advice the author gives above? Explain it.\nAnswer:",
    "\n\nList the main topics discussed in the text above.\nTopics:",
)


def _ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x]


def _floats(s: str) -> list[float]:
    return [float(x) for x in s.split(",") if x]


def build_prompt(tok, hay: str, context: int, steps: int, index: int) -> list[int]:
    """Essay text from a per-prompt offset, cut so prompt + decode fits ``context``, then a question."""
    question = tok(QUESTIONS[index % len(QUESTIONS)], add_special_tokens=False)["input_ids"]
    body = tok(hay[index * 150_000 :], add_special_tokens=False)["input_ids"]
    n = context - steps - len(question) - 1
    if len(body) < n:
        raise ValueError(f"haystack too short for a {context}-token prompt at offset {index}")
    return body[:n] + question


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--context", type=int, default=8192, help="prompt + decoded tokens (SmolLM2 trains on 8192)")
    p.add_argument("--steps", type=int, default=256, help="greedy decode steps per prompt")
    p.add_argument("--prompts", type=int, default=2)
    p.add_argument("--block-sizes", type=_ints, default=[32, 64, 128])
    p.add_argument("--ratios", type=_floats, default=[0.125, 0.25])
    p.add_argument("--strides", type=_ints, default=[1, 2, 4, 5, 8, 10])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    t_start = time.time()
    model, tok = load_smollm2(dtype=torch.float32, attn_implementation="sdpa")
    hay = haystack_text(source="auto", min_chars=600_000)
    rows, prompts = [], []
    for i in range(args.prompts):
        ids = build_prompt(tok, hay.text, args.context, args.steps, i)
        t0 = time.time()
        cap = decode_with_queries(model, ids, args.steps)
        t_dec = time.time() - t0
        text = tok.decode(cap.tokens)
        prompts.append({"index": i, "prompt_tokens": len(ids), "decode_steps": args.steps, "seconds": round(t_dec, 1),
                        "question": QUESTIONS[i % len(QUESTIONS)], "generated_head": text[:300]})
        print(f"prompt {i}: {len(ids)} tokens, {args.steps} steps in {t_dec:.0f} s: {text[:120]!r}", flush=True)
        for row in turnover_table(cap, block_sizes=args.block_sizes, ratios=args.ratios, strides=args.strides):
            rows.append({"prompt": i, **row})
        del cap
        write(args, hay.source, t_start, prompts, rows)  # after every prompt: a partial run still leaves a file
    summary = write(args, hay.source, t_start, prompts, rows)
    print(f"\nwrote {args.out}")
    print(f"{'bs':>4} {'ratio':>6} {'selection':>9} {'R':>3} {'topk turnover':>13} {'(min/med/max over layer x head)':>32} {'random':>7}")
    for s in summary:
        spread = f"{s['layer_head_min']:.2f}/{s['layer_head_median']:.2f}/{s['layer_head_max']:.2f}"
        print(f"{s['block_size']:>4} {s['ratio']:>6} {s['selection']:>9} {s['stride']:>3} {s['topk_turnover']:>13.3f} "
              f"{spread:>32} {s['random_topk_turnover']:>7.3f}")
    return 0


def _mean(rows: list[dict], key: str) -> float:
    return sum(r[key] for r in rows) / len(rows)


def write(args, haystack_source: str, t_start: float, prompts: list[dict], rows: list[dict]) -> list[dict]:
    """Write the JSON (settings, per-prompt rows, mean over prompts per configuration); return the summary."""
    # mean over prompts of each config
    summary: list[dict] = []
    keys = sorted({(r["block_size"], r["ratio"], r["selection"], r["stride"]) for r in rows})
    for bs, ratio, sel, stride in keys:
        rs = [r for r in rows if (r["block_size"], r["ratio"], r["selection"], r["stride"]) == (bs, ratio, sel, stride)]
        summary.append({"block_size": bs, "ratio": ratio, "selection": sel, "stride": stride, "prompts": len(rs),
                        "topk_turnover": round(_mean(rs, "topk_turnover"), 4),
                        "all_turnover": round(_mean(rs, "all_turnover"), 4),
                        "layer_head_min": round(min(r["topk_turnover_layer_head_min"] for r in rs), 4),
                        "layer_head_median": round(_mean(rs, "topk_turnover_layer_head_median"), 4),
                        "layer_head_max": round(max(r["topk_turnover_layer_head_max"] for r in rs), 4),
                        "random_topk_turnover": round(_mean(rs, "random_topk_turnover"), 4)})
    result = {
        "what": "selection turnover of SmolLM2-135M-Instruct, greedy decode, real post-RoPE Q/K (issue 13 item 2)",
        "definition": "topk_turnover = changed / selected over the top-k part (sink and local windows left out) "
                      "between consecutive retrievals R decode steps apart; all_turnover counts every selected "
                      "prompt block; per layer and KV head in the rows; random_* = the same with random queries",
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "haystack": haystack_source,
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count(),
                    "torch": torch.__version__, "load_average_end": list(os.getloadavg())},
        "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime(t_start)),
        "seconds": round(time.time() - t_start, 1),
        "prompts": prompts,
        "summary": summary,
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    return summary


if __name__ == "__main__":
    raise SystemExit(main())
