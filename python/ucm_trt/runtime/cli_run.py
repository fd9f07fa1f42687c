"""``ucm-trt run``: generate for one prompt with a UCM algorithm and print the text and the stats.

``--algorithm blend`` takes the prompt as reusable document chunks (``--chunk TEXT`` /
``--chunk-file PATH``, repeatable, in order) followed by the question (``--prompt`` /
``--prompt-file``). Each chunk is tokenized on its own, padded to a block boundary with a pad
token (Blend caches whole blocks), and cached at position 0 as if an earlier request had sent it;
then the request is prefilled reusing those blocks at their new offsets (delta-RoPE) with a
selective recompute from ``--recompute-layer``, and decoded with dense attention.
``--compare-full`` also runs a plain full prefill of the same tokens and reports both TTFTs and
the greedy agreement.

Wired into the ``ucm-trt`` CLI by :func:`add_run_parser` / :func:`run_command`; also runnable as
``python -m ucm_trt.runtime.cli_run ...``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from ucm_trt import algorithms as registry

__all__ = ["RUN_ALGORITHMS", "add_arguments", "add_run_parser", "build_engine", "check_args", "main", "run_command"]

# the registry's names (ucm_trt.algorithms imports no torch, so --help stays instant)
RUN_ALGORITHMS = registry.names()

# BlendConfig's defaults (a test checks), repeated so --help imports no torch.
BLEND_DEFAULTS = {"recompute_layer": 1, "recompute_ratio": 0.2, "min_reused_blocks": 1}
_BLEND_ONLY = (("chunks", "--chunk/--chunk-file"), ("recompute_layer", "--recompute-layer"),
               ("recompute_ratio", "--recompute-ratio"), ("min_reused_blocks", "--min-reused-blocks"),
               ("chunk_pad_token", "--chunk-pad-token"), ("compare_full", "--compare-full"))
_DEFAULT_PREFILL_CHUNK = 512


def add_run_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("run", help="generate for one prompt with a UCM sparse-attention algorithm",
                       description=__doc__)
    add_arguments(p)
    p.set_defaults(func=run_command)
    return p


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Add the ``run`` options to ``p`` (argparse only: no heavy imports)."""
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="prompt text (with --algorithm blend: the question after the chunks)")
    src.add_argument("--prompt-file", type=Path, help="file holding the prompt text")
    p.add_argument("--algorithm", choices=RUN_ALGORITHMS, default="dense",
                   help="dense (default), a sparse decode policy (esa, gsa, gsa-on-device, kvstar), rerope, or "
                        "blend (reuse of cached document chunks at prefill; give them with --chunk/--chunk-file)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--model", default="smollm2",
                   help="'smollm2' (the bundled SmolLM2-135M-Instruct) or a Hugging Face checkpoint directory")
    p.add_argument("--backend", choices=("torch", "ort"), default=None,
                   help="torch: the Hugging Face model through the paged attention (default); ort: ONNX Runtime "
                        "on a model rewritten by 'ucm-trt rewrite' (give it with --onnx; default when --onnx is given)")
    p.add_argument("--onnx", type=Path, default=None,
                   help="rewritten ONNX model for the ort backend (its block size must match --block-size); "
                        "--model still names the tokenizer")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    checks = p.add_mutually_exclusive_group()
    checks.add_argument("--validate", action="store_true",
                        help="torch backend, debugging: the Triton kernels also check their index tensors at every "
                             "launch (reads them back to the host: 2*B+2 syncs per layer per step, and no CUDA "
                             "graphs). Off by default: the runtime checks its tables and selections on the host "
                             "when it builds them")
    checks.add_argument("--no-validate", action="store_true",
                        help="the default (no per-launch checks); kept so older command lines still run")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    g = p.add_argument_group("sparse attention")
    g.add_argument("--block-size", type=int, default=32)
    g.add_argument("--ratio", type=float, default=0.25, help="fraction of candidate blocks kept (Budget.ratio)")
    g.add_argument("--sink-blocks", type=int, default=1)
    g.add_argument("--local-blocks", type=int, default=2)
    g.add_argument("--min-blocks", type=int, default=4)
    g.add_argument("--stride", type=int, default=4, help="retrieval stride (ESA/GSA)")
    g.add_argument("--selection", choices=("shared", "per_head"), default=None,
                   help="default: SparseConfig's (shared)")
    g.add_argument("--preset", choices=("default", "ucm"), default="default",
                   help="ucm-trt's defaults, or upstream UCM's settings (shared selection, no dense layers)")
    g.add_argument("--dense-layers", default="auto", metavar="auto|none|L,L,...",
                   help="layers the sparse policies run dense: auto (the preset's: detected per request with "
                        "--preset default), none, or a comma list of layer indices")
    g.add_argument("--kvstar-stride", type=int, default=8)
    g.add_argument("--top-k-tokens", type=int, default=512, help="GSA On-Device tokens kept")
    g.add_argument("--seq-len-threshold", type=int, default=0, help="GSA On-Device gate")
    g.add_argument("--rollback-layers", default="", help="GSA On-Device dense layers, e.g. 0,1")
    g.add_argument("--rerope-window", type=int, default=512)
    g.add_argument("--rerope-training-length", type=int, default=8192)
    g.add_argument("--no-logn", action="store_true")
    b = p.add_argument_group(
        "blend (--algorithm blend; PyTorch backend only)",
        "The prompt is the chunks, in the order given, then the --prompt/--prompt-file question.\n"
        "Each chunk is tokenized alone, padded to a multiple of --block-size with --chunk-pad-token\n"
        "and cached at position 0 first (as if earlier requests had sent it), then reused at its\n"
        "offset in this prompt.")
    b.add_argument("--chunk", dest="chunks", action="append", type=lambda v: ("text", v), metavar="TEXT",
                   help="a reusable document chunk (repeatable)")
    b.add_argument("--chunk-file", dest="chunks", action="append", type=lambda v: ("file", v), metavar="PATH",
                   help="a file holding one reusable document chunk (repeatable; mixes with --chunk in order)")
    b.add_argument("--recompute-layer", type=int, default=None, metavar="L",
                   help=f"layer from which only the most-deviating reused tokens are recomputed; earlier layers "
                        f"recompute every token (BlendConfig.recompute_layer, default "
                        f"{BLEND_DEFAULTS['recompute_layer']})")
    b.add_argument("--recompute-ratio", type=float, default=None, metavar="R",
                   help=f"fraction of reused tokens recomputed from --recompute-layer on, in [0, 1]; 1.0 "
                        f"reproduces a full prefill (BlendConfig.recompute_ratio, default "
                        f"{BLEND_DEFAULTS['recompute_ratio']})")
    b.add_argument("--min-reused-blocks", type=int, default=None, metavar="N",
                   help=f"fewer reused blocks than this fall back to a full prefill, reported in the stats "
                        f"(BlendConfig.min_reused_blocks, default {BLEND_DEFAULTS['min_reused_blocks']})")
    b.add_argument("--chunk-pad-token", type=int, default=None, metavar="ID",
                   help="token id that pads each chunk to a block boundary (default: the tokenizer's pad token, "
                        "else its EOS token)")
    b.add_argument("--compare-full", action="store_true",
                   help="also generate with a plain full prefill of the same tokens; report its TTFT, the speedup "
                        "and the greedy agreement (needs --temperature 0)")
    r = p.add_argument_group("runtime")
    r.add_argument("--max-seq-len", type=int, default=None, help="default: prompt + max-new-tokens")
    r.add_argument("--prefill-chunk", type=int, default=None,
                   help=f"prompt tokens per prefill step (default {_DEFAULT_PREFILL_CHUNK}; blend: the whole "
                        "prompt, which Blend prefills in one step)")
    r.add_argument("--cache-blocks", type=int, default=2)
    r.add_argument("--device-blocks", type=int, default=None, help="device pool blocks per layer (offload)")
    r.add_argument("--retrieval-threads", type=int, default=2)
    s = p.add_argument_group("sampling")
    s.add_argument("--temperature", type=float, default=0.0)
    s.add_argument("--top-p", type=float, default=1.0)
    s.add_argument("--seed", type=int, default=None)
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads (default: torch's choice); 1 is often fastest on small shared CPUs")
    p.add_argument("--json", action="store_true", help="print one JSON object (text + stats)")


def _load_tokenizer(args):
    from transformers import AutoTokenizer

    if args.model == "smollm2":
        from ucm_trt.models import smollm2_checkpoint_dir

        path = smollm2_checkpoint_dir()
    else:
        path = Path(args.model)
        if not path.is_dir():
            raise ValueError(f"--model must be 'smollm2' or a checkpoint directory, got {args.model!r}")
    return AutoTokenizer.from_pretrained(path, local_files_only=True)


def _load_named_model(args):
    """:func:`_load_model`; a checkpoint that transformers cannot load is a one-line error naming --model."""
    try:
        return _load_model(args)
    except (ValueError, TypeError, OSError) as exc:
        if args.model == "smollm2":
            raise
        raise ValueError(f"--model {args.model!r} cannot be loaded ({type(exc).__name__}: {_first_line(exc)})") from None


def _load_model(args):
    import torch

    if args.backend == "ort":  # the ONNX model carries the weights; only the tokenizer is needed
        return None, _load_tokenizer(args)
    dtype = getattr(torch, args.dtype)
    if args.model == "smollm2":
        from ucm_trt.models import load_smollm2

        model, tok = load_smollm2(dtype=dtype)
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        path = Path(args.model)
        if not path.is_dir():
            raise ValueError(f"--model must be 'smollm2' or a checkpoint directory, got {args.model!r}")
        tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True).eval()
    return model.to(args.device), tok


