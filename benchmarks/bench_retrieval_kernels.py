"""GPU benchmark of block retrieval per layer (issue 14 item 4) and of the index guard's cost (issue 17).

Shapes: decode, GQA 32 query / 8 KV heads, head_dim 128, bf16 query, 128K context (every block full),
block sizes 16/32/64/128 (8192/4096/2048/1024 blocks per head), batch 1 and 8, top_k = blocks / 8,
sink 1 + local 2. Rows (``op``):

* ``retrieval_hash_fused``: :func:`ucm_trt.kernels.hash_retrieve` (one launch: query hash, Hamming
  scores over 128-bit codes, shared top-k), with a :class:`RetrievalWorkspace`;
  ``..._per_head``: per-KV-head selections; ``..._guard``: with an IndexGuard;
* ``retrieval_hash_unfused``: the separate kernels it replaces (``hamming_block_scores`` = query hash +
  scores, then ``block_topk``: three launches); the fused selection is compared with it
  (``matches_unfused``: an independent implementation of the same selection);
* ``retrieval_quest_fused`` / ``retrieval_dot_fused``: :func:`quest_retrieve` (K min/max, bf16) and
  :func:`dot_retrieve` (block mean); Quest at batch 1 is compared with the torch reference
  (``ucm_trt.sparse.score`` + ``select_blocks_by_count``), ``ref_mismatch_rows`` counts rows that differ;
* ``retrieval_*_sweep``: launch knobs at block sizes 16 and 128, batch 1 (``--no-sweep`` skips them);
* ``guard_copy_blocks`` / ``guard_append_kv``: the same launch with and without an IndexGuard
  (``guard`` true/false): 512 random block copies of 512 KiB, and a batch-8 decode append with mean,
  min/max and hash codes.

Every op is captured in a CUDA graph and timed by replaying it: median of ``--reps`` replays, CUDA
events, L2 flushed before each (``ucm_trt.testing.bench``). Writes
``retrieval_<card>_<date>.json`` into ``--out`` and prints a table last.
"""

# ruff: noqa: B023  (every lambda is graphed and timed at once, inside its loop iteration)
from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import json
import os
import time

import torch

from ucm_trt.kernels import (
    RetrievalLaunch,
    RetrievalWorkspace,
    append_kv,
    block_topk,
    copy_blocks,
    dot_retrieve,
    hamming_block_scores,
    hash_retrieve,
    quest_retrieve,
)
from ucm_trt.kernels.guard import IndexGuard
from ucm_trt.sparse.score import quest_scores, reduce_scores
from ucm_trt.sparse.select import select_blocks_by_count
from ucm_trt.testing.bench import bench_gpu_ms, cuda_graphed

HQ, HKV, D, BITS = 32, 8, 128, 128
DTYPE = torch.bfloat16


def knobs(launch: RetrievalLaunch) -> str:
    """The launch knobs that differ from the defaults, ``name=value`` separated by spaces."""
    default = RetrievalLaunch()
    return " ".join(f"{f.name}={getattr(launch, f.name)}" for f in dataclasses.fields(launch)
                    if getattr(launch, f.name) != getattr(default, f.name))


def time_us(fn, reps):
    return 1e3 * bench_gpu_ms(cuda_graphed(fn), warmup=5, reps=reps, flush_l2=True)


def quest_reference(q, kmin, kmax, table, seq, bs, top_k):
    """Torch reference selection (shared, Quest group='sum', sink 1, local 2)."""
    s = quest_scores(q, kmin[table.long()], kmax[table.long()])
    s = reduce_scores(s, "quest")
    nb = (seq + bs - 1) // bs
    return select_blocks_by_count(s, nb, top_k - 3, sink_blocks=1, local_blocks=2, num_kv_heads=HKV,
                                  max_selected=top_k)


