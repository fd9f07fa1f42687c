"""``ucm-trt run``: generate for one prompt with a UCM algorithm and print the text and the stats.

Wired into the ``ucm-trt`` CLI by :func:`add_run_parser` / :func:`run_command`; also runnable as
``python -m ucm_trt.runtime.cli_run ...``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

__all__ = ["RUN_ALGORITHMS", "add_arguments", "add_run_parser", "build_engine", "main", "run_command"]

# Same as ucm_trt.runtime.algorithms.ALGORITHMS (a test checks); repeated so --help imports no torch.
RUN_ALGORITHMS = ("dense", "esa", "gsa", "gsa-on-device", "kvstar", "rerope")


def add_run_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("run", help="generate for one prompt with a UCM sparse-attention algorithm",
                       description=__doc__)
    add_arguments(p)
    p.set_defaults(func=run_command)
    return p


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Add the ``run`` options to ``p`` (argparse only: no heavy imports)."""
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="prompt text")
    src.add_argument("--prompt-file", type=Path, help="file holding the prompt text")
    p.add_argument("--algorithm", choices=RUN_ALGORITHMS, default="dense")
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
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    g = p.add_argument_group("sparse attention")
    g.add_argument("--block-size", type=int, default=32)
    g.add_argument("--ratio", type=float, default=0.25, help="fraction of candidate blocks kept (Budget.ratio)")
    g.add_argument("--sink-blocks", type=int, default=1)
    g.add_argument("--local-blocks", type=int, default=2)
    g.add_argument("--min-blocks", type=int, default=4)
    g.add_argument("--stride", type=int, default=4, help="retrieval stride (ESA/GSA)")
    g.add_argument("--selection", choices=("shared", "per_head"), default="shared")
    g.add_argument("--kvstar-stride", type=int, default=8)
    g.add_argument("--top-k-tokens", type=int, default=512, help="GSA On-Device tokens kept")
    g.add_argument("--seq-len-threshold", type=int, default=0, help="GSA On-Device gate")
    g.add_argument("--rollback-layers", default="", help="GSA On-Device dense layers, e.g. 0,1")
    g.add_argument("--rerope-window", type=int, default=512)
    g.add_argument("--rerope-training-length", type=int, default=8192)
    g.add_argument("--no-logn", action="store_true")
    r = p.add_argument_group("runtime")
    r.add_argument("--max-seq-len", type=int, default=None, help="default: prompt + max-new-tokens")
    r.add_argument("--prefill-chunk", type=int, default=512)
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


def build_engine(args, model, prompt_len: int):
    """Engine for the parsed ``args`` (shared by the CLI and the benchmarks)."""
    from ucm_trt.config import Budget, GSAOnDeviceConfig, KVStarConfig, ReRoPEConfig, SparseConfig
    from ucm_trt.runtime import Engine, RuntimeConfig
    from ucm_trt.runtime.algorithms import make_policy, sparse_config_for
    from ucm_trt.runtime.backends.torch_backend import TorchBackend

    alg = args.algorithm
    stride = args.kvstar_stride if alg == "kvstar" else args.stride
    sparse = sparse_config_for(alg, SparseConfig(
        block_size=args.block_size, budget=Budget.ratio(args.ratio), sink_blocks=args.sink_blocks,
        local_blocks=args.local_blocks, min_blocks=args.min_blocks, retrieval_stride=stride,
        selection=args.selection))
    kw = {}
    if alg == "kvstar":
        kw["kvstar"] = KVStarConfig(retrieval_stride=args.kvstar_stride)
    elif alg == "gsa-on-device":
        rollback = tuple(int(x) for x in args.rollback_layers.split(",") if x.strip())
        kw["gsa_on_device"] = GSAOnDeviceConfig(top_k_tokens=args.top_k_tokens,
                                                seq_len_threshold=args.seq_len_threshold,
                                                rollback_layers=rollback)
    elif alg == "rerope":
        kw["rerope"] = ReRoPEConfig(window=args.rerope_window, training_length=args.rerope_training_length,
                                    logn=not args.no_logn)
    max_seq = args.max_seq_len or prompt_len + args.max_new_tokens
    rt = RuntimeConfig(max_batch=1, max_seq_len=max_seq, prefill_chunk=args.prefill_chunk,
                       cache_blocks=args.cache_blocks, num_device_blocks=args.device_blocks,
                       retrieval_threads=args.retrieval_threads)
    if getattr(args, "backend", None) == "ort":
        from ucm_trt.runtime.backends.ort_backend import OrtBackend

        backend = OrtBackend(args.onnx)
    else:
        backend = TorchBackend(model)
    return Engine(backend, make_policy(alg, **kw), sparse=sparse, config=rt)


def run_command(args) -> int:
    from ucm_trt.runtime import SamplingParams

    if args.backend is None:
        args.backend = "ort" if args.onnx is not None else "torch"
    if args.backend == "ort" and args.onnx is None:
        raise ValueError("--backend ort needs --onnx PATH (a model rewritten by 'ucm-trt rewrite')")
    if args.backend == "torch" and args.onnx is not None:
        raise ValueError("--onnx is only used by --backend ort")
    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {args.threads}")
        import torch

        torch.set_num_threads(args.threads)
    if args.prompt_file is not None and not args.prompt_file.is_file():
        raise ValueError(f"--prompt-file {str(args.prompt_file)!r} is not a file")
    text = args.prompt if args.prompt is not None else args.prompt_file.read_text()
    model, tok = _load_model(args)
    if args.chat:
        ids = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                      tokenize=True, return_dict=False)
        if isinstance(ids, dict) or hasattr(ids, "input_ids"):
            ids = ids["input_ids"]
    else:
        ids = tok(text)["input_ids"]
    stops = []
    if tok.eos_token_id is not None:
        stops.append(int(tok.eos_token_id))
    im_end = tok.convert_tokens_to_ids("<|im_end|>") if "<|im_end|>" in tok.get_vocab() else None
    if im_end is not None and im_end not in stops:
        stops.append(int(im_end))
    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                            seed=args.seed, stop_token_ids=tuple(stops))
    engine = build_engine(args, model, len(ids))
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
        for k, v in stats.items():
            if isinstance(v, float):
                v = f"{v:.4g}"
            print(f"{k}: {v}")
    return 0


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