def _parse_dense_layers(spec: str):
    from ucm_trt.config import DenseLayers

    if spec == "none":
        return DenseLayers()
    try:
        layers = tuple(int(x) for x in spec.split(",") if x.strip())
    except ValueError:
        raise ValueError(f"--dense-layers must be auto, none or a comma list of layer indices, got {spec!r}") from None
    return DenseLayers(layers=layers)


def build_engine(args, model, prompt_len: int, *, backend=None):
    """Engine for the parsed ``args`` (shared by the CLI and the benchmarks); ``backend``: an already
    opened backend (``ucm-trt run`` opens the ONNX model first, to check it before the tokenizer)."""
    from ucm_trt.config import Budget, GSAOnDeviceConfig, KVStarConfig, ReRoPEConfig, SparseConfig
    from ucm_trt.runtime import Engine, RuntimeConfig
    from ucm_trt.runtime.algorithms import make_policy, sparse_config_for
    from ucm_trt.runtime.backends.torch_backend import TorchBackend

    alg = args.algorithm
    policy_alg = "dense" if alg == "blend" else alg  # Blend prefills through BlendRunner, then decodes dense
    stride = args.kvstar_stride if alg == "kvstar" else args.stride
    preset = getattr(args, "preset", "default")
    base = SparseConfig(block_size=args.block_size, budget=Budget.ratio(args.ratio), sink_blocks=args.sink_blocks,
                        local_blocks=args.local_blocks, min_blocks=args.min_blocks, retrieval_stride=stride)
    sparse = sparse_config_for(alg, base, preset=preset)
    if getattr(args, "selection", None) is not None:
        sparse = dataclasses.replace(sparse, selection=args.selection)
    kw = {"preset": preset}
    dense_spec = getattr(args, "dense_layers", "auto")
    if policy_alg in ("esa", "gsa", "gsa-on-device", "kvstar") and dense_spec != "auto":
        kw["dense_layers"] = _parse_dense_layers(dense_spec)
    if alg == "kvstar":
        kw["kvstar"] = KVStarConfig(retrieval_stride=args.kvstar_stride)
    elif alg == "gsa-on-device":
        rollback = _parse_rollback_layers(args.rollback_layers)
        kw["gsa_on_device"] = GSAOnDeviceConfig(top_k_tokens=args.top_k_tokens,
                                                seq_len_threshold=args.seq_len_threshold,
                                                rollback_layers=rollback)
    elif alg == "rerope":
        kw["rerope"] = ReRoPEConfig(window=args.rerope_window, training_length=args.rerope_training_length,
                                    logn=not args.no_logn)
    max_seq = args.max_seq_len or prompt_len + args.max_new_tokens
    prefill_chunk = getattr(args, "prefill_chunk", None)
    if prefill_chunk is None:
        prefill_chunk = prompt_len if alg == "blend" else _DEFAULT_PREFILL_CHUNK
    rt = RuntimeConfig(max_batch=1, max_seq_len=max_seq, prefill_chunk=prefill_chunk,
                       cache_blocks=args.cache_blocks, num_device_blocks=args.device_blocks,
                       retrieval_threads=args.retrieval_threads)
    if backend is not None:
        pass
    elif getattr(args, "backend", None) == "ort":
        from ucm_trt.runtime.backends.ort_backend import OrtBackend

        backend = OrtBackend(args.onnx)
    else:
        backend = TorchBackend(model, validate=getattr(args, "validate", False))
    return Engine(backend, make_policy(policy_alg, **kw), sparse=sparse, config=rt)


