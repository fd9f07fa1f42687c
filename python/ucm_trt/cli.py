"""``ucm-trt``: the command-line interface.

    ucm-trt export  HF_DIR OUT.onnx [--exporter legacy|dynamo] [--opset N]
    ucm-trt rewrite IN.onnx OUT.onnx --algorithm esa --block-size 16 [--rerope-window W ...]

Each subcommand is one ``Command`` entry in ``COMMANDS``: a name, a one-line help, a longer
description (shown by ``ucm-trt NAME --help``), a function that adds its arguments, a handler
``run(args) -> int`` and ``check(args, create_dirs=...)``, its flag and file checks alone. To add a
subcommand, write ``_configure_x`` / ``_check_x`` / ``_run_x`` and append ``Command(...)`` to
``COMMANDS``; keep heavy imports (torch, onnx, transformers) out of ``configure`` and ``check`` so
``--help`` stays instant and bad flags fail before anything loads (tests/cli checks both).

Argument rules (``ucm_trt.cli_args``, issue 17): ``run`` starts with ``check``, before any model,
graph or engine loads; a refusal is one line naming the flag (or positional argument), the value
given and the rule. Input files must exist, be files (a directory is reported as one), be readable
and non-empty; text inputs must be UTF-8 and hold more than whitespace. Block sizes follow
``ucm_trt.limits`` (a power of two in [16, 256]). The folder an output goes into must exist, or is
created with ``--make-dirs``; a command's default output folder (``eval``, ``bench``) is created
with a line saying so. :func:`check` parses and checks a command line without doing its work.

Exit codes: 0 success; 1 the work was refused (e.g. attention that cannot be rewritten; the
report is printed) or the environment lacks something (TensorRT, a GPU); 2 bad input or usage
(one-line ``ucm-trt CMD: error: ...`` on stderr).
"""

from __future__ import annotations

import argparse
import json
import sys
import textwrap
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from ucm_trt import algorithms as registry
from ucm_trt.limits import BLOCK_SIZE_RULE

__all__ = ["main", "check", "build_parser", "Command", "COMMANDS"]

EXIT_OK, EXIT_REFUSED, EXIT_USAGE = 0, 1, 2
# the registry's names (ucm_trt.algorithms imports nothing heavy, so --help stays instant)
ALGORITHMS = registry.names()


@dataclass(frozen=True)
class Command:
    name: str
    help: str
    description: str
    configure: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]
    # the flag and file checks alone (no model, no work; ``run`` does them first as well): raise
    # CommandError / ValueError / TypeError with one line naming the flag, the value and the rule
    check: Callable[..., object]  # check(args, *, create_dirs: bool): create_dirs=False checks only


class CommandError(Exception):
    """Bad input detected by a handler: printed as one line, exit code 2."""


