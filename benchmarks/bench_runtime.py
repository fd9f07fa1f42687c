"""End-to-end runtime benchmark (GPU): decode tokens/s dense vs sparse, with and without offload.

Runs the generation engine (PyTorch backend, Triton kernels) on a Llama-3.2-1B-shaped model with
random weights (speed only) or on SmolLM2, for each context length and algorithm, and writes one
JSON file with the card's name. Example (one H200)::

    python benchmarks/bench_runtime.py --contexts 32768 131072 --algorithms dense esa gsa gsa-on-device \
        --decode-steps 64 --batch 1 --out benchmarks/results/runtime_h200.json

Per run it reports: prefill seconds, decode tokens/s, device KV bytes held at the last decode step
vs the dense equivalent, bytes moved host->device per decode step, cache hit rate, CPU retrieval
latency and the overlap achieved, and the policy's selected-block fraction. It also derives the
maximum number of concurrent sequences of each context that fit in the free GPU memory with the
measured per-sequence device KV (offload) vs the dense KV.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))

from ucm_trt.config import Budget, GSAOnDeviceConfig, KVStarConfig, ReRoPEConfig, SparseConfig  # noqa: E402
from ucm_trt.runtime import Engine, RuntimeConfig, SamplingParams, TorchBackend  # noqa: E402
from ucm_trt.runtime.algorithms import make_policy, sparse_config_for  # noqa: E402


def llama_1b_random(dtype: torch.dtype, device: str, max_positions: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                      num_attention_heads=32, num_key_value_heads=8, head_dim=64,
                      max_position_embeddings=max_positions, rope_theta=500000.0, tie_word_embeddings=True)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(cfg)
    return model.to(dtype).eval()


def load_model(name: str, dtype: torch.dtype, device: str, max_positions: int):
    if name == "llama1b-random":
        return llama_1b_random(dtype, device, max_positions)
    if name == "smollm2":
        from ucm_trt.models import load_smollm2

        model, _ = load_smollm2(dtype=dtype)
        return model.to(device)
    raise ValueError(f"--model must be llama1b-random or smollm2, got {name!r}")


def run_one(model, algorithm: str, ctx: int, args, cuda_graph: str) -> dict:
    kw = {}
    stride = args.stride
    if algorithm == "kvstar":
        kw["kvstar"] = KVStarConfig(retrieval_stride=args.stride)
    if algorithm == "rerope":
        # Llama-3.2-1B's window of 4096 inside a training length of 8192 (extrapolation to ctx)
        kw["rerope"] = ReRoPEConfig(window=args.rerope_window, training_length=args.rerope_training_length)
    if algorithm == "gsa-on-device":
        kw["gsa_on_device"] = GSAOnDeviceConfig(top_k_tokens=max(args.block_size * 8, int(ctx * args.ratio)),
                                                seq_len_threshold=0)
    sparse = sparse_config_for(algorithm, SparseConfig(block_size=args.block_size, budget=Budget.ratio(args.ratio),
                                                       retrieval_stride=stride))
    policy = make_policy(algorithm, **kw)
    bs = args.block_size
    max_seq = ctx + args.decode_steps + 1
    max_blocks = -(-max_seq // bs)
    device_blocks = None
    if policy.offload and args.offload_pool_fraction < 1.0:
        # room for one full prompt being prefilled plus the others' working sets
        device_blocks = max_blocks + int(args.batch * max_blocks * args.offload_pool_fraction) + 1
    graph = {"auto": None, "on": True, "off": False}[cuda_graph]
    rt = RuntimeConfig(max_batch=args.batch, max_seq_len=max_seq, prefill_chunk=args.prefill_chunk,
                       cache_blocks=args.cache_blocks, num_device_blocks=device_blocks,
                       retrieval_threads=args.retrieval_threads, cuda_graph=graph, early_prefetch=args.early_prefetch)
    engine = Engine(TorchBackend(model, attention="triton", validate=False), policy, sparse=sparse, config=rt)
    g = torch.Generator().manual_seed(ctx)
    prompts = [torch.randint(0, model.config.vocab_size, (ctx,), generator=g).tolist() for _ in range(args.batch)]
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    if args.profile:
        # host time of the decode steps only (after every prompt's first token), by own time
        import cProfile
        import pstats

        started: set[str] = set()
        rids = [engine.add_request(p, SamplingParams(max_new_tokens=args.decode_steps),
                                   on_token=lambda rid, _tok: started.add(rid)) for p in prompts]
        while len(started) < len(rids):
            engine.step()
        for _ in range(4):  # warm-up steps: kernel compilation, graph capture
            engine.step()
        prof = cProfile.Profile()
        prof.enable()
        while engine.has_work:
            engine.step()
        prof.disable()
        print(f"--- profile: {algorithm} {ctx} cuda_graph={cuda_graph}, decode steps after warm-up, by own time")
        pstats.Stats(prof).sort_stats("tottime").print_stats(22)
    else:
        engine.generate(prompts, SamplingParams(max_new_tokens=args.decode_steps))
    torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    stats = engine.stats()
    dec = [r.seconds for r in engine.metrics.steps if r.kind == "decode"]
    engine.close()
    del engine
    torch.cuda.empty_cache()
    keep = ["prefill_seconds", "decode_steps", "decode_tokens", "decode_seconds", "decode_tokens_per_s",
            "decode_bytes_h2d_per_step", "decode_bytes_h2d_max_step", "cache_hit_rate",
            "device_kv_bytes_last_decode", "dense_kv_bytes_last_decode", "working_set_bytes_last_decode",
            "device_kv_over_working_set", "retrieval_tasks", "retrieval_mean_ms", "retrieval_max_ms",
            "retrieval_wait_ms", "retrieval_busy_ms", "retrieval_overlap", "offload", "policy",
            "cuda_graph", "cuda_graph_captures", "cuda_graph_replays", "eager_decode_steps", "decode_plan_ms_mean",
            "decode_blocks_prefetched"]
    out = {k: stats.get(k) for k in keep}
    # steady state: the median step after the first 4 (which capture graphs / compile kernels)
    steady = sorted(dec[4:]) if len(dec) > 8 else sorted(dec)
    out["decode_step_ms_median"] = 1e3 * steady[len(steady) // 2] if steady else None
    out["decode_step_ms_first"] = 1e3 * dec[0] if dec else None
    # steady-state rate: rows / MEAN step after the first 4 (the mean counts the retrieval steps of
    # offload policies, which load the changed blocks; the median shows the steps in between).
    # decode_tokens_per_s also counts the first steps, which compile Triton kernels for new shapes
    # and capture CUDA graphs (warm-up)
    tail = dec[4:] if len(dec) > 8 else dec
    out["decode_step_ms_mean_steady"] = 1e3 * sum(tail) / len(tail) if tail else None
    out["decode_tokens_per_s_steady"] = args.batch * 1e3 / out["decode_step_ms_mean_steady"] if tail else None
    out.update(algorithm=algorithm, context=ctx, batch=args.batch, wall_seconds=wall, cuda_graph_mode=cuda_graph)
    return out


def run_capacity(model, args) -> dict:
    """Measured concurrency in a fixed device KV budget: ``--capacity``.

    The device pool of every layer gets ``--kv-budget-gb`` in total. Dense: the most sequences of
    ``--capacity-context`` tokens whose full KV fits are decoded together, and one more is shown to
    fail (PoolExhaustedError). ESA with offload: the device pool holds one prompt being prefilled
    plus the working sets; the estimated number of sequences is run, lowered by 10 % after a
    PoolExhaustedError (at most 4 tries). Every number is a completed run.
    """
    from ucm_trt.runtime.kv import PoolExhaustedError

    ctx, steps, bs = args.capacity_context, args.capacity_steps, args.block_size
    L = model.config.num_hidden_layers
    hkv = model.config.num_key_value_heads
    hd = getattr(model.config, "head_dim", None) or model.config.hidden_size // model.config.num_attention_heads
    block_bytes = 2 * hkv * bs * hd * torch.empty((), dtype=model.dtype).element_size()
    budget_blocks = int(args.kv_budget_gb * 2**30) // (L * block_bytes)  # per layer, incl. the null block
    per_seq = -(-(ctx + steps + 1) // bs)
    out = {"context": ctx, "kv_budget_gb": args.kv_budget_gb, "device_blocks_per_layer": budget_blocks,
           "blocks_per_sequence": per_seq, "decode_steps": steps, "runs": []}

    def attempt(algorithm: str, n: int) -> dict:
        sparse = sparse_config_for(algorithm, SparseConfig(block_size=bs, budget=Budget.ratio(args.ratio),
                                                           retrieval_stride=args.stride))
        policy = make_policy(algorithm)
        rt = RuntimeConfig(max_batch=n, max_seq_len=ctx + steps + 1, prefill_chunk=args.prefill_chunk,
                           cache_blocks=args.cache_blocks, num_device_blocks=budget_blocks,
                           num_host_blocks=n * per_seq if policy.offload else None,
                           retrieval_threads=args.retrieval_threads)
        g = torch.Generator().manual_seed(n)
        prompts = [torch.randint(0, model.config.vocab_size, (ctx,), generator=g).tolist() for _ in range(n)]
        t0 = time.perf_counter()
        rec = {"algorithm": algorithm, "sequences": n}
        try:
            with Engine(TorchBackend(model, attention="auto", validate=False), policy, sparse=sparse, config=rt) as eng:
                eng.generate(prompts, SamplingParams(max_new_tokens=steps))
                st = eng.stats()
            rec.update(ok=True, decode_tokens_per_s=st["decode_tokens_per_s"],
                       device_kv_bytes_last_decode=st["device_kv_bytes_last_decode"],
                       host_kv_bytes_peak=st.get("host_kv_bytes_peak"),
                       cuda_graph_replays=st.get("cuda_graph_replays"))
        except PoolExhaustedError as exc:
            rec.update(ok=False, error=str(exc).splitlines()[0])
        rec["wall_seconds"] = time.perf_counter() - t0
        torch.cuda.empty_cache()
        print(json.dumps(rec, default=str), flush=True)
        out["runs"].append(rec)
        return rec

    n_dense = (budget_blocks - 1) // per_seq
    attempt("dense", n_dense)
    attempt("dense", n_dense + 1)
    sel = int(per_seq * args.ratio) + 1
    ws = sel + 1 + 2 + args.cache_blocks + 2  # selected + sink + local + cache + the block being written
    n = max(1, (budget_blocks - 1 - per_seq) // ws)
    for _ in range(4):
        if attempt("esa", n)["ok"]:
            break
        n = max(1, int(n * 0.9))
    ok = {a: max((r["sequences"] for r in out["runs"] if r["algorithm"] == a and r["ok"]), default=0)
          for a in ("dense", "esa")}
    out["max_concurrent_measured"] = ok
    return out


def run_blend(args) -> dict:
    """Blend TTFT vs full prefill and greedy agreement on SmolLM2 (CPU or GPU): ``--blend``."""
    from ucm_trt.config import BlendConfig
    from ucm_trt.models import haystack_text, load_smollm2
    from ucm_trt.runtime.blend import BlendRunner

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    model, tok = load_smollm2(dtype=torch.float32)
    model = model.to(dev)
    bs = args.block_size
    text = haystack_text().text
    pad = tok.eos_token_id
    chunks = []
    for i in range(args.blend_chunks):
        ids = tok(text[i * 3000 : (i + 1) * 3000])["input_ids"][: args.blend_chunk_tokens]
        ids += [pad] * (-len(ids) % bs)
        chunks.append(ids)
    suffix = tok("\nQuestion: what is the main topic of the passages above? Answer:")["input_ids"]
    prompt = [t for c in chunks for t in c] + suffix
    rt = RuntimeConfig(max_batch=1, max_seq_len=len(prompt) + args.decode_steps + 1, prefill_chunk=len(prompt))
    sparse = SparseConfig(block_size=bs)
    out = {"model": "smollm2", "device": dev, "prompt_tokens": len(prompt), "chunks": len(chunks), "runs": []}
    with Engine(TorchBackend(model), sparse=sparse, config=rt) as eng:
        eng.generate(prompt[:64], SamplingParams(max_new_tokens=2))  # warm-up
        [full] = eng.generate(prompt, SamplingParams(max_new_tokens=args.decode_steps))
    out["full_prefill_ttft_s"] = full.ttft_seconds
    for layer, ratio in ((1, 0.2), (1, 0.0), (2, 0.3)):
        with Engine(TorchBackend(model), sparse=sparse, config=rt) as eng:
            runner = BlendRunner(eng, BlendConfig(recompute_layer=layer, recompute_ratio=ratio))
            for c in chunks:
                runner.cache_chunk(c)
            res = runner.generate(chunks, suffix, SamplingParams(max_new_tokens=args.decode_steps))
        agree = sum(a == b for a, b in zip(res.token_ids, full.token_ids, strict=False)) / len(full.token_ids)
        prefix = next((i for i, (a, b) in enumerate(zip(res.token_ids, full.token_ids, strict=False)) if a != b), len(full.token_ids))
        out["runs"].append({"recompute_layer": layer, "recompute_ratio": ratio, "ttft_s": res.ttft_seconds,
                            "ttft_speedup_vs_full": full.ttft_seconds / res.ttft_seconds,
                            "greedy_agreement": agree, "identical_prefix_tokens": prefix,
                            "first_token_equal": res.token_ids[0] == full.token_ids[0], **runner.stats})
        print(json.dumps(out["runs"][-1]), flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="llama1b-random", choices=("llama1b-random", "smollm2"))
    p.add_argument("--contexts", type=int, nargs="+", default=[32768, 131072])
    p.add_argument("--algorithms", nargs="+", default=["dense", "esa", "gsa", "gsa-on-device"])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--decode-steps", type=int, default=64)
    p.add_argument("--block-size", type=int, default=64)
    p.add_argument("--ratio", type=float, default=0.125)
    p.add_argument("--stride", type=int, default=4)
    p.add_argument("--cache-blocks", type=int, default=2)
    p.add_argument("--prefill-chunk", type=int, default=4096)
    p.add_argument("--retrieval-threads", type=int, default=4)
    p.add_argument("--offload-pool-fraction", type=float, default=0.3,
                   help="device pool of offload runs, as a fraction of the dense pool per sequence")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16"))
    p.add_argument("--cuda-graph", nargs="+", default=["auto"], choices=("auto", "on", "off"),
                   help="decode-step CUDA graphs; several values run each configuration once per value")
    p.add_argument("--early-prefetch", action="store_true",
                   help="RuntimeConfig.early_prefetch: load a finished retrieval's blocks before it is due")
    p.add_argument("--profile", action="store_true", help="print a cProfile summary of each run (host time)")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/runtime.json"))
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (CPU runs)")
    p.add_argument("--rerope-window", type=int, default=4096)
    p.add_argument("--rerope-training-length", type=int, default=8192)
    p.add_argument("--capacity", action="store_true",
                   help="instead: measured concurrent sequences (dense vs ESA offload) in a fixed device KV budget")
    p.add_argument("--capacity-context", type=int, default=16384)
    p.add_argument("--capacity-steps", type=int, default=16)
    p.add_argument("--kv-budget-gb", type=float, default=4.0)
    p.add_argument("--blend", action="store_true",
                   help="instead: Blend TTFT vs full prefill and output agreement on SmolLM2 (CPU or GPU)")
    p.add_argument("--blend-chunks", type=int, default=4)
    p.add_argument("--blend-chunk-tokens", type=int, default=240)
    args = p.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.blend:
        result = run_blend(args)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2, default=str) + "\n")
        print(f"wrote {args.out}")
        return 0
    if not torch.cuda.is_available():
        print("bench_runtime.py needs a CUDA GPU", file=sys.stderr)
        return 2
    dtype = getattr(torch, args.dtype)
    card = torch.cuda.get_device_name(0)
    if args.capacity:
        model = load_model(args.model, dtype, "cuda", args.capacity_context + args.capacity_steps + 16)
        result = {"card": card, "model": args.model, "dtype": args.dtype, "torch": torch.__version__,
                  **run_capacity(model, args)}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2, default=str) + "\n")
        print(f"wrote {args.out}: max concurrent measured {result['max_concurrent_measured']}")
        return 0
    model = load_model(args.model, dtype, "cuda", max(args.contexts) + args.decode_steps + 16)
    results = {"card": card, "model": args.model, "dtype": args.dtype, "torch": torch.__version__, "runs": []}
    for ctx in args.contexts:
        for alg in args.algorithms:
            for mode in args.cuda_graph:
                try:
                    r = run_one(model, alg, ctx, args, mode)
                except torch.cuda.OutOfMemoryError as exc:  # reported, never hidden
                    r = {"algorithm": alg, "context": ctx, "cuda_graph_mode": mode, "error": f"OOM: {exc}"}
                    torch.cuda.empty_cache()
                results["runs"].append(r)
                print(json.dumps(r, default=str), flush=True)
    free, _total = torch.cuda.mem_get_info()
    for r in results["runs"]:
        if "error" in r or not r.get("device_kv_bytes_last_decode"):
            continue
        per_seq = r["device_kv_bytes_last_decode"] / r["batch"]
        dense_seq = r["dense_kv_bytes_last_decode"] / r["batch"]
        r["max_concurrent_sequences_free_memory"] = {"with_policy": int(free // per_seq),
                                                     "dense": int(free // dense_seq)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2, default=str) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
