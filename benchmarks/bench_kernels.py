"""GPU benchmarks of the ucm_trt Triton kernels (DESIGN §5), one JSON row per measurement.

Decode attention, GQA 32 query / 8 KV heads, head_dim 128, bf16, block size 128, seq_len a
multiple of the block size (every block full), selection per KV head = sink block + 2 local
blocks + random other blocks up to ``budget`` of the blocks, sorted:

* ``dense_sdpa``: torch ``scaled_dot_product_attention(enable_gqa=True)`` over the full
  contiguous K/V ``[B, 8, L, 128]`` (the baseline every speedup is against);
* ``naive_gather_sdpa``: PyTorch gather of the selected blocks out of the pool, then SDPA;
* ``ours_sparse``: :func:`ucm_trt.kernels.paged_sparse_attention` on the paged pool;
* ``ours_dense_paged``: the same kernel with ``selection=None`` (every block);
* ``ours_rerope`` / ``ours_rerope_sparse``: :func:`paged_rerope_attention` (window 32K, log-n on);
* ``retrieval_*``: GPU retrieval per layer (query hash + Hamming block scores + block top-k, and
  the dot / Quest variants) at 128K.

Every op is captured in a CUDA graph and timed by replaying it (CUDA events, median of
``--reps``), with L2 flushed before each timed replay (``ucm_trt.testing.bench``).
``effective_tbps`` counts the K/V bytes the op must read: all of them for dense, the selected
ones for sparse ops. The card's device-to-device copy bandwidth is measured in the same run.
"""

# ruff: noqa: B023  (every lambda is graphed and timed at once, inside its loop iteration)
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import sys
import time

import torch
import torch.nn.functional as F

from ucm_trt.kernels import (
    AttentionLaunch,
    block_topk,
    dot_block_scores,
    hamming_block_scores,
    hash_retrieve,
    paged_rerope_attention,
    paged_sparse_attention,
    quest_block_scores,
)
from ucm_trt.testing.bench import bench_gpu_ms, copy_bandwidth_tbps

HQ, HKV, D, BS = 32, 8, 128, 128
DTYPE = torch.bfloat16