# --backend value -> the registry's backend kind
_BACKEND_KINDS = {"torch": "torch", "ort": "onnxruntime"}


def _check_backend(args) -> None:
    """The registry's backend rule (ucm_trt.algorithms), said in flags."""
    try:
        registry.check_backend(args.algorithm, _BACKEND_KINDS[args.backend])
    except registry.IncompatibleAlgorithmError as exc:
        ok = " or ".join(f for f, k in _BACKEND_KINDS.items() if k in registry.get(args.algorithm).backends)
        chosen = " (chosen by --onnx)" if args.onnx is not None else ""
        raise ValueError(f"--algorithm {args.algorithm} needs --backend {ok}, got --backend {args.backend}{chosen}: "
                         f"{exc}") from None


def check_args(args, *, create_dirs: bool = True) -> str:
    """Check every flag before anything loads (a bad command line fails at once, naming the flag);
    returns the prompt text (``--prompt``, or ``--prompt-file`` read as UTF-8). ``run`` writes no
    files, so ``create_dirs`` (the CLI's check-only flag) changes nothing."""
    from ucm_trt import cli_args as ca

    if args.backend is None:
        args.backend = "ort" if args.onnx is not None else "torch"
    _check_backend(args)
    if args.backend == "ort" and args.onnx is None:
        raise ValueError("--backend ort needs --onnx PATH (a model rewritten by 'ucm-trt rewrite')")
    if args.backend == "torch" and args.onnx is not None:
        raise ValueError("--onnx is only used by --backend ort")
    for flag in ("validate", "no_validate"):
        if getattr(args, flag, False) and args.backend != "torch":
            raise ValueError(f"--{flag.replace('_', '-')} applies to --backend torch (the Triton kernels' index checks)")
    dev = str(args.device)
    if dev != "cpu" and not (dev == "cuda" or (dev.startswith("cuda:") and dev[5:].isdigit())):
        raise ValueError(f"--device must be cpu or cuda[:N], got {dev!r}")
    ca.int_at_least("--max-new-tokens", args.max_new_tokens, 1)
    ca.block_size("--block-size", args.block_size)
    ca.fraction("--ratio", args.ratio, what="the fraction of candidate blocks kept")
    for flag, value, minimum in (
        ("--sink-blocks", args.sink_blocks, 0), ("--local-blocks", args.local_blocks, 1),
        ("--min-blocks", args.min_blocks, 1), ("--stride", args.stride, 1), ("--kvstar-stride", args.kvstar_stride, 1),
        ("--top-k-tokens", args.top_k_tokens, 1), ("--seq-len-threshold", args.seq_len_threshold, 0),
        ("--rerope-window", args.rerope_window, 1), ("--rerope-training-length", args.rerope_training_length, 1),
        ("--cache-blocks", args.cache_blocks, 0), ("--retrieval-threads", args.retrieval_threads, 1),
    ):
        ca.int_at_least(flag, value, minimum)
    for flag, value, minimum in (("--max-seq-len", args.max_seq_len, 1), ("--prefill-chunk", args.prefill_chunk, 1),
                                 ("--device-blocks", args.device_blocks, 2), ("--threads", args.threads, 1),
                                 ("--seed", args.seed, 0)):
        if value is not None:
            ca.int_at_least(flag, value, minimum)
    if args.rerope_window > args.rerope_training_length:
        raise ValueError(f"--rerope-window ({args.rerope_window}) must be <= --rerope-training-length "
                         f"({args.rerope_training_length})")
    if args.algorithm == "gsa-on-device":
        _parse_rollback_layers(args.rollback_layers)
    if not (args.temperature >= 0 and args.temperature != float("inf")):  # NaN fails too
        raise ValueError(f"--temperature must be a finite number >= 0, got {args.temperature}")
    ca.fraction("--top-p", args.top_p)
    if args.model != "smollm2":
        ca.checkpoint_dir("--model", args.model)
    if args.onnx is not None:
        ca.input_file("--onnx", args.onnx)
    if args.prompt_file is not None:
        text = ca.text_file("--prompt-file", args.prompt_file)
    elif not args.prompt.strip():
        raise ValueError("--prompt is empty; give the text to generate from")
    else:
        text = args.prompt
    if args.algorithm != "blend":
        given = [flag for dest, flag in _BLEND_ONLY if getattr(args, dest, None) is not None
                 and getattr(args, dest) is not False]
        if given:
            raise ValueError(f"{', '.join(given)} only apply to --algorithm blend, got --algorithm {args.algorithm}")
        return text
    if not args.chunks:
        raise ValueError("--algorithm blend needs at least one --chunk TEXT or --chunk-file PATH (the reusable "
                         "document chunks; --prompt/--prompt-file is the question after them)")
    for i, (kind, value) in enumerate(args.chunks):
        if kind == "file":
            ca.text_file("--chunk-file", value)
        elif not value.strip():
            raise ValueError(f"--chunk number {i + 1} is empty; every chunk needs text")
    ratio = args.recompute_ratio
    if ratio is not None:
        ca.fraction("--recompute-ratio", ratio, allow_zero=True, what="a fraction of the reused tokens")
    if args.recompute_layer is not None and args.recompute_layer < 0:
        raise ValueError(f"--recompute-layer must be >= 0, got {args.recompute_layer}")
    if args.min_reused_blocks is not None and args.min_reused_blocks < 1:
        raise ValueError(f"--min-reused-blocks must be >= 1, got {args.min_reused_blocks}")
    if args.chunk_pad_token is not None and args.chunk_pad_token < 0:
        raise ValueError(f"--chunk-pad-token must be a token id >= 0, got {args.chunk_pad_token}")
    if args.chat:
        raise ValueError("--chat does not apply to --algorithm blend: the chunks are cached at position 0, so they "
                         "must start the prompt, before any chat-template text")
    if args.compare_full and args.temperature != 0:
        raise ValueError(f"--compare-full compares greedy outputs and needs --temperature 0, got {args.temperature}")
    return text