def bench_retrieval(args, card, date, rows, save):
    gen = torch.Generator(device="cuda").manual_seed(1)
    ctx = args.context
    base = {"context_len": ctx, "num_q_heads": HQ, "num_kv_heads": HKV, "card": card, "date": date}
    for bs in args.block_sizes:
        nb = ctx // bs
        top_k = nb // 8
        for batch in args.batches:
            nphys = batch * nb + 1
            table = (torch.randperm(nphys - 1, device="cuda", generator=gen) + 1).view(batch, nb).to(torch.int32)
            seq = torch.full((batch,), ctx, dtype=torch.int32, device="cuda")
            q = torch.randn((batch, HQ, D), device="cuda", dtype=DTYPE, generator=gen)
            codes = torch.randint(0, 256, (nphys, HKV, bs, BITS // 8), device="cuda", dtype=torch.uint8,
                                  generator=gen)
            w = torch.randn((D, BITS), device="cuda", generator=gen)
            ws = RetrievalWorkspace("cuda")
            guard = IndexGuard("cuda")
            common = dict(base, batch=batch, block_size=bs, top_k=top_k, head_dim=D)
            kw = dict(top_k=top_k, sink_blocks=1, local_blocks=2, validate=False, workspace=ws)

            fused = hash_retrieve(q, codes, w, table, seq, **kw)
            scores = hamming_block_scores(q, codes, w, table, seq, validate=False)
            old = block_topk(scores, seq, top_k=top_k, block_size=bs, sink_blocks=1, local_blocks=2, largest=False,
                             shared=True)
            match = bool(torch.equal(fused, old))
            mismatch_rows = int((fused != old).any(-1).sum())
            us = time_us(lambda: hash_retrieve(q, codes, w, table, seq, **kw), args.reps)
            rows.append(dict(common, op="retrieval_hash_fused", us=round(us, 2), launches=1, shared=True,
                             matches_unfused=match, mismatch_rows=mismatch_rows, code_bytes=codes[1:].numel()))
            us = time_us(lambda: hash_retrieve(q, codes, w, table, seq, guard=guard, **kw), args.reps)
            rows.append(dict(common, op="retrieval_hash_fused_guard", us=round(us, 2), launches=1, shared=True))
            rows.append(dict(common, op="retrieval_hash_unfused", launches=3, shared=True, us=round(time_us(
                lambda: block_topk(hamming_block_scores(q, codes, w, table, seq, validate=False), seq, top_k=top_k,
                                   block_size=bs, sink_blocks=1, local_blocks=2, largest=False, shared=True),
                args.reps), 2)))
            if bs == 128:
                us = time_us(lambda: hash_retrieve(q, codes, w, table, seq, shared=False, **kw), args.reps)
                rows.append(dict(common, op="retrieval_hash_fused_per_head", us=round(us, 2), launches=1,
                                 shared=False))
            codes = scores = None

            a = torch.randn((nphys, HKV, D), device="cuda", dtype=DTYPE, generator=gen)
            c = torch.randn((nphys, HKV, D), device="cuda", dtype=DTYPE, generator=gen)
            kmin, kmax = torch.minimum(a, c), torch.maximum(a, c)
            a = c = None
            extra = {}
            if batch == 1:
                got = quest_retrieve(q, kmin, kmax, table, seq, block_size=bs, **kw)
                ref = quest_reference(q, kmin, kmax, table, seq, bs, top_k)
                extra = {"ref_mismatch_rows": int((got != ref).any(-1).sum())}
            us = time_us(lambda: quest_retrieve(q, kmin, kmax, table, seq, block_size=bs, **kw), args.reps)
            rows.append(dict(common, op="retrieval_quest_fused", us=round(us, 2), launches=1, shared=True, **extra))
            us = time_us(lambda: dot_retrieve(q, kmin, table, seq, block_size=bs, **kw), args.reps)
            rows.append(dict(common, op="retrieval_dot_fused", us=round(us, 2), launches=1, shared=True))
            if bs == 128 and batch == 1:
                q96 = torch.randn((batch, HQ, 96), device="cuda", dtype=DTYPE, generator=gen)
                lo96, hi96 = kmin[..., :96].contiguous(), kmax[..., :96].contiguous()
                us = time_us(lambda: quest_retrieve(q96, lo96, hi96, table, seq, block_size=bs, **kw), args.reps)
                rows.append(dict(common, op="retrieval_quest_fused", us=round(us, 2), launches=1, shared=True,
                                 head_dim=96))
            if bs in (16, 128) and batch == 1 and args.sweep:
                codes = torch.randint(0, 256, (nphys, HKV, bs, BITS // 8), device="cuda", dtype=torch.uint8,
                                      generator=gen)
                ref = hash_retrieve(q, codes, w, table, seq, **kw)
                launches = [RetrievalLaunch(hash_precision="tf32x3"), RetrievalLaunch(radix_bits=3),
                            RetrievalLaunch(radix_bits=5), RetrievalLaunch(radix_bits=6),
                            RetrievalLaunch(tokens_per_tile=256), RetrievalLaunch(tokens_per_tile=512),
                            RetrievalLaunch(tokens_per_tile=2048), RetrievalLaunch(num_warps=4),
                            RetrievalLaunch(num_warps=16)]
                if bs == 16:
                    launches = launches[4:] + [RetrievalLaunch(topk_chunk=1024), RetrievalLaunch(topk_chunk=8192)]
                for launch in launches:
                    try:
                        same = bool(torch.equal(hash_retrieve(q, codes, w, table, seq, launch=launch, **kw), ref))
                        us = time_us(lambda: hash_retrieve(q, codes, w, table, seq, launch=launch, **kw), args.reps)
                    except Exception as exc:  # noqa: BLE001 - a knob may not compile; record it
                        rows.append(dict(common, op="retrieval_hash_fused_sweep", launch=knobs(launch),
                                         error=f"{type(exc).__name__}: {exc}"))
                        continue
                    rows.append(dict(common, op="retrieval_hash_fused_sweep", us=round(us, 2), launch=knobs(launch),
                                     same_selection=same))
                for launch in (RetrievalLaunch(radix_bits=6), RetrievalLaunch(radix_bits=8),
                               RetrievalLaunch(radix_bits=8, num_warps=4), RetrievalLaunch(blocks_per_tile=4),
                               RetrievalLaunch(blocks_per_tile=16), RetrievalLaunch(blocks_per_tile=64),
                               RetrievalLaunch(topk_chunk=1024), RetrievalLaunch(num_warps=4)):
                    us = time_us(lambda: quest_retrieve(q, kmin, kmax, table, seq, block_size=bs, launch=launch,
                                                        **kw), args.reps)
                    rows.append(dict(common, op="retrieval_quest_fused_sweep", us=round(us, 2), launch=knobs(launch)))
                codes = None
            kmin = kmax = None
            torch.cuda.empty_cache()
            save()  # after every shape: a call cut by its time limit keeps the shapes that finished
            print(f"retrieval block_size={bs} batch={batch} done", flush=True)


def bench_guard(args, card, date, rows, save):
    gen = torch.Generator(device="cuda").manual_seed(2)
    base = {"card": card, "date": date}
    n_pool, n_pairs = args.copy_pool_blocks, args.copy_pool_blocks // 2
    src = torch.randn((n_pool, 2, HKV, 128, D), device="cuda", dtype=DTYPE, generator=gen)
    dst = torch.empty_like(src)
    src_ids = torch.randperm(n_pool, device="cuda", generator=gen)[:n_pairs]
    dst_ids = torch.randperm(n_pool, device="cuda", generator=gen)[:n_pairs]
    guard = IndexGuard("cuda")
    for g in (None, guard):
        us = time_us(lambda: copy_blocks(src, dst, src_ids, dst_ids, guard=g), args.reps)
        rows.append(dict(base, op="guard_copy_blocks", guard=g is not None, us=round(us, 2), blocks=n_pairs,
                         bytes=n_pairs * src[0].numel() * 2))
    src = dst = None
    batch, ctx, bs = 8, args.append_context, 128
    nb = ctx // bs
    pool = torch.randn((batch * nb + 1, 2, HKV, bs, D), device="cuda", dtype=DTYPE, generator=gen)
    table = (torch.randperm(batch * nb, device="cuda", generator=gen) + 1).view(batch, nb).to(torch.int32)
    seq = torch.full((batch,), ctx - 5, dtype=torch.int32, device="cuda")
    k = torch.randn((batch, HKV, 1, D), device="cuda", dtype=DTYPE, generator=gen)
    reps = [torch.zeros((pool.shape[0], HKV, D), device="cuda", dtype=DTYPE) for _ in range(3)]
    codes = torch.zeros((pool.shape[0], HKV, bs, BITS // 8), device="cuda", dtype=torch.uint8)
    w = torch.randn((D, BITS), device="cuda", generator=gen)
    for g in (None, guard):
        us = time_us(lambda: append_kv(pool, table, seq, k, k, block_mean=reps[0], block_min=reps[1],
                                       block_max=reps[2], hash_codes=codes, hash_weight=w, validate=False, guard=g),
                     args.reps)
        rows.append(dict(base, op="guard_append_kv", guard=g is not None, us=round(us, 2), batch=batch,
                         context_len=ctx, block_size=bs))
    torch.cuda.synchronize()
    guard.check("bench_guard")  # nothing was out of range
    print("guard done", flush=True)


def print_table(rows, card):
    print(f"\ncard: {card}   128K context unless noted, GQA {HQ}/{HKV}, head_dim {D} unless noted, top_k = blocks/8")
    print(f"{'op':34s} {'bs':>4s} {'batch':>5s} {'us':>9s}  notes")
    for r in rows:
        if "us" not in r:
            if "error" in r:
                print(f"{r['op']:34s} ERROR {r['error']}")
            continue
        notes = []
        for key in ("matches_unfused", "mismatch_rows", "ref_mismatch_rows", "guard", "same_selection"):
            if key in r:
                notes.append(f"{key}={r[key]}")
        if "launch" in r:
            notes.append(r["launch"])
        if r.get("head_dim", D) != D:
            notes.append(f"head_dim={r['head_dim']}")
        if "shared" in r and not r["shared"]:
            notes.append("per-head")
        print(f"{r['op']:34s} {str(r.get('block_size', '')):>4s} {str(r.get('batch', '')):>5s} {r['us']:9.2f}  "
              + " ".join(notes))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--context", type=int, default=131072)
    p.add_argument("--block-sizes", type=int, nargs="+", default=[16, 32, 64, 128])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--reps", type=int, default=50)
    p.add_argument("--copy-pool-blocks", type=int, default=1024, help="guard_copy_blocks: pool size (half copied)")
    p.add_argument("--append-context", type=int, default=32768, help="guard_append_kv: context per sequence")
    p.add_argument("--no-sweep", dest="sweep", action="store_false", help="skip the launch-knob sweep")
    p.add_argument("--parts", nargs="+", choices=("guard", "retrieval"), default=["guard", "retrieval"],
                   help="which parts run, in this order (default: both, the guard rows first)")
    p.add_argument("--out", default=".")
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_retrieval_kernels.py needs a CUDA GPU")
    os.makedirs(args.out, exist_ok=True)
    card = torch.cuda.get_device_name()
    date = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d")
    t0 = time.time()
    rows = [{"op": "setup", "card": card, "date": date, "torch": torch.__version__,
             "triton": __import__("triton").__version__}]
    slug = card.replace(" ", "-").replace("/", "-")
    path = os.path.join(args.out, f"retrieval_{slug}_{date}.json")

    def save():  # after every part, so a call cut by its time limit keeps what finished
        rows[0]["seconds"] = round(time.time() - t0, 1)
        with open(path + ".tmp", "w") as f:
            json.dump(rows, f, indent=1)
        os.replace(path + ".tmp", path)

    # the guard rows first: two short launches (issue 17's cost), then the retrieval grid (the first
    # H200 run was cut by its limit inside the guard part, after the retrieval grid, and wrote nothing)
    for fn in ({"guard": bench_guard, "retrieval": bench_retrieval}[part] for part in args.parts):
        try:
            fn(args, card, date, rows, save)
        except Exception as exc:  # noqa: BLE001 - keep what was measured; the error is recorded
            import traceback

            traceback.print_exc()
            rows.append({"op": f"error_{fn.__name__}", "error": f"{type(exc).__name__}: {exc}", "card": card,
                         "date": date})
        save()
    print(f"wrote {path} ({rows[0]['seconds']} s)")
    print_table(rows, card)


if __name__ == "__main__":
    main()
