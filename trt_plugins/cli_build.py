"""``ucm-trt build REWRITTEN.onnx -o ENGINE``: arguments and handler (argparse only at import time;
TensorRT is imported when the command runs)."""

from __future__ import annotations

import argparse
import sys

__all__ = ["check_args", "configure", "run", "HELP", "DESCRIPTION"]

HELP = "build a TensorRT engine (UCM plugins, prefill + decode profiles) from a rewritten ONNX"
DESCRIPTION = (
    "Register the UCM TensorRT plugins, parse the rewritten model into a strongly typed network, "
    "add two optimization profiles (0 = prefill chunks up to --max-prefill-tokens, 1 = decode with "
    "one token per row up to --max-batch rows) and save the engine plus ENGINE.json (I/O, profiles, "
    "model metadata) for the TensorRT runtime backend. Needs TensorRT >= 10.9 and a CUDA GPU "
    "(pip install \"ucm-trt[trt]\").\n\n"
    "example:\n  ucm-trt build smol-esa.onnx -o smol-esa.engine --max-batch 4 --max-blocks 256\n"
    "  ucm-trt build smol-esa.onnx -o smol-esa-jit.engine --plugins jit"
)


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("onnx", metavar="REWRITTEN.onnx", help="model written by 'ucm-trt rewrite'")
    p.add_argument("-o", "--output", required=True, metavar="ENGINE", help="engine file to write")
    p.add_argument("--max-batch", type=int, default=1, help="rows per step (default 1)")
    p.add_argument("--max-prefill-tokens", type=int, default=1024, help="longest prefill chunk (default 1024)")
    p.add_argument("--opt-prefill-tokens", type=int, default=None, help="prefill tuning point (default half the max)")
    p.add_argument("--max-blocks", type=int, default=64,
                   help="block-table width: context capacity = max_blocks x block_size (default 64)")  # fmt: skip
    p.add_argument("--num-blocks", type=int, default=None, help="pool blocks per layer (default max_batch x max_blocks)")
    p.add_argument("--max-selected", type=int, default=None, help="selection width (default max_blocks)")
    p.add_argument("--plugins", choices=("aot", "jit"), default="aot",
                   help="aot: Triton kernels embedded as PTX (engine runs without Python); jit: Python "
                        "callbacks (the process that runs the engine must import trt_plugins)")  # fmt: skip
    p.add_argument("--sms", type=int, default=None,
                   help="SM count of the target GPU, for the split-K attention's split count (default: the CUDA "
                        "device's; required without one). Recorded in ENGINE.json")  # fmt: skip
    p.add_argument("--workspace-mb", type=int, default=None, help="builder workspace limit in MiB")
    p.add_argument("--fix-dim", action="append", default=[], metavar="NAME=VALUE",
                   help="value of another dynamic dim by its ONNX dim name (repeatable)")  # fmt: skip
    p.add_argument("--make-dirs", action="store_true", help="create the folder of ENGINE if it does not exist")


def check_args(args: argparse.Namespace, *, create_dirs: bool = True) -> None:
    """Flag checks before TensorRT loads (one line naming the flag, the value and the rule)."""
    from ucm_trt import cli_args as ca

    ca.input_file("REWRITTEN.onnx", args.onnx)
    ca.output_file("-o/--output", args.output, make_dirs=args.make_dirs, create=create_dirs)
    for flag, value in (("--max-batch", args.max_batch), ("--max-prefill-tokens", args.max_prefill_tokens),
                        ("--max-blocks", args.max_blocks)):
        ca.int_at_least(flag, value, 1)
    for flag, value in (("--opt-prefill-tokens", args.opt_prefill_tokens), ("--num-blocks", args.num_blocks),
                        ("--max-selected", args.max_selected), ("--workspace-mb", args.workspace_mb),
                        ("--sms", args.sms)):
        if value is not None:
            ca.int_at_least(flag, value, 1)
    if args.opt_prefill_tokens is not None and args.opt_prefill_tokens > args.max_prefill_tokens:
        raise ca.FlagError(f"--opt-prefill-tokens ({args.opt_prefill_tokens}) must be <= --max-prefill-tokens "
                           f"({args.max_prefill_tokens})")
    _fixed(args.fix_dim)


def _fixed(items: list[str]) -> dict[str, int]:
    out = {}
    for it in items:
        name, sep, value = it.partition("=")
        if not sep or not value.strip().isdigit():
            raise ValueError(f"--fix-dim must look like NAME=INT, got {it!r}")
        out[name.strip()] = int(value)
    return out


def run(args: argparse.Namespace) -> int:
    check_args(args)
    from trt_plugins._tensorrt import TensorRTUnavailableError
    from trt_plugins.build import EngineBuildConfig, EngineBuildError, build_engine

    config = EngineBuildConfig(
        max_batch=args.max_batch,
        max_prefill_tokens=args.max_prefill_tokens,
        opt_prefill_tokens=args.opt_prefill_tokens,
        max_blocks=args.max_blocks,
        num_blocks=args.num_blocks,
        max_selected=args.max_selected,
        plugin_mode=args.plugins,
        sms=args.sms,
        fixed_dims=_fixed(args.fix_dim),
        workspace_bytes=None if args.workspace_mb is None else args.workspace_mb << 20,
    )
    try:
        build_engine(args.onnx, args.output, config=config)
    except TensorRTUnavailableError as exc:
        print(f"ucm-trt build: error: {exc}", file=sys.stderr)
        return 1
    except EngineBuildError as exc:
        print(f"ucm-trt build: error: {str(exc).splitlines()[0]}", file=sys.stderr)
        return 1
    return 0