def _parse_rollback_layers(text: str) -> tuple[int, ...]:
    try:
        layers = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise ValueError(f"--rollback-layers must be comma-separated layer numbers, got {text!r}") from None
    if any(i < 0 for i in layers):
        raise ValueError(f"--rollback-layers must be >= 0, got {text!r}")
    return layers


def _open_onnx(args):
    """The ONNX Runtime backend over ``--onnx``; a file ONNX Runtime cannot load, a model not rewritten
    by ``ucm-trt rewrite``, or one rewritten with another block size is a one-line error naming the flag."""
    from ucm_trt.runtime.backends.ort_backend import OrtBackend

    path = str(args.onnx)
    try:
        backend = OrtBackend(args.onnx)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"--onnx {path!r}: {_first_line(exc)}") from None
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own exception types (InvalidProtobuf ...)
        raise ValueError(f"--onnx {path!r} cannot be loaded by ONNX Runtime ({type(exc).__name__}: "
                         f"{_first_line(exc)})") from None
    if backend.block_size != args.block_size:
        raise ValueError(f"--block-size {args.block_size} differs from the block size {path!r} was rewritten with "
                         f"({backend.block_size}); pass --block-size {backend.block_size}")
    return backend


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _sampling(args, tok):
    from ucm_trt.runtime import SamplingParams

    stops = []
    if tok.eos_token_id is not None:
        stops.append(int(tok.eos_token_id))
    im_end = tok.convert_tokens_to_ids("<|im_end|>") if "<|im_end|>" in tok.get_vocab() else None
    if im_end is not None and im_end not in stops:
        stops.append(int(im_end))
    return SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                          seed=args.seed, stop_token_ids=tuple(stops))


