"""ReRoPE showcase: passkey retrieval beyond SmolLM2's trained context (8K), plain RoPE vs ReRoPE.

Plain RoPE runs through Hugging Face ``generate`` (SDPA); ReRoPE runs through the ucm-trt runtime
(PyTorch backend: Triton ReRoPE attention on CUDA, the fp32 reference on the CPU; K stored
un-rotated, KV memory 1.0x). Greedy, 8 new tokens, one prompt per (length, depth).

    python benchmarks/rerope_passkey.py --lengths 16384 32768 --window 2048 --out benchmarks/results/rerope/rerope_passkey.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import date
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))

from ucm_trt.config import ReRoPEConfig, SparseConfig  # noqa: E402
from ucm_trt.models import build_passkey_prompt, haystack_text, load_smollm2  # noqa: E402
from ucm_trt.runtime import Engine, RuntimeConfig, SamplingParams, TorchBackend  # noqa: E402
from ucm_trt.runtime.algorithms import make_policy, sparse_config_for  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[16384, 32768])
    p.add_argument("--depths", type=float, nargs="+", default=[0.5])
    p.add_argument("--window", type=int, default=2048, help="ReRoPE window (<= training length 8192)")
    p.add_argument("--training-length", type=int, default=8192)
    p.add_argument("--no-logn", action="store_true")
    p.add_argument("--block-size", type=int, default=64)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--haystack", default="auto", choices=("auto", "essays", "filler"))
    p.add_argument("--skip-plain", action="store_true", help="skip the plain-RoPE baseline")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/rerope/rerope_passkey.json"))
    args = p.parse_args(argv)
    rerope = ReRoPEConfig(window=args.window, training_length=args.training_length, logn=not args.no_logn)
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    base, tok = load_smollm2(dtype=dtype)
    base = base.to(args.device).eval()
    paged, _ = load_smollm2(dtype=dtype)
    paged = paged.to(args.device).eval()
    hay = haystack_text(source=args.haystack)
    rows = []
    for n in args.lengths:
        for depth in args.depths:
            key = str(10000 + (n * 7 + int(depth * 100)) % 89999)
            prompt = build_passkey_prompt(tok, num_tokens=n, passkey=key, depth=depth, haystack=hay)
            ids = prompt.input_ids.to(args.device)
            row = {"tokens": prompt.num_tokens, "depth": depth, "passkey": key, "haystack": hay.source}
            if not args.skip_plain:
                t0 = time.perf_counter()
                with torch.no_grad():
                    out = base.generate(ids, max_new_tokens=8, do_sample=False,
                                        attention_mask=torch.ones_like(ids))
                text = tok.decode(out[0, ids.shape[1]:])
                row["plain_rope"] = {"answer": text, "correct": prompt.is_correct(text),
                                     "seconds": time.perf_counter() - t0}
                print(f"{n} tokens depth {depth}: plain RoPE -> {text!r} ({row['plain_rope']['correct']})", flush=True)
            sparse = sparse_config_for("rerope", SparseConfig(block_size=args.block_size))
            cfg = RuntimeConfig(max_batch=1, max_seq_len=prompt.num_tokens + 16, prefill_chunk=4096)
            t0 = time.perf_counter()
            with Engine(TorchBackend(paged), make_policy("rerope", rerope=rerope), sparse=sparse, config=cfg) as eng:
                [res] = eng.generate(ids[0].tolist(), SamplingParams(max_new_tokens=8))
                stats = eng.stats()
            text = tok.decode(res.token_ids)
            row["rerope"] = {"answer": text, "correct": prompt.is_correct(text), "seconds": time.perf_counter() - t0,
                             "device_kv_bytes": stats.get("device_kv_bytes_last")}
            print(f"{n} tokens depth {depth}: ReRoPE w={args.window} -> {text!r} ({row['rerope']['correct']})", flush=True)
            rows.append(row)
    card = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    result = {"card": card, "date": date.today().isoformat(), "torch": torch.__version__,
              "rerope": {"window": rerope.window, "training_length": rerope.training_length, "logn": rerope.logn},
              "block_size": args.block_size, "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")
    print(f"{'tokens':>7} {'depth':>5} {'plain RoPE':>11} {'ReRoPE':>7}")
    for r in rows:
        plain = r.get("plain_rope", {}).get("correct", "-")
        print(f"{r['tokens']:>7} {r['depth']:>5} {plain!s:>11} {r['rerope']['correct']!s:>7}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
