"""Blend measured honestly (issue 15 item 6): time to first token of a Blend request (chunk KV
reused, selective recompute) against a *warmed* full prefill of the same prompt, and answer
accuracy on questions whose answers are inside the chunks (not only greedy agreement).

Each question: ``--chunks`` essay chunks of ``--chunk-tokens`` tokens, each holding one fact
("The pass key for the <colour> door is <key>."), then a question about one door. Both paths run
once on a warm-up question first (compile / first-call costs excluded from both); the chunks of every
question are cached before it is timed (a chunk cache is filled ahead of requests, as in deployment).

GPU (~30 s; writes blend_<card>.json, prints the table last):

    python benchmarks/quality_blend.py --out benchmarks/results/quality

CPU smoke test:  python benchmarks/quality_blend.py --device cpu --questions 2 --chunk-tokens 128 --out /tmp/blend
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))

from ucm_trt.config import BlendConfig, SparseConfig  # noqa: E402
from ucm_trt.models import haystack_text, load_smollm2  # noqa: E402
from ucm_trt.runtime import Engine, RuntimeConfig, SamplingParams, TorchBackend  # noqa: E402
from ucm_trt.runtime.blend import BlendRunner  # noqa: E402

DOORS = ("red", "blue", "green", "yellow", "white", "black", "orange", "purple")


def build_question(tok, text: str, q: int, *, chunks: int, chunk_tokens: int, block_size: int, pad: int):
    """Chunks (token ids, padded to a block boundary) with one fact each, the question suffix, the answer."""
    g = torch.Generator().manual_seed(1000 + q)
    keys = [str(int(torch.randint(10000, 100000, (1,), generator=g))) for _ in range(chunks)]
    out = []
    for i in range(chunks):
        start = (q * chunks + i) * 4000 % max(1, len(text) - 8000)
        hay = tok(text[start : start + 6 * chunk_tokens], add_special_tokens=False)["input_ids"]
        fact = tok(f"\nThe pass key for the {DOORS[i]} door is {keys[i]}. Remember it.\n",
                   add_special_tokens=False)["input_ids"]
        body = hay[: max(0, chunk_tokens - len(fact))]
        cut = len(body) * int(torch.randint(1, 9, (1,), generator=g)) // 10
        ids = body[:cut] + fact + body[cut:]
        out.append(ids + [pad] * (-len(ids) % block_size))
    asked = int(torch.randint(0, chunks, (1,), generator=g))
    suffix = tok(f"\n\nWhat is the pass key for the {DOORS[asked]} door? The pass key for the {DOORS[asked]} "
                 "door is", add_special_tokens=False)["input_ids"]
    return out, suffix, keys[asked]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--questions", type=int, default=12)
    p.add_argument("--chunks", type=int, default=4)
    p.add_argument("--chunk-tokens", type=int, default=480)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--recompute", nargs="+", default=["1:0.2", "1:0.0", "2:0.3"],
                   help="BlendConfig settings recompute_layer:recompute_ratio")
    p.add_argument("--max-new-tokens", type=int, default=7)
    p.add_argument("--max-seconds", type=float, default=None,
                   help="time budget from the start: no new question starts after it; the JSON, rewritten after "
                        "every setting, keeps what finished")
    args = p.parse_args(argv)
    cuda = args.device.startswith("cuda")
    t_start = time.perf_counter()

    def over() -> bool:
        return args.max_seconds is not None and time.perf_counter() - t_start > args.max_seconds

    model, tok = load_smollm2(dtype=torch.bfloat16 if cuda else torch.float32)
    model = model.to(args.device).eval()
    text = haystack_text(source="essays").text
    bs = args.block_size
    pad = tok.eos_token_id
    qs = [build_question(tok, text, q, chunks=args.chunks, chunk_tokens=args.chunk_tokens, block_size=bs, pad=pad)
          for q in range(args.questions + 1)]  # question 0 is the warm-up
    longest = max(sum(len(c) for c in ch) + len(sfx) for ch, sfx, _ in qs)
    rt = RuntimeConfig(max_batch=1, max_seq_len=longest + args.max_new_tokens + bs, prefill_chunk=longest)
    sparse = SparseConfig(block_size=bs)
    params = SamplingParams(max_new_tokens=args.max_new_tokens)
    backend = TorchBackend(model)
    card = torch.cuda.get_device_name() if cuda else f"cpu-{platform.machine()}"
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / ("blend_" + card.replace(" ", "-") + ".json")
    meta = {"card": card, "torch": torch.__version__, "model": "SmolLM2-135M-Instruct", "block_size": bs,
            "chunks": args.chunks, "chunk_tokens": args.chunk_tokens, "prompt_tokens_max": longest,
            "command": " ".join(sys.argv), "started_utc": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    full: list[dict] = []
    runs: list[dict] = []

    def write() -> None:
        meta["seconds"] = round(time.perf_counter() - t_start, 1)
        path.write_text(json.dumps({"meta": meta, "full_prefill": [{k: v for k, v in r.items() if k != "tokens"}
                                                                   for r in full], "runs": runs}, indent=1))

    def sync():
        if cuda:
            torch.cuda.synchronize()

    with Engine(backend, sparse=sparse, config=rt) as eng:
        for i, (ch, sfx, key) in enumerate(qs):
            if i > 1 and over():
                print(f"[blend] --max-seconds reached: full prefill of {i - 1} question(s)", flush=True)
                break
            sync()
            [res] = eng.generate([t for c in ch for t in c] + sfx, params)
            text_out = tok.decode(res.token_ids, skip_special_tokens=True)
            if i:  # question 0 warms the full-prefill path
                full.append({"ttft_s": res.ttft_seconds, "completion": text_out, "correct": key in text_out,
                             "tokens": res.token_ids})
    write()
    for spec in args.recompute:
        if runs and over():
            print(f"[blend] --max-seconds reached: settings from {spec} on not run", flush=True)
            break
        layer, ratio = spec.split(":")
        cfg = BlendConfig(recompute_layer=int(layer), recompute_ratio=float(ratio))
        rows = []
        with Engine(backend, sparse=sparse, config=rt) as eng:
            runner = BlendRunner(eng, cfg)
            for i, (ch, sfx, key) in enumerate(qs[: len(full) + 1]):
                if i > 1 and over():
                    break
                for c in ch:
                    runner.cache_chunk(c)
                sync()
                res = runner.generate(ch, sfx, params)
                text_out = tok.decode(res.token_ids, skip_special_tokens=True)
                if i:  # question 0 warms the Blend path
                    f = full[i - 1]
                    rows.append({"ttft_s": res.ttft_seconds, "completion": text_out, "correct": key in text_out,
                                 "first_token_equal": res.token_ids[0] == f["tokens"][0],
                                 "greedy_agreement": sum(a == b for a, b in zip(res.token_ids, f["tokens"],
                                                                                strict=False)) / len(f["tokens"])})
            stats = dict(runner.stats)
        if not rows:
            print(f"[blend] --max-seconds reached before layer {layer} ratio {ratio}", flush=True)
            break
        # both medians over the same questions (a setting cut short by --max-seconds answered fewer)
        same = full[: len(rows)]
        ttft = statistics.median(r["ttft_s"] for r in rows)
        full_ttft = statistics.median(r["ttft_s"] for r in same)
        runs.append({"recompute_layer": cfg.recompute_layer, "recompute_ratio": cfg.recompute_ratio,
                     "n": len(rows), "accuracy": sum(r["correct"] for r in rows) / len(rows),
                     "full_prefill_accuracy": sum(r["correct"] for r in same) / len(same),
                     "ttft_median_s": ttft, "full_prefill_ttft_median_s": full_ttft,
                     "ttft_speedup_vs_warm_full": full_ttft / ttft,
                     "first_token_equal": sum(r["first_token_equal"] for r in rows) / len(rows),
                     "greedy_agreement": statistics.mean(r["greedy_agreement"] for r in rows),
                     "runner_stats": stats, "questions": rows})
        write()
        print(f"[blend] layer {layer} ratio {ratio}: accuracy {runs[-1]['accuracy']:.2f} (full "
              f"{runs[-1]['full_prefill_accuracy']:.2f}), TTFT {ttft * 1e3:.1f} ms vs full {full_ttft * 1e3:.1f} ms",
              flush=True)
    write()
    print(f"wrote {path} ({time.perf_counter() - t_start:.0f} s)")
    print(f"{'recompute':>10} {'n':>3} {'acc':>5} {'full acc':>8} {'TTFT ms':>8} {'full ms':>8} {'speedup':>7} {'agree':>6}")
    for r in runs:
        print(f"{r['recompute_layer']}:{r['recompute_ratio']:<8g} {r['n']:>3} {r['accuracy']:>5.2f} "
              f"{r['full_prefill_accuracy']:>8.2f} {r['ttft_median_s'] * 1e3:>8.1f} "
              f"{r['full_prefill_ttft_median_s'] * 1e3:>8.1f} {r['ttft_speedup_vs_warm_full']:>7.2f} "
              f"{r['greedy_agreement']:>6.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