def _print_stats(stats: dict, prefix: str = "") -> None:
    for k, v in stats.items():
        if isinstance(v, dict) and v:
            _print_stats(v, f"{prefix}{k}.")
            continue
        if isinstance(v, float):
            v = f"{v:.4g}"
        print(f"{prefix}{k}: {v}")


# Config fields the runtime names in its errors -> the flags that set them (``ucm-trt run`` reports flags).
_FIELD_FLAGS = (
    ("RuntimeConfig.max_seq_len", "--max-seq-len"), ("RuntimeConfig.num_device_blocks", "--device-blocks"),
    ("RuntimeConfig.prefill_chunk", "--prefill-chunk"), ("RuntimeConfig.cache_blocks", "--cache-blocks"),
    ("RuntimeConfig.retrieval_threads", "--retrieval-threads"), ("SparseConfig.block_size", "--block-size"),
    ("SparseConfig.sink_blocks", "--sink-blocks"), ("SparseConfig.local_blocks", "--local-blocks"),
    ("SparseConfig.min_blocks", "--min-blocks"), ("SparseConfig.retrieval_stride", "--stride"),
    ("Budget.value", "--ratio"), ("KVStarConfig.retrieval_stride", "--kvstar-stride"),
    ("GSAOnDeviceConfig.top_k_tokens", "--top-k-tokens"), ("GSAOnDeviceConfig.seq_len_threshold", "--seq-len-threshold"),
    ("GSAOnDeviceConfig names layer", "--rollback-layers names layer"),
    ("ReRoPEConfig.window", "--rerope-window"), ("ReRoPEConfig.training_length", "--rerope-training-length"),
    ("SamplingParams.temperature", "--temperature"), ("SamplingParams.top_p", "--top-p"),
    ("SamplingParams.seed", "--seed"), ("SamplingParams.max_new_tokens", "--max-new-tokens"),
)


