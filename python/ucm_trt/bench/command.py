"""``ucm-trt bench``: CPU speed figures (argparse only at import; torch loads in the handler).

    ucm-trt bench [--quick] [--out PATH] [--blocks 256,1024,4096] [--threads 1,2]
                  [--repeats N] [--warmup N] [--strides 1,2,4] [--ratios 0.125,0.25,0.5]
                  [--skip-retrieval] [--skip-offload]

Writes one JSON file (default ``benchmarks/results/cpu/cpu_bench.json``; ``--quick`` writes
``cpu_bench_quick.json`` unless ``--out`` is given) with the machine facts, the settings and the
rows; prints progress on stderr and a short table on stdout.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

__all__ = ["configure_bench_parser", "check_bench_args", "run_bench_command", "BenchArgumentError", "DEFAULT_OUT", "QUICK_OUT"]

DEFAULT_OUT = "benchmarks/results/cpu/cpu_bench.json"
QUICK_OUT = "benchmarks/results/cpu/cpu_bench_quick.json"

FULL = {"blocks": "256,1024,4096", "threads": "1,2", "repeats": 7, "warmup": 2, "strides": "1,2,4",
        "ratios": "0.125,0.25,0.5", "layers": 32, "prompt_tokens": 1536, "decode_steps": 32}
QUICK = {"blocks": "64,256", "threads": "1", "repeats": 3, "warmup": 1, "strides": "1,4",
         "ratios": "0.25", "layers": 4, "prompt_tokens": 256, "decode_steps": 8}


class BenchArgumentError(ValueError):
    """A bad ``ucm-trt bench`` option (names the option, the value and the rule)."""


def configure_bench_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true",
                   help="tiny sizes (< 1 minute): 64/256 blocks x 4 layers, 1 thread, a 256-token prompt")
    p.add_argument("--out", default=None,
                   help=f"JSON output (default {DEFAULT_OUT}; with --quick {QUICK_OUT}; the default's folder is "
                        "created when missing and the command says so; the folder of a path given here must exist, "
                        "or pass --make-dirs)")
    p.add_argument("--make-dirs", action="store_true", help="create the folder of --out if it does not exist")
    p.add_argument("--blocks", default=None, help=f"comma-separated block counts (default {FULL['blocks']})")
    p.add_argument("--threads", default=None, help=f"comma-separated torch thread counts (default {FULL['threads']})")
    p.add_argument("--repeats", default=None, help=f"timed repeats per figure, median reported (default {FULL['repeats']})")
    p.add_argument("--warmup", default=None, help=f"untimed warmup runs per figure (default {FULL['warmup']})")
    p.add_argument("--strides", default=None, help=f"offload: retrieval strides (default {FULL['strides']})")
    p.add_argument("--ratios", default=None, help=f"offload: budget ratios in (0, 1) (default {FULL['ratios']})")
    p.add_argument("--skip-retrieval", action="store_true", help="do not run the retrieval benchmark")
    p.add_argument("--skip-offload", action="store_true", help="do not run the offload benchmark")


def _ints(option: str, text: str, minimum: int) -> list[int]:
    try:
        vals = [int(x) for x in text.split(",")]
    except ValueError:
        raise BenchArgumentError(f"{option} must be comma-separated integers, got {text!r}") from None
    bad = [v for v in vals if v < minimum]
    if bad:
        raise BenchArgumentError(f"{option} values must be >= {minimum}, got {text!r}")
    return vals


def _int(option: str, text: str | int, minimum: int) -> int:
    vals = _ints(option, str(text), minimum)
    if len(vals) != 1:
        raise BenchArgumentError(f"{option} must be one integer, got {text!r}")
    return vals[0]


def _ratios(option: str, text: str) -> list[float]:
    try:
        vals = [float(x) for x in text.split(",")]
    except ValueError:
        raise BenchArgumentError(f"{option} must be comma-separated numbers, got {text!r}") from None
    if any(not 0 < v < 1 for v in vals):
        raise BenchArgumentError(f"{option} values must be in (0, 1), got {text!r}")
    return vals


def resolve(args: argparse.Namespace) -> dict[str, Any]:
    """Options -> settings (defaults from FULL or QUICK); raises BenchArgumentError on bad values."""
    d = QUICK if args.quick else FULL
    if args.skip_retrieval and args.skip_offload:
        raise BenchArgumentError("--skip-retrieval and --skip-offload together leave nothing to run")
    return {
        "quick": bool(args.quick),
        "blocks": _ints("--blocks", args.blocks or d["blocks"], 8),
        "threads": _ints("--threads", args.threads or d["threads"], 1),
        "repeats": _int("--repeats", args.repeats if args.repeats is not None else d["repeats"], 1),
        "warmup": _int("--warmup", args.warmup if args.warmup is not None else d["warmup"], 0),
        "strides": _ints("--strides", args.strides or d["strides"], 1),
        "ratios": _ratios("--ratios", args.ratios or d["ratios"]),
        "layers": d["layers"],
        "prompt_tokens": d["prompt_tokens"],
        "decode_steps": d["decode_steps"],
        "out": args.out or (QUICK_OUT if args.quick else DEFAULT_OUT),
        "retrieval": not args.skip_retrieval,
        "offload": not args.skip_offload,
    }


def _progress(msg: str) -> None:
    print(f"[ucm-trt bench] {msg}", file=sys.stderr, flush=True)


def run_bench(settings: dict[str, Any], *, command: str) -> dict[str, Any]:
    """Run the benchmarks in ``settings`` and return the JSON-ready result."""
    import torch

    from ucm_trt.bench.cpu import (
        SCHEMA_VERSION,
        TARGET_BLOCKS,
        TARGET_MS_PER_STEP,
        OffloadSetup,
        RetrievalShape,
        bench_offload,
        bench_retrieval,
        machine_facts,
        python_overhead,
    )
    from ucm_trt.config import Budget, SparseConfig

    result: dict[str, Any] = {"schema_version": SCHEMA_VERSION, "command": command,
                              "machine": machine_facts(), "settings": dict(settings)}
    result["machine"]["note"] = ("shared VM: other jobs run concurrently, see load_average; timings are noisy "
                                 "and upper bounds of what the code costs on an idle core")
    if settings["retrieval"]:
        shape = RetrievalShape(num_layers=settings["layers"])
        sparse = SparseConfig(block_size=shape.block_size, budget=Budget.ratio(0.125))
        rows = bench_retrieval(shape=shape, num_blocks=settings["blocks"], threads=settings["threads"],
                               sparse=sparse, warmup=settings["warmup"], repeats=settings["repeats"],
                               progress=_progress)
        _progress("retrieval: per-call overhead at a tiny block count")
        over = python_overhead(shape, sparse, warmup=settings["warmup"], repeats=settings["repeats"],
                               threads=settings["threads"][0])
        result["retrieval"] = {
            "shape": {"num_layers": shape.num_layers, "num_heads": shape.num_heads,
                      "num_kv_heads": shape.num_kv_heads, "head_dim": shape.head_dim,
                      "block_size": shape.block_size},
            "sparse": {"budget": "ratio 0.125", "sink_blocks": sparse.sink_blocks,
                       "local_blocks": sparse.local_blocks, "selection": sparse.selection},
            "target": {"ms_per_step_per_seq": TARGET_MS_PER_STEP, "num_blocks": TARGET_BLOCKS,
                       "source": "DESIGN.md section 5"},
            "rows": rows,
            "per_call_overhead": over,
        }
    if settings["offload"]:
        setup = OffloadSetup(prompt_tokens=settings["prompt_tokens"], decode_steps=settings["decode_steps"])
        threads_before = torch.get_num_threads()
        torch.set_num_threads(1)  # decode-sized ops; a second thread only contends on a shared 2-core box
        try:
            rows = bench_offload(setup=setup, algorithms=("esa", "gsa"), strides=settings["strides"],
                                 ratios=settings["ratios"], progress=_progress)
        finally:
            torch.set_num_threads(threads_before)
        result["offload"] = {"model": {f: getattr(setup, f) for f in setup.__dataclass_fields__},
                             "torch_threads": 1, "rows": rows}
    result["machine"]["load_average_at_end"] = machine_facts()["load_average_1_5_15"]
    return result


def format_tables(result: dict[str, Any]) -> str:
    lines = []
    if "retrieval" in result:
        lines.append("CPU retrieval per decode step per sequence (median ms; target <= "
                     f"{result['retrieval']['target']['ms_per_step_per_seq']} ms at "
                     f"{result['retrieval']['target']['num_blocks']} blocks)")
        lines.append(f"{'blocks':>7} {'tokens':>8} {'threads':>7} {'variant':>22} {'ms/step':>9} {'us/layer':>9} {'read floor ms':>13}")
        for r in result["retrieval"]["rows"]:
            lines.append(f"{r['num_blocks']:>7} {r['context_tokens']:>8} {r['threads']:>7} {r['variant']:>22} "
                         f"{r['ms_per_step_per_seq']:>9.2f} {r['us_per_layer']:>9.1f} {r['read_floor_ms']:>13.2f}")
    if "offload" in result:
        lines.append("Offload (tiny Llama, runtime Engine, torch backend, CPU)")
        lines.append(f"{'alg':>4} {'stride':>6} {'ratio':>6} {'bytes/step':>11} {'hit rate':>8} {'bytes rule':>10}")
        for r in result["offload"]["rows"]:
            hit = "-" if r["cache_hit_rate"] is None else f"{r['cache_hit_rate']:.3f}"
            bps = "-" if r["decode_bytes_h2d_per_step_mean"] is None else f"{r['decode_bytes_h2d_per_step_mean']:.0f}"
            lines.append(f"{r['algorithm']:>4} {r['retrieval_stride']:>6} {r['budget_ratio']:>6} {bps:>11} {hit:>8} "
                         f"{'ok' if r['bytes_equal_loaded_blocks_x_block_bytes'] else 'VIOLATED':>10}")
    return "\n".join(lines)


def check_out(args: argparse.Namespace, settings: dict[str, Any], *, create_dirs: bool = True) -> Path:
    """The JSON path, checked before any work: its folder must exist, or be created for the default
    path (said on stderr) or with ``--make-dirs``."""
    from ucm_trt import cli_args

    try:
        if args.out is not None:
            return cli_args.output_file("--out", args.out, make_dirs=args.make_dirs, create=create_dirs)
        out = Path(settings["out"])
        created = not out.parent.is_dir()
        cli_args.output_file("--out (default)", out, make_dirs=True, create=create_dirs)
    except cli_args.FlagError as exc:
        raise BenchArgumentError(str(exc)) from None
    if created and create_dirs:
        _progress(f"created the default output folder {out.parent}/")
    return out


def check_bench_args(args: argparse.Namespace, *, create_dirs: bool = True) -> tuple[dict[str, Any], Path]:
    """Every flag check of ``ucm-trt bench``: (settings, JSON path); ``create_dirs=False`` checks only."""
    settings = resolve(args)
    return settings, check_out(args, settings, create_dirs=create_dirs)


def run_bench_command(args: argparse.Namespace, *, command: str) -> int:
    settings, out = check_bench_args(args)
    result = run_bench(settings, command=command)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(format_tables(result))
    print(f"wrote {out}")
    return 0