def graphed(fn):
    """Capture ``fn`` in a CUDA graph (after a warm-up on a side stream); return its replay."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return g.replay


def time_ms(fn, reps):
    return bench_gpu_ms(graphed(fn), warmup=5, reps=reps, flush_l2=True)


def make_pool(batch, ctx, gen):
    nb = ctx // BS
    nphys = batch * nb + 1
    pool = torch.empty((nphys, 2, HKV, BS, D), device="cuda", dtype=DTYPE)
    pool.normal_(generator=gen)
    perm = torch.randperm(nphys - 1, device="cuda", generator=gen) + 1
    table = perm.view(batch, nb).to(torch.int32)
    seq = torch.full((batch,), ctx, dtype=torch.int32, device="cuda")
    return pool, table, seq


def make_selection(batch, nb, budget, gen):
    """Per-head sorted selection: block 0, the last 2 blocks, random others; width = round(budget * nb)."""
    k = max(3, round(budget * nb))
    scores = torch.rand((batch, HKV, nb), device="cuda", generator=gen)
    scores[..., 0] = 2.0
    scores[..., -2:] = 2.0
    ids = scores.topk(k, dim=-1).indices.sort(dim=-1).values
    return ids.to(torch.int32).contiguous()


def contiguous_kv(pool, table):
    b, nb = table.shape
    blocks = pool[table.long()]  # [B, nb, 2, Hkv, BS, D]
    k = blocks[:, :, 0].permute(0, 2, 1, 3, 4).reshape(b, HKV, nb * BS, D).contiguous()
    v = blocks[:, :, 1].permute(0, 2, 1, 3, 4).reshape(b, HKV, nb * BS, D).contiguous()
    return k, v


def naive_gather_sdpa(q, pool, table, sel):
    b, h, s = sel.shape
    phys = torch.gather(table, 1, sel.view(b, h * s).long()).view(b, h, s)
    heads = torch.arange(h, device=q.device).view(1, h, 1)
    kv = pool[phys, :, heads]  # [B, Hkv, S, 2, BS, D]
    k = kv[:, :, :, 0].reshape(b, h, s * BS, D)
    v = kv[:, :, :, 1].reshape(b, h, s * BS, D)
    return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)


def row(op, ctx, batch, budget, ms, nbytes, dense_ms, card, date, copy_tbps, **extra):
    tbps = nbytes / (ms * 1e-3) / 1e12 if ms else None
    r = {
        "op": op, "context_len": ctx, "batch": batch, "budget": budget, "dtype": "bf16",
        "block_size": BS, "num_q_heads": HQ, "num_kv_heads": HKV, "head_dim": D,
        "median_ms": round(ms, 5), "bytes_read": int(nbytes), "effective_tbps": round(tbps, 4),
        "pct_of_copy_bw": round(100 * tbps / copy_tbps, 1),
        "speedup_vs_dense": round(dense_ms / ms, 3) if dense_ms else None,
        "card": card, "date": date,
    }
    r.update(extra)
    return r


def bench_attention(args, card, date, copy_tbps, rows):
    gen = torch.Generator(device="cuda").manual_seed(0)
    for ctx in args.contexts:
        for batch in args.batches:
            nb = ctx // BS
            pool, table, seq = make_pool(batch, ctx, gen)
            q = torch.randn((batch, HQ, 1, D), device="cuda", dtype=DTYPE, generator=gen)
            k, v = contiguous_kv(pool, table)
            kv_bytes = batch * HKV * ctx * D * 2 * 2
            dense_ms = time_ms(lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True), args.reps)
            rows.append(row("dense_sdpa", ctx, batch, 1.0, dense_ms, kv_bytes, dense_ms, card, date, copy_tbps))
            out = torch.empty_like(q)
            ms = time_ms(lambda: paged_sparse_attention(q, pool, table, seq, None, out=out, validate=False),
                         args.reps)
            rows.append(row("ours_dense_paged", ctx, batch, 1.0, ms, kv_bytes, dense_ms, card, date, copy_tbps))
            for budget in args.budgets:
                sel = make_selection(batch, nb, budget, gen)
                sel_bytes = sel.numel() * BS * D * 2 * 2
                frac = sel.shape[-1] / nb
                ms = time_ms(lambda: naive_gather_sdpa(q, pool, table, sel), args.reps)
                rows.append(row("naive_gather_sdpa", ctx, batch, frac, ms, sel_bytes, dense_ms, card, date,
                                copy_tbps, budget_nominal=budget))
                ms = time_ms(lambda: paged_sparse_attention(q, pool, table, seq, sel, out=out, validate=False),
                             args.reps)
                rows.append(row("ours_sparse", ctx, batch, frac, ms, sel_bytes, dense_ms, card, date, copy_tbps,
                                budget_nominal=budget))
                if ctx == max(args.contexts) and budget == 1 / 8 and args.sweep:
                    for launch in sweep_launches():
                        try:
                            ms = time_ms(lambda: paged_sparse_attention(q, pool, table, seq, sel, out=out,
                                                                        validate=False, launch=launch), args.reps)
                        except Exception as exc:  # noqa: BLE001 - a config may not compile; record it
                            print(f"sweep {launch}: {type(exc).__name__}: {exc}", file=sys.stderr)
                            continue
                        rows.append(row("ours_sparse_sweep", ctx, batch, frac, ms, sel_bytes, dense_ms, card,
                                        date, copy_tbps, budget_nominal=budget, launch=repr(launch)))
                if ctx in args.rerope_contexts and budget == 1 / 8:
                    for op, s in (("ours_rerope", None), ("ours_rerope_sparse", sel)):
                        ms = time_ms(lambda s=s: paged_rerope_attention(
                            q, pool, table, seq, s, window=32768, theta=1e6, logn_training_length=32768, out=out,
                            validate=False), args.reps)
                        nbytes = kv_bytes if s is None else sel_bytes
                        rows.append(row(op, ctx, batch, 1.0 if s is None else frac, ms, nbytes, dense_ms, card,
                                        date, copy_tbps, window=32768))
            pool = k = v = None
            torch.cuda.empty_cache()
            print(f"attention ctx={ctx} batch={batch} done", flush=True)


def sweep_launches():
    out = []
    for nw in (4, 8):
        for bn in (64, 128):
            for st in (2, 3):
                for pps in (2, 4, 8):
                    out.append(AttentionLaunch(num_warps=nw, block_n=bn, num_stages=st, programs_per_sm=pps))
    return out


def bench_retrieval(args, card, date, copy_tbps, rows):
    gen = torch.Generator(device="cuda").manual_seed(1)
    ctx = max(args.contexts)
    nb = ctx // BS
    bits = 128
    for batch in (1, 8):
        nphys = batch * nb + 1
        codes = torch.randint(0, 256, (nphys, HKV, BS, bits // 8), device="cuda", dtype=torch.uint8, generator=gen)
        w = torch.randn((D, bits), device="cuda", generator=gen)
        table = (torch.randperm(nphys - 1, device="cuda", generator=gen) + 1).view(batch, nb).to(torch.int32)
        seq = torch.full((batch,), ctx, dtype=torch.int32, device="cuda")
        q = torch.randn((batch, HQ, D), device="cuda", dtype=DTYPE, generator=gen)
        top_k = nb // 8
        code_bytes = codes[1:].numel()
        ms = time_ms(lambda: hash_retrieve(q, codes, w, table, seq, top_k=top_k, sink_blocks=1, local_blocks=2,
                                           shared=True, validate=False), args.reps)
        rows.append(row("retrieval_hash_topk", ctx, batch, 1 / 8, ms, code_bytes, None, card, date, copy_tbps,
                        us_per_layer=round(ms * 1e3, 2), hash_bits=bits))
        ms = time_ms(lambda: hamming_block_scores(q, codes, w, table, seq, validate=False), args.reps)
        rows.append(row("retrieval_hash_scores_only", ctx, batch, 1 / 8, ms, code_bytes, None, card, date,
                        copy_tbps, us_per_layer=round(ms * 1e3, 2), hash_bits=bits))
        scores = torch.randn((batch, HKV, nb), device="cuda", generator=gen)
        ms = time_ms(lambda: block_topk(scores, seq, top_k=top_k, block_size=BS, sink_blocks=1, local_blocks=2,
                                        largest=False, shared=True), args.reps)
        rows.append(row("retrieval_topk_only", ctx, batch, 1 / 8, ms, scores.numel() * 4, None, card, date,
                        copy_tbps, us_per_layer=round(ms * 1e3, 2)))
        mean = torch.randn((nphys, HKV, D), device="cuda", dtype=DTYPE, generator=gen)
        kmax = torch.randn((nphys, HKV, D), device="cuda", dtype=DTYPE, generator=gen)

        def dot_path():
            s = dot_block_scores(q, mean, table, seq, block_size=BS, validate=False)
            return block_topk(s, seq, top_k=top_k, block_size=BS, sink_blocks=1, local_blocks=2, largest=True,
                              shared=True)

        def quest_path():
            s = quest_block_scores(q, mean, kmax, table, seq, block_size=BS, validate=False)
            return block_topk(s, seq, top_k=top_k, block_size=BS, sink_blocks=1, local_blocks=2, largest=True,
                              shared=True)

        ms = time_ms(dot_path, args.reps)
        rows.append(row("retrieval_dot_mean_topk", ctx, batch, 1 / 8, ms, batch * nb * HKV * D * 2, None, card,
                        date, copy_tbps, us_per_layer=round(ms * 1e3, 2)))
        ms = time_ms(quest_path, args.reps)
        rows.append(row("retrieval_quest_topk", ctx, batch, 1 / 8, ms, batch * nb * HKV * D * 2 * 2, None, card,
                        date, copy_tbps, us_per_layer=round(ms * 1e3, 2)))
        print(f"retrieval batch={batch} done", flush=True)


def print_table(rows, copy_tbps, card):
    print(f"\ncard: {card}   measured copy bandwidth: {copy_tbps:.3f} TB/s (read+write)   block_size {BS}, bf16")
    hdr = f"{'op':<28}{'ctx':>7}{'B':>3}{'budget':>8}{'ms':>10}{'TB/s':>8}{'%copy':>7}{'x dense':>9}"
    print(hdr)
    for r in rows:
        if r["op"] == "ours_sparse_sweep":
            continue
        sp = f"{r['speedup_vs_dense']:.2f}" if r["speedup_vs_dense"] else "-"
        print(f"{r['op']:<28}{r['context_len']:>7}{r['batch']:>3}{r['budget']:>8.4f}{r['median_ms']:>10.4f}"
              f"{r['effective_tbps']:>8.3f}{r['pct_of_copy_bw']:>7.1f}{sp:>9}")
    sweep = [r for r in rows if r["op"] == "ours_sparse_sweep"]
    for batch in sorted({r["batch"] for r in sweep}):
        best = sorted((r for r in sweep if r["batch"] == batch), key=lambda r: r["median_ms"])[:3]
        for r in best:
            print(f"sweep best B={batch}: {r['median_ms']:.4f} ms {r['pct_of_copy_bw']}% x{r['speedup_vs_dense']} "
                  f"{r['launch']}")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--contexts", type=int, nargs="+", default=[8192, 32768, 131072])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--budgets", type=float, nargs="+", default=[1 / 4, 1 / 8, 1 / 16])
    p.add_argument("--rerope-contexts", type=int, nargs="*", default=[32768, 131072])
    p.add_argument("--reps", type=int, default=50)
    p.add_argument("--sweep", action="store_true", help="also sweep launch configs at the largest context, 1/8")
    p.add_argument("--out", default=os.environ.get("OUT", "."))
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_kernels.py needs a CUDA GPU")
    card = torch.cuda.get_device_name()
    date = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d")
    t0 = time.time()
    copy_tbps = copy_bandwidth_tbps()
    rows = [{"op": "copy_bandwidth", "context_len": None, "batch": None, "budget": None, "dtype": "uint8",
             "median_ms": None, "effective_tbps": round(copy_tbps, 4), "speedup_vs_dense": None,
             "card": card, "date": date, "torch": torch.__version__,
             "triton": __import__("triton").__version__}]
    for fn in (bench_attention, bench_retrieval):
        try:
            fn(args, card, date, copy_tbps, rows)
        except Exception as exc:  # noqa: BLE001 - keep what was measured; the error is recorded
            import traceback

            traceback.print_exc()
            rows.append({"op": f"error_{fn.__name__}", "error": f"{type(exc).__name__}: {exc}", "card": card,
                         "date": date})
    slug = card.replace(" ", "-").replace("/", "-")
    path = os.path.join(args.out, f"kernels_{slug}_{date}.json")
    with open(path, "w") as f:
        json.dump(rows, f, indent=1)
    print(f"wrote {len(rows)} rows to {path} in {time.time() - t0:.0f} s")
    print_table([r for r in rows if r.get("median_ms") is not None], copy_tbps, card)
    return 0 if not any(r["op"].startswith("error_") for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