def _flag_words(message: str) -> str:
    for field, flag in _FIELD_FLAGS:
        message = message.replace(field, flag)
    return message


def run_command(args) -> int:
    """``ucm-trt run``; an error the runtime raises about a setting names the flag that set it."""
    try:
        return _run_command(args)
    except ValueError as exc:
        raise ValueError(_flag_words(str(exc))) from None
    except TypeError as exc:
        raise TypeError(_flag_words(str(exc))) from None


def _run_command(args) -> int:
    text = check_args(args)
    import torch

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if str(args.device).startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {args.device}: no CUDA device is available (torch.cuda.is_available() is False)")
    if args.algorithm == "blend":
        return _run_blend(args, text)
    backend = _open_onnx(args) if args.backend == "ort" else None
    model, tok = _load_named_model(args)
    if args.chat:
        ids = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                      tokenize=True, return_dict=False)
        if isinstance(ids, dict) or hasattr(ids, "input_ids"):
            ids = ids["input_ids"]
    else:
        ids = tok(text)["input_ids"]
    params = _sampling(args, tok)
    engine = build_engine(args, model, len(ids), backend=backend)
    try:
        if args.json:
            [res] = engine.generate(ids, params)
        else:
            def stream(_rid, token):
                sys.stdout.write(tok.decode([token], skip_special_tokens=True))
                sys.stdout.flush()

            [res] = engine.generate(ids, params, on_token=stream)
            sys.stdout.write("\n")
        stats = engine.stats()
    finally:
        engine.close()
    out_text = tok.decode(res.token_ids, skip_special_tokens=True)
    stats.update(prompt_tokens=res.prompt_tokens, generated_tokens=len(res.token_ids),
                 finish_reason=res.finish_reason)
    if args.json:
        print(json.dumps({"text": out_text, "stats": stats}, default=str))
    else:
        print("--- stats ---")
        _print_stats(stats)
    return 0