def _progress(msg: str) -> None:
    print(f"[ucm-trt] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------- export


def _configure_export(p: argparse.ArgumentParser) -> None:
    p.add_argument("model_dir", metavar="HF_DIR",
                   help="local Hugging Face model directory (config.json + weights), or 'smollm2' for the "
                        "bundled SmolLM2-135M-Instruct checkpoint")  # fmt: skip
    p.add_argument("out", metavar="OUT.onnx", help="output ONNX path (weights beside it as OUT.onnx.data if > 2 GB)")
    p.add_argument("--exporter", choices=("legacy", "dynamo"), default="legacy",
                   help="legacy = TorchScript exporter (fast, decomposed attention); dynamo = torch.export + "
                        "onnxscript (opset 23 emits ONNX Attention/RotaryEmbedding). Default: legacy")  # fmt: skip
    p.add_argument("--opset", type=int, default=None,
                   help="ONNX opset (legacy: 14-20, default 17; dynamo: 18-23, default 20)")  # fmt: skip
    _add_make_dirs(p, "OUT.onnx")


def _add_make_dirs(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--make-dirs", action="store_true",
                   help=f"create the folder of {what} if it does not exist (default: refuse, so a typo in a path "
                        "creates nothing)")  # fmt: skip


def _check_export(args: argparse.Namespace, *, create_dirs: bool = True):
    """Flag checks of ``export`` (before torch or the model loads); returns the ExportConfig."""
    from ucm_trt import cli_args
    from ucm_trt.graph.export import ExportConfig  # light: torch loads when the export runs

    if args.model_dir != "smollm2":
        cli_args.checkpoint_dir("HF_DIR", args.model_dir)
    try:
        cfg = ExportConfig(exporter=args.exporter, opset=args.opset)
    except (ValueError, TypeError) as exc:
        raise CommandError(str(exc).replace("ExportConfig.opset", "--opset")) from None
    cli_args.output_file("OUT.onnx", args.out, make_dirs=args.make_dirs, create=create_dirs)
    return cfg


def _run_export(args: argparse.Namespace) -> int:
    cfg = _check_export(args)
    from ucm_trt.graph.export import export_hf_model

    src: str | Path = args.model_dir
    if args.model_dir == "smollm2":
        from ucm_trt.models.smollm2 import smollm2_checkpoint_dir

        _progress("preparing the SmolLM2 checkpoint (first run converts the GGUF, ~30 s) ...")
        src = smollm2_checkpoint_dir()
    t0 = time.perf_counter()
    try:
        out = export_hf_model(src, args.out, config=cfg, progress=_progress)
    except (ValueError, TypeError, OSError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CommandError(f"HF_DIR {args.model_dir!r}: {first}") from None
    _progress(f"done in {time.perf_counter() - t0:.1f}s: {out}")
    print(out)
    return EXIT_OK


# -------------------------------------------------------------------------------------- rewrite


def _configure_rewrite(p: argparse.ArgumentParser) -> None:
    p.add_argument("input", metavar="IN.onnx", help="exported decoder with contiguous past/present KV I/O")
    p.add_argument("output", metavar="OUT.onnx", help="rewritten model (written only if the rewrite succeeds)")
    p.add_argument("--algorithm", choices=ALGORITHMS, required=True, help=_rewrite_algorithm_help())
    p.add_argument("--block-size", type=int, required=True,
                   help=f"tokens per KV block, {BLOCK_SIZE_RULE} (the kernels' rule; e.g. 16, 64, 128)")  # fmt: skip
    p.add_argument("--rerope-window", type=int, help="ReRoPE window w (required with --algorithm rerope)")
    p.add_argument("--rerope-training-length", type=int,
                   help="training length L for ReRoPE (window <= L; log-n scaling uses it)")  # fmt: skip
    p.add_argument("--no-logn", action="store_true", help="disable ReRoPE log-n query scaling")
    sel = p.add_mutually_exclusive_group()
    sel.add_argument("--selection-inputs", dest="selection_inputs", action="store_true", default=None,
                     help="add per-layer selection inputs (default for sparse algorithms; use with rerope "
                          "to combine ReRoPE with block sparsity)")  # fmt: skip
    sel.add_argument("--no-selection-inputs", dest="selection_inputs", action="store_false",
                     help="select every block in-graph")  # fmt: skip
    p.add_argument("--dense-layers", default="", metavar="I,J,...",
                   help="layers that always attend to every block ('rollback' layers), e.g. 0,1")  # fmt: skip
    p.add_argument("--allow-partial", action="store_true",
                   help="write the model even if some attention nodes cannot be rewritten (they keep "
                        "contiguous KV I/O and are listed)")  # fmt: skip
    p.add_argument("--no-split-scratch", dest="split_scratch", action="store_false",
                   help="emit the unsplit attention ops (no attn_split_counters input; engines then run the "
                        "unsplit AOT kernel, ~14x slower at 128K on the H100)")  # fmt: skip
    p.add_argument("--report-json", metavar="PATH", help="also write the rewrite report as JSON")
    _add_make_dirs(p, "OUT.onnx and --report-json")


def _rewrite_algorithm_help() -> str:
    """What ``rewrite`` emits per algorithm, from the registry's ``graph_op``."""
    by_op = {op: "/".join(n for n in ALGORITHMS if registry.get(n).graph_op == op)
             for op in ("dense", "sparse", "rerope")}  # fmt: skip
    return (f"{by_op['dense']}: every block, no selection inputs; {by_op['sparse']}: UcmPagedSparseAttention[SplitK] + "
            f"per-layer selection inputs (the policy runs in the runtime); {by_op['rerope']}: "
            "UcmPagedReRoPEAttention[SplitK] over un-rotated K (SplitK, the default: split-K scratch as plugin I/O; "
            "--no-split-scratch: the unsplit ops)")


def _parse_layers(text: str) -> tuple[int, ...]:
    if not text.strip():
        return ()
    try:
        layers = tuple(int(x) for x in text.split(","))
    except ValueError:
        raise CommandError(f"--dense-layers must be comma-separated integers, got {text!r}") from None
    if any(i < 0 for i in layers):
        raise CommandError(f"--dense-layers must be >= 0, got {text!r}")
    return layers


def _check_rewrite(args: argparse.Namespace, *, create_dirs: bool = True):
    """Flag checks of ``rewrite`` (before onnx or the model loads); returns the RewriteConfig."""
    from ucm_trt import cli_args
    from ucm_trt.config import ReRoPEConfig

    cli_args.block_size("--block-size", args.block_size)
    rerope = None
    if args.algorithm == "rerope":
        if args.rerope_window is None or args.rerope_training_length is None:
            raise CommandError("--algorithm rerope needs --rerope-window and --rerope-training-length")
        cli_args.int_at_least("--rerope-window", args.rerope_window, 1)
        cli_args.int_at_least("--rerope-training-length", args.rerope_training_length, 1)
        if args.rerope_window > args.rerope_training_length:
            raise CommandError(f"--rerope-window ({args.rerope_window}) must be <= --rerope-training-length "
                               f"({args.rerope_training_length})")
        rerope = ReRoPEConfig(window=args.rerope_window, training_length=args.rerope_training_length,
                              logn=not args.no_logn)  # fmt: skip
    elif args.rerope_window is not None or args.rerope_training_length is not None or args.no_logn:
        raise CommandError(f"--rerope-* options only apply to --algorithm rerope (got --algorithm {args.algorithm})")
    dense_layers = _parse_layers(args.dense_layers)
    cli_args.input_file("IN.onnx", args.input)
    if Path(args.output).resolve() == Path(args.input).resolve():
        raise CommandError("OUT.onnx must differ from IN.onnx (the input is never overwritten)")
    cli_args.output_file("OUT.onnx", args.output, make_dirs=args.make_dirs, create=create_dirs)
    if args.report_json:
        cli_args.output_file("--report-json", args.report_json, make_dirs=args.make_dirs, create=create_dirs)
    return _rewrite_config(args, rerope, dense_layers)


def _rewrite_config(args: argparse.Namespace, rerope, dense_layers: tuple[int, ...]):
    from ucm_trt.graph.driver import RewriteConfig  # onnx loads here, after the flag checks

    return RewriteConfig(algorithm=args.algorithm, block_size=args.block_size, rerope=rerope,
                         selection_inputs=args.selection_inputs, dense_layers=dense_layers,
                         allow_partial=args.allow_partial, split_scratch=args.split_scratch)  # fmt: skip


def _run_rewrite(args: argparse.Namespace) -> int:
    cfg = _check_rewrite(args)
    from ucm_trt.graph.driver import RewriteError, rewrite_model, save_model

    _progress(f"rewriting {args.input} (algorithm={cfg.algorithm}, block_size={cfg.block_size}) ...")
    t0 = time.perf_counter()
    try:
        model, report = rewrite_model(args.input, config=cfg)
    except RewriteError as e:
        first = str(e).splitlines()[0]
        print(f"ucm-trt rewrite: error: {first}", file=sys.stderr)
        if e.report is not None:
            print(e.report.summary(), file=sys.stderr)
            _write_report(args.report_json, e.report)
        return EXIT_REFUSED
    except ValueError as e:  # not an ONNX file, fails the ONNX checker, opset too old, already rewritten ...
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CommandError(f"IN.onnx {args.input!r}: {first}") from None
    save_model(model, args.output)
    _write_report(args.report_json, report)
    print(report.summary())
    _progress(f"wrote {args.output} in {time.perf_counter() - t0:.1f}s")
    return EXIT_OK


def _write_report(path: str | None, report) -> None:
    if path:
        Path(path).write_text(json.dumps(report.to_dict(), indent=2) + "\n")


# ----------------------------------------------------------------------------------------- eval
# Quality suite (issue 7; owner of ucm_trt.eval). The options and the driver live in
# ucm_trt.eval.command; importing it is cheap (argparse only), heavy imports happen in the handler.


def _configure_eval(p: argparse.ArgumentParser) -> None:
    from ucm_trt.eval.command import configure_eval_parser

    configure_eval_parser(p)


def _check_eval(args: argparse.Namespace, *, create_dirs: bool = True) -> object:
    from ucm_trt.eval.command import check_eval_args

    return check_eval_args(args, create_dirs=create_dirs)


def _run_eval(args: argparse.Namespace) -> int:
    from ucm_trt.eval.command import run_eval_command

    argv = sys.argv[1:] if sys.argv and Path(sys.argv[0]).name == "ucm-trt" else ["eval"]
    return run_eval_command(args, command=" ".join(["ucm-trt", *argv]))


COMMANDS: list[Command] = [
    Command(
        "export",
        "export a Hugging Face decoder to ONNX with contiguous KV-cache I/O",
        "Export a causal LM to ONNX: inputs input_ids, attention_mask, position_ids, "
        "past_key_values.{i}.key/value; outputs logits, present.{i}.key/value. The result is what "
        "'ucm-trt rewrite' takes.\n\nexample:\n  ucm-trt export smollm2 smol.onnx\n"
        "  ucm-trt export ./my-llama llama.onnx --exporter dynamo --opset 23",
        _configure_export,
        _run_export,
        _check_export,
    ),
    Command(
        "rewrite",
        "rewrite an exported decoder to UCM paged sparse / ReRoPE attention",
        "Find every attention node (decomposed torch.onnx attention, ONNX Attention, "
        "com.microsoft GroupQueryAttention / MultiHeadAttention), replace it with a UCM op and "
        "rewire the KV cache to a paged pool. New inputs: seq_lens, block_table, kv_pool.{i}, "
        "selection.{i}; new outputs: new_key.{i}, new_value.{i}, last_query.{i}. Prints a report "
        "of every attention node and why it was or was not rewritten; writes nothing unless every "
        "node was rewritten (or --allow-partial).\n\nexample:\n"
        "  ucm-trt rewrite smol.onnx smol-esa.onnx --algorithm esa --block-size 16\n"
        "  ucm-trt rewrite smol.onnx smol-rerope.onnx --algorithm rerope --block-size 16 "
        "--rerope-window 512 --rerope-training-length 8192",
        _configure_rewrite,
        _run_rewrite,
        _check_rewrite,
    ),
]


# ----------------------------------------------------------------------------------------- chat
# The sample chat app (logic in ucm_trt.chat.app, shared with samples/chat/chat.py).


def _configure_chat(p: argparse.ArgumentParser) -> None:
    from ucm_trt.chat.app import add_arguments

    add_arguments(p)


def _check_chat(args: argparse.Namespace, *, create_dirs: bool = True) -> object:
    from ucm_trt.chat.app import check_args

    return check_args(args, create_dirs=create_dirs)


def _run_chat(args: argparse.Namespace) -> int:
    from ucm_trt.chat.app import run

    args._prog = "ucm-trt chat"
    return run(args)  # prints its own one-line errors; 0 ok, 1 environment (e.g. no TensorRT), 2 bad input


COMMANDS.append(Command(
    "chat",
    "chat in the terminal with a model on the UCM runtime (switch algorithm/budget live)",
    "Terminal chat over the generation runtime: streamed replies, the model's chat template, a "
    "stats line per turn (prompt tokens, decode tok/s, blocks selected per step, retrieval time, "
    "bytes moved, KV held). Reads standard input line by line, so it can be scripted. Commands: "
    "/algo NAME, /budget R, /load FILE (send a long text with the next message), /stats, /reset, "
    "/help, /quit. Default: SmolLM2-135M-Instruct on the CPU with the runtime's PyTorch backend; "
    "--onnx runs a rewritten model on ONNX Runtime, --engine a TensorRT engine.\n\nexample:\n"
    "  ucm-trt chat\n  ucm-trt chat --algorithm esa --budget 0.25 --load essay.txt\n"
    "  ucm-trt chat --onnx smol-esa.onnx\n"
    "  printf 'Hi\\n/algo gsa-on-device\\nSummarize.\\n' | ucm-trt chat --max-new-tokens 32\n"
    "  ucm-trt chat --backend torch --device cuda",
    _configure_chat,
    _run_chat,
    _check_chat,
))


COMMANDS.append(Command(
    "eval",
    "quality of sparse attention on a real model: recall curves, passkey, perplexity",
    "Attention-mass recall per representation / block size / layer against the oracle and "
    "sink+local baselines (captured SmolLM2 Q/K), and the sparsity vs accuracy table (passkey "
    "retrieval and perplexity with real sparse attention; passkey through the generation "
    "runtime). Results are resumable JSON under benchmarks/results/quality/.\n\nexample:\n"
    "  ucm-trt eval --quick\n  ucm-trt eval --part recall\n"
    "  ucm-trt eval --part accuracy --rollback-from benchmarks/results/quality/recall.json",
    _configure_eval,
    _run_eval,
    _check_eval,
))


# ---------------------------------------------------------------------------------------- build
# TensorRT engine builder (issue 8; owner of trt_plugins). Options and handler live in
# trt_plugins.cli_build (argparse only at import); TensorRT is imported when the command runs.


def _configure_build(p: argparse.ArgumentParser) -> None:
    from trt_plugins.cli_build import configure

    configure(p)


def _check_build(args: argparse.Namespace, *, create_dirs: bool = True) -> object:
    from trt_plugins.cli_build import check_args

    return check_args(args, create_dirs=create_dirs)


def _run_build(args: argparse.Namespace) -> int:
    from trt_plugins.cli_build import run

    return run(args)


def _build_command() -> Command:
    from trt_plugins.cli_build import DESCRIPTION, HELP

    return Command("build", HELP, DESCRIPTION, _configure_build, _run_build, _check_build)


COMMANDS.append(_build_command())


# ------------------------------------------------------------------------------------------ run
# Generation runtime (issue 5; owner of ucm_trt.runtime). Options and handler live in
# ucm_trt.runtime.cli_run (argparse only at import); torch/transformers load when the command runs.


def _configure_run(p: argparse.ArgumentParser) -> None:
    from ucm_trt.runtime.cli_run import add_arguments

    add_arguments(p)


def _check_run(args: argparse.Namespace, *, create_dirs: bool = True) -> object:
    from ucm_trt.runtime.cli_run import check_args

    return check_args(args, create_dirs=create_dirs)


def _run_run(args: argparse.Namespace) -> int:
    from ucm_trt.runtime.cli_run import run_command

    return run_command(args)


COMMANDS.append(Command(
    "run",
    "generate for one prompt with a UCM algorithm; prints the text and the runtime stats",
    "Generate with the paged-KV runtime (PyTorch backend, or ONNX Runtime on a rewritten model with "
    f"--onnx) and one algorithm: {', '.join(ALGORITHMS[:-1])} or {ALGORITHMS[-1]}. Prints the streamed "
    "text, then the stats (prefill/decode time, tokens/s, bytes moved, KV held, cache hit rate, "
    "retrieval latency and overlap, selected-block fraction).\n\n"
    "blend (PyTorch backend): the prompt is the --chunk/--chunk-file documents, in order, then the "
    "--prompt question. Each chunk is padded to a block boundary and cached at position 0 first (as if "
    "earlier requests had sent it); the request then reuses those blocks at their new offsets "
    "(delta-RoPE), recomputes the --recompute-ratio most-deviating reused tokens from --recompute-layer "
    "on, and decodes dense. Stats: TTFT with reuse, blocks reused, tokens recomputed; --compare-full adds "
    "the full-prefill TTFT and the greedy agreement with it.\n\nexample:\n"
    "  ucm-trt run --prompt-file essay.txt --algorithm esa --max-new-tokens 64 --chat\n"
    "  ucm-trt run --prompt 'Hello' --algorithm dense --onnx smol-dense.onnx --block-size 16\n"
    "  ucm-trt run --algorithm blend --chunk-file doc1.txt --chunk-file doc2.txt --block-size 16 \\\n"
    "      --prompt ' Question: what do both documents describe? Answer:' --compare-full",
    _configure_run,
    _run_run,
    _check_run,
))


# ---------------------------------------------------------------------------------------- bench
# CPU speed figures (issue 7 "Speed", CPU side; owner of ucm_trt.bench). Options and driver live in
# ucm_trt.bench.command (argparse only at import); torch/transformers load when the command runs.


def _configure_bench(p: argparse.ArgumentParser) -> None:
    from ucm_trt.bench.command import configure_bench_parser

    configure_bench_parser(p)


def _check_bench(args: argparse.Namespace, *, create_dirs: bool = True) -> object:
    from ucm_trt.bench.command import check_bench_args

    return check_bench_args(args, create_dirs=create_dirs)


def _run_bench(args: argparse.Namespace) -> int:
    from ucm_trt.bench.command import run_bench_command

    argv = sys.argv[1:] if sys.argv and Path(sys.argv[0]).name == "ucm-trt" else ["bench"]
    return run_bench_command(args, command=" ".join(["ucm-trt", *argv]))


COMMANDS.append(Command(
    "bench",
    "CPU speed figures: retrieval cost per decode step, offload bytes moved and cache hit rate",
    "Measure on this CPU (median of repeats after warmup): ESA retrieval (scoring + top-k with forced "
    "windows) per decode step per sequence over N blocks x 8 KV heads x 32 layers vs context length and "
    "torch threads, per layer (as the runtime runs it) and batched over layers; and, through the runtime "
    "Engine on a tiny random Llama, host->device bytes per decode step and cache hit rate for ESA and GSA "
    "vs retrieval stride and budget. Writes JSON with the machine facts.\n\nexample:\n"
    "  ucm-trt bench --quick\n"
    "  ucm-trt bench --blocks 256,1024,4096 --threads 1,2 --out benchmarks/results/cpu/cpu_bench.json",
    _configure_bench,
    _run_bench,
    _check_bench,
))

class _Parser(argparse.ArgumentParser):
    """argparse prints the whole usage before a usage error; print one line instead (exit 2)."""

    def error(self, message: str):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="ucm-trt",
        description="UCM-style sparse attention for TensorRT / ONNX Runtime deployments of decoder LLMs.\n\n"
        "pipeline: export -> rewrite -> (build -> run/chat -> bench/eval)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for cmd in COMMANDS:
        desc = "\n\n".join(textwrap.fill(par, 88) if not par.startswith("example") else par
                             for par in cmd.description.split("\n\n"))  # fmt: skip
        p = sub.add_parser(cmd.name, help=cmd.help, description=desc,
                           formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
        cmd.configure(p)
        p.set_defaults(_run=cmd.run, _check=cmd.check, _name=cmd.name)
    return parser


def _dispatch(argv: Sequence[str] | None, stage: str) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)  # usage errors: _Parser prints one line and exits 2
    try:
        if stage == "check":
            args._check(args, create_dirs=False)
            return EXIT_OK
        return args._run(args)
    except (CommandError, ValueError, TypeError, FileNotFoundError) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"ucm-trt {args._name}: error: {msg}", file=sys.stderr)
        return EXIT_USAGE


def main(argv: Sequence[str] | None = None) -> int:
    return _dispatch(argv, "run")


def check(argv: Sequence[str] | None = None) -> int:
    """Parse and check a command line without doing its work (no model, graph or engine loads):
    0 when ``main(argv)`` would start working, else the exit code it would return with the same
    one-line message (2 for bad input; argparse usage errors exit 2 as in :func:`main`)."""
    try:
        return _dispatch(argv, "check")
    except Exception as e:  # the chat's environment errors (no TensorRT, no GPU): exit 1, as `ucm-trt chat`
        from ucm_trt.chat.app import ChatSetupError

        if not isinstance(e, ChatSetupError):
            raise
        print(f"ucm-trt chat: error: {str(e).strip().splitlines()[0]}", file=sys.stderr)
        return EXIT_REFUSED


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