# ------------------------------------------------------------------------------------------ blend


def _blend_inputs(args, tok, text: str, vocab_size: int) -> tuple[list[list[int]], list[int], list[int]]:
    """(padded chunks, suffix, pad tokens added per chunk). Each chunk is tokenized on its own
    without special tokens; a BOS the tokenizer would add starts the first chunk."""
    bs = args.block_size
    pad = args.chunk_pad_token
    if pad is None:
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        if pad is None:
            raise ValueError("the tokenizer has no pad or EOS token to pad the chunks to a block boundary; "
                             "give one with --chunk-pad-token ID")
    if pad >= vocab_size:
        raise ValueError(f"--chunk-pad-token must be < the model's vocabulary size ({vocab_size}), got {pad}")
    bos = tok.bos_token_id
    chunks, pads = [], []
    for i, (kind, value) in enumerate(args.chunks):
        body = value
        if kind == "file":
            try:
                body = Path(value).read_text(encoding="utf-8")
            except UnicodeDecodeError as exc:
                raise ValueError(f"--chunk-file {value!r} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
        ids = list(tok(body, add_special_tokens=False)["input_ids"])
        if not ids:
            where = f"--chunk-file {value!r}" if kind == "file" else f"--chunk number {i + 1}"
            raise ValueError(f"{where} is empty (0 tokens); every chunk needs at least one token")
        if i == 0 and bos is not None and tok(body)["input_ids"][:1] == [bos] and ids[:1] != [bos]:
            ids = [bos] + ids
        n_pad = -len(ids) % bs
        chunks.append(ids + [pad] * n_pad)
        pads.append(n_pad)
    suffix = list(tok(text, add_special_tokens=False)["input_ids"])
    if not suffix:
        raise ValueError("the question (--prompt/--prompt-file) is empty (0 tokens); Blend needs a suffix after "
                         "the chunks")
    return chunks, suffix, pads


def _agreement(a: list[int], b: list[int]) -> tuple[float, int]:
    """(fraction of positions, over the longer output, where both have the same token;
    length of the identical prefix)."""
    same = sum(x == y for x, y in zip(a, b, strict=False))
    prefix = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
    return same / max(len(a), len(b), 1), prefix


def _run_blend(args, text: str) -> int:
    import time

    from ucm_trt.config import BlendConfig
    from ucm_trt.runtime.blend import BlendRunner

    model, tok = _load_named_model(args)
    num_layers = int(model.config.num_hidden_layers)
    cfg = BlendConfig(**{k: v if getattr(args, k) is None else getattr(args, k) for k, v in BLEND_DEFAULTS.items()})
    if cfg.recompute_layer >= num_layers:
        raise ValueError(f"--recompute-layer must be < the model's {num_layers} layers, got {cfg.recompute_layer}")
    chunks, suffix, pads = _blend_inputs(args, tok, text, int(model.config.vocab_size))
    prompt = [t for c in chunks for t in c] + suffix
    params = _sampling(args, tok)
    engine = build_engine(args, model, len(prompt))
    try:
        runner = BlendRunner(engine, cfg)
        t0 = time.perf_counter()
        for c in chunks:  # as if earlier requests had sent each chunk on its own
            runner.cache_chunk(c)
        cache_s = time.perf_counter() - t0
        if args.json:
            res = runner.generate(chunks, suffix, params)
        else:
            def stream(_rid, token):
                sys.stdout.write(tok.decode([token], skip_special_tokens=True))
                sys.stdout.flush()

            res = runner.generate(chunks, suffix, params, on_token=stream)
            sys.stdout.write("\n")
        stats = engine.stats()
    finally:
        engine.close()
    out_text = tok.decode(res.token_ids, skip_special_tokens=True)
    rs = runner.stats
    stats.update(algorithm="blend", decode_algorithm=engine.policy.name, prompt_tokens=res.prompt_tokens,
                 generated_tokens=len(res.token_ids), finish_reason=res.finish_reason)
    blend = {
        "ttft_seconds": res.ttft_seconds,
        "chunks": len(chunks),
        "chunk_tokens": [len(c) for c in chunks],
        "chunk_pad_tokens": pads,
        "suffix_tokens": len(suffix),
        "recompute_layer": cfg.recompute_layer,
        "recompute_ratio": cfg.recompute_ratio,
        "min_reused_blocks": cfg.min_reused_blocks,
        "cached_blocks": len(runner.cache),
        "chunk_cache_seconds": cache_s,
        "fallback_to_full_prefill": bool(rs["fallbacks"]),
        "reused_blocks": rs["reused_blocks"],
        "reused_tokens": rs["reused_tokens"],
        "recomputed_tokens": rs["recomputed_tokens"],
    }
    full_text = None
    if args.compare_full:
        full = _full_prefill(args, model, prompt, params)
        full_text = tok.decode(full.token_ids, skip_special_tokens=True)
        agree, prefix = _agreement(res.token_ids, full.token_ids)
        blend.update(full_prefill_ttft_seconds=full.ttft_seconds,
                     ttft_speedup_vs_full=full.ttft_seconds / res.ttft_seconds if res.ttft_seconds > 0 else None,
                     greedy_agreement=agree, identical_prefix_tokens=prefix,
                     first_token_equal=bool(res.token_ids[:1] == full.token_ids[:1]),
                     full_prefill_generated_tokens=len(full.token_ids))
    stats["blend"] = blend
    if args.json:
        out = {"text": out_text, "stats": stats}
        if full_text is not None:
            out["full_prefill_text"] = full_text
        print(json.dumps(out, default=str))
    else:
        if full_text is not None:
            print("--- full prefill (--compare-full) ---")
            print(full_text)
        print("--- stats ---")
        _print_stats(stats)
    return 0


def _full_prefill(args, model, prompt: list[int], params):
    """The same tokens through a plain prefill on a fresh engine (same block size and prefill step),
    after a one-block warm-up so that its TTFT is as warm as the Blend request's."""
    from ucm_trt.runtime import SamplingParams

    engine = build_engine(args, model, len(prompt))
    try:
        engine.generate(prompt[: args.block_size], SamplingParams(max_new_tokens=1))
        [full] = engine.generate(prompt, params)
    finally:
        engine.close()
    return full

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ucm-trt run", description=__doc__)
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run_command(args)
    except (ValueError, TypeError) as exc:
        print(f"ucm-trt run: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
