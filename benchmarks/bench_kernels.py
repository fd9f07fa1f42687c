"""GPU benchmarks of the ucm_trt Triton kernels against their peers (DESIGN §5, issue 14), one JSON row per
measurement, all on the card and in the run that measures the copy bandwidth.

Decode attention (one query token), GQA 32 query / 8 KV heads, bf16, seq_len a multiple of the block size,
head_dim 128 (plus 80 and 96 rows). Selections: sink block + 2 local blocks + random others up to
``budget`` of the blocks, sorted; per KV head for ``ours_sparse``, shared by all heads for
``ours_sparse_shared`` and FlashInfer (its pages are shared by all heads, so the peer comparison uses a
head-shared selection: same blocks, same bytes).

* ``dense_sdpa`` (path ``torch``): ``scaled_dot_product_attention(enable_gqa=True)`` over contiguous K/V,
  the baseline of every ``speedup_vs_dense``;
* ``flashinfer_paged_decode`` (path ``flashinfer``): ``BatchDecodeWithPagedKVCacheWrapper`` (fa2 backend,
  HND layout on our pool, no copy) with the selected blocks as its page table; ``speedup_vs_flashinfer``
  of our sparse rows is against it (``null`` with the reason in ``flashinfer_error`` when it cannot run;
  not run at head_dim 80/96);
* ``ours_sparse`` / ``ours_sparse_shared`` / ``ours_dense_paged`` (``selection=None``): the one attention
  kernel, split-K merged inside it (one launch), on path ``jit`` (:func:`ucm_trt.kernels.paged_sparse_attention`,
  the runtime's launcher, with an :class:`~ucm_trt.kernels.AttentionWorkspace`) and, for ``ours_sparse``, on
  path ``aot``: the AOT PTX of the same kernel launched through the CUDA driver exactly as TensorRT's launcher
  does (``[inputs, split counters] [int32 extras] [output, split partials]``, split count from the AOT rule's shape
  expression, ``splits`` in the row); ``ours_sparse_nosplit`` (path ``aot``) is the plugin's unsplit PTX,
  what an engine runs until the graph feeds the split scratch;
  ``max_abs_diff_vs_jit`` / ``matches_jit``: the split AOT output against the runtime kernel's on the same
  inputs, before timing (bf16; NaN = an output left unwritten);
* ``ours_sparse_guard``: the JIT path with an :class:`~ucm_trt.kernels.guard.IndexGuard` (validate=False
  with vs without; ``guard_overhead_pct``);
* ``ours_sparse_ppsm``: the batch-1 split rule swept over ``programs_per_sm``;
* ``ours_sparse_maxnreg``: the default launch with ``AttentionLaunch(max_registers=128 / 96)`` (Triton's
  ``maxnreg``; ``vs_default`` = default time / this time);
* ``retrieval_*``: GPU retrieval per layer at 128K.

Every op is captured in a CUDA graph and timed by replaying it (CUDA events, median of ``--reps``), with
L2 flushed before each timed replay (``ucm_trt.testing.bench``). ``bytes_read`` counts the K/V bytes the op
must read: all of them for dense, the selected ones for sparse ops. FlashInfer JIT-compiles its decode
kernel on first use (about a minute with nvcc); its cache goes to ``--flashinfer-cache``.
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
    AttentionWorkspace,
    block_topk,
    dot_block_scores,
    dot_retrieve,
    hamming_block_scores,
    hash_retrieve,
    paged_rerope_attention,
    paged_sparse_attention,
    quest_block_scores,
    quest_retrieve,
)
from ucm_trt.kernels.attention import ATTENTION_GUARD_CODES, default_block_n, default_warps_stages
from ucm_trt.kernels.guard import IndexGuard
from ucm_trt.runtime.algorithms import GSA_ON_DEVICE_HASH_BITS_PER_DIM
from ucm_trt.testing.bench import bench_gpu_ms, copy_bandwidth_tbps, cuda_graphed

HQ, HKV, D, BS = 32, 8, 128, 128  # retrieval rows: head_dim 128, block 128
DTYPE = torch.bfloat16


def time_ms(fn, reps):
    return bench_gpu_ms(cuda_graphed(fn), warmup=5, reps=reps, flush_l2=True)


class Ctx:
    """Card-level facts every row carries."""

    def __init__(self, card, date, copy_tbps, reps):
        self.card, self.date, self.copy_tbps, self.reps = card, date, copy_tbps, reps


def make_pool(batch, ctx, bs, d, gen):
    nb = ctx // bs
    nphys = batch * nb + 1
    pool = torch.empty((nphys, 2, HKV, bs, d), device="cuda", dtype=DTYPE)
    pool.normal_(generator=gen)
    perm = torch.randperm(nphys - 1, device="cuda", generator=gen) + 1
    table = perm.view(batch, nb).to(torch.int32)
    seq = torch.full((batch,), ctx, dtype=torch.int32, device="cuda")
    return pool, table, seq


def make_selection(batch, nb, budget, gen, *, shared=False):
    """Sorted selection: block 0, the last 2 blocks, random others; width = round(budget * nb).
    ``shared``: one selection for all KV heads (what a FlashInfer page table can express)."""
    k = max(3, round(budget * nb))
    scores = torch.rand((batch, 1 if shared else HKV, nb), device="cuda", generator=gen)
    scores[..., 0] = 2.0
    scores[..., -2:] = 2.0
    ids = scores.topk(k, dim=-1).indices.sort(dim=-1).values.to(torch.int32)
    return ids.expand(batch, HKV, k).contiguous() if shared else ids.contiguous()


def contiguous_kv(pool, table):
    b, nb = table.shape
    _, _, hkv, bs, d = pool.shape
    blocks = pool[table.long()]  # [B, nb, 2, Hkv, BS, D]
    k = blocks[:, :, 0].permute(0, 2, 1, 3, 4).reshape(b, hkv, nb * bs, d).contiguous()
    v = blocks[:, :, 1].permute(0, 2, 1, 3, 4).reshape(b, hkv, nb * bs, d).contiguous()
    return k, v


def row(cx, op, path, ctx, batch, budget, bs, d, ms, nbytes, dense_ms, **extra):
    tbps = nbytes / (ms * 1e-3) / 1e12 if ms and nbytes else None
    r = {
        "op": op, "path": path, "context_len": ctx, "batch": batch, "budget": budget, "block_size": bs,
        "head_dim": d, "dtype": "bf16", "num_q_heads": HQ, "num_kv_heads": HKV,
        "us": round(ms * 1e3, 2), "median_ms": round(ms, 5), "bytes_read": int(nbytes) if nbytes else None,
        "effective_tbps": round(tbps, 4) if tbps else None,
        "pct_of_copy_bw": round(100 * tbps / cx.copy_tbps, 1) if tbps else None,
        "speedup_vs_dense": round(dense_ms / ms, 3) if dense_ms else None,
        "card": cx.card, "date": cx.date,
    }  # fmt: skip
    r.update(extra)
    return r


# ---------------------------------------------------------------------------------- FlashInfer peer


class FlashInferPeer:
    """FlashInfer's paged decode on our pool (HND layout: [pages, 2, Hkv, page_size, D], no copy), its
    page table = the selected blocks' physical ids. ``error`` holds why it cannot run, if it cannot."""

    def __init__(self, cache_dir):
        self.error = None
        self.version = None
        try:
            os.environ.setdefault("FLASHINFER_WORKSPACE_BASE", cache_dir)  # its JIT cache: must be writable
            import flashinfer

            self.fi = flashinfer
            self.version = flashinfer.__version__
            self.workspace = torch.empty(256 * 1024 * 1024, dtype=torch.uint8, device="cuda")
        except Exception as exc:  # noqa: BLE001 - recorded in every row instead
            self.error = f"import flashinfer: {type(exc).__name__}: {exc}"

    def decode_fn(self, q, pool, table, sel_shared, seq_len):
        """A callable running FlashInfer decode over the blocks ``sel_shared`` [B, S] of each sequence."""
        b, s = sel_shared.shape
        bs = pool.shape[3]
        indices = torch.gather(table, 1, sel_shared.long()).to(torch.int32).reshape(-1).contiguous()
        indptr = torch.arange(0, (b + 1) * s, s, dtype=torch.int32, device="cuda")
        # every selected block is full except possibly the sequence's last one (always selected here)
        last = torch.full((b,), seq_len - (seq_len - 1) // bs * bs, dtype=torch.int32, device="cuda")
        w = self.fi.BatchDecodeWithPagedKVCacheWrapper(
            self.workspace, kv_layout="HND", use_cuda_graph=True, paged_kv_indptr_buffer=indptr,
            paged_kv_indices_buffer=indices, paged_kv_last_page_len_buffer=last, backend="fa2",
        )  # fmt: skip
        w.plan(indptr, indices, last, HQ, HKV, pool.shape[4], bs, q_data_type=q.dtype, kv_data_type=pool.dtype)
        q3 = q[:, :, 0].contiguous()
        out = torch.empty_like(q3)
        return lambda: w.run(q3, pool, out=out)


# ---------------------------------------------------------------------------------- AOT through the driver


class AotPeer:
    """The AOT kernels for one (block_size, head_dim), launched through the CUDA driver: the plugin's
    unsplit PTX (``single``) and the split-K PTX (the same kernel, merge inside, scratch as I/O)."""

    def __init__(self, bs, d):
        from trt_plugins import ops
        from trt_plugins.aot import aot_launch
        from trt_plugins.spec import plugin_spec
        from ucm_trt.kernels._common import num_sms

        self.attrs = dict(num_q_heads=HQ, num_kv_heads=HKV, head_dim=d, block_size=bs, scale=d**-0.5)
        self.target = ops.device_target()
        self.spec = plugin_spec("UcmPagedSparseAttention")
        self.sms = num_sms(torch.device("cuda"))
        self.single = aot_launch("UcmPagedSparseAttention", self.attrs, DTYPE, 1, self.target)
        self._split = {}

    def split(self, tile=None):
        from trt_plugins._attention import aot_split_launch

        if tile not in self._split:
            self._split[tile] = aot_split_launch(self.attrs, DTYPE, 1, self.target, spec=self.spec, sms=self.sms,
                                                 tile=tile)
        return self._split[tile]

    @staticmethod
    def inputs(q, pool, table, seq, sel):
        """The op's inputs for a decode step: the chunk (the last token) as k/v, the pool as the past."""
        b = q.shape[0]
        bs = pool.shape[3]
        last = seq.long() - 1
        phys = table[torch.arange(b, device="cuda"), (last // bs)].long()
        k = pool[phys, 0, :, (last % bs)].unsqueeze(2).contiguous()  # [B, Hkv, 1, D]
        v = pool[phys, 1, :, (last % bs)].unsqueeze(2).contiguous()
        return {"q": q, "k": k, "v": v, "kv_pool": pool, "block_table": table, "seq_lens": seq, "selection": sel}

    def single_fn(self, inputs, out):
        from trt_plugins.aot import int_cdiv
        from trt_plugins.cuda_launch import PtxModule

        la = self.single
        mod = PtxModule(la.kernel.name, la.kernel.ptx)
        shapes = {n: tuple(t.shape) for n, t in inputs.items()}
        grid, extras = la.grid(shapes, int_cdiv), la.extras(shapes)
        ptrs = [t.data_ptr() for t in inputs.values()]

        def run():
            mod.launch(grid, la.block, la.kernel.shared_mem, ptrs, extras, [out.data_ptr()])

        return run, mod

    def split_fn(self, inputs, out, tile=None):
        """``(run, keep, splits)``: one driver launch of the split-K PTX; its counters (zeroed once here,
        left zero by every launch) are an eighth input, its partials a second output."""
        from trt_plugins.aot import int_cdiv
        from trt_plugins.cuda_launch import PtxModule

        la = self.split(tile)
        shapes = {n: tuple(t.shape) for n, t in inputs.items()}
        cnt_shape, part_shape = la.scratch(shapes)
        counters = torch.zeros(cnt_shape, dtype=torch.int32, device="cuda")
        partials = torch.empty(part_shape, dtype=torch.float32, device="cuda")
        mod = PtxModule(la.kernel.name, la.kernel.ptx)
        grid, extras = la.grid(shapes, int_cdiv), la.extras(shapes)
        ptrs = [x.data_ptr() for x in inputs.values()] + [counters.data_ptr()]

        def run():
            mod.launch(grid, la.block, la.kernel.shared_mem, ptrs, extras, [out.data_ptr(), partials.data_ptr()])

        return run, (mod, counters, partials), int(grid[2])


def jit_splits(batch, sel_width, bs):
    """The split count the JIT launch rule picks for this decode shape."""
    from ucm_trt.kernels._common import num_sms
    from ucm_trt.kernels.attention import plan_attention

    return plan_attention(batch=batch, num_kv_heads=HKV, group=HQ // HKV, tq=1, head_dim=D, block_size=bs,
                          work_items=sel_width + 2, sms=num_sms(torch.device("cuda"))).splits  # fmt: skip


# ---------------------------------------------------------------------------------- attention


def _try(rows, what, fn):
    try:
        return fn()
    except Exception as exc:  # noqa: BLE001 - keep going; the failure is a row
        import traceback

        traceback.print_exc()
        rows.append({"op": f"error_{what}", "error": f"{type(exc).__name__}: {exc}"})
        return None


def tile_sweep():
    """The JIT launch's tile neighbours: keys per tile x pipeline stages x warps (the default is 64 x 2 x 4)."""
    return [AttentionLaunch(block_n=bn, num_stages=ns, num_warps=nw)
            for bn in (64, 128) for ns in (2, 3, 4) for nw in (4, 8)]


def tile_fields(la, bs, d, *, dense):
    rule_n, warps, stages = default_warps_stages(dense=dense, decode=True, head_dim=d, block_size=bs)
    chosen = (rule_n or default_block_n(bs, d), stages, warps)
    return {"block_n": la.block_n, "num_stages": la.num_stages, "num_warps": la.num_warps,
            "chosen": (la.block_n, la.num_stages, la.num_warps) == chosen}


def bench_shape(cx, args, rows, fi, ctx, batch, bs, d, budgets, *, extras):
    """All rows of one (context, batch, block_size, head_dim)."""
    gen = torch.Generator(device="cuda").manual_seed(ctx + batch + bs + d)
    nb = ctx // bs
    pool, table, seq = make_pool(batch, ctx, bs, d, gen)
    q = torch.randn((batch, HQ, 1, d), device="cuda", dtype=DTYPE, generator=gen)
    out = torch.empty_like(q)
    k, v = contiguous_kv(pool, table)
    kv_bytes = batch * HKV * ctx * d * 2 * 2
    dense_ms = time_ms(lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True), cx.reps)
    k = v = None
    ws = AttentionWorkspace("cuda")  # the split-K scratch of every JIT row (one launch per call)

    def add(op, path, budget, ms, nbytes, **extra):
        rows.append(row(cx, op, path, ctx, batch, budget, bs, d, ms, nbytes, dense_ms, **extra))

    if (ctx, batch, d) not in args.sdpa_done:
        args.sdpa_done.add((ctx, batch, d))
        add("dense_sdpa", "torch", 1.0, dense_ms, kv_bytes)
    ms = time_ms(lambda: paged_sparse_attention(q, pool, table, seq, None, out=out, validate=False, workspace=ws),
                 cx.reps)
    add("ours_dense_paged", "jit", 1.0, ms, kv_bytes)
    if "dense_splits" in extras:  # the split rule's choice against its neighbours (5 = the former rule)
        for ns in (1, 4, 5, 6, 8, 12):
            la = AttentionLaunch(num_splits=ns)
            ms = time_ms(lambda: paged_sparse_attention(q, pool, table, seq, None, out=out, validate=False, workspace=ws,
                                                        launch=la), cx.reps)  # fmt: skip
            add("ours_dense_paged_splits", "jit", 1.0, ms, kv_bytes, num_splits=ns)
    if "dense_tiles" in extras:  # the launch's tile against its neighbours (head_dim 80/96: padded lanes)
        for la in tile_sweep():
            ms = time_ms(lambda: paged_sparse_attention(q, pool, table, seq, None, out=out, validate=False, workspace=ws,
                                                        launch=la), cx.reps)  # fmt: skip
            add("ours_dense_paged_tile", "jit", 1.0, ms, kv_bytes, **tile_fields(la, bs, d, dense=True))
    aot = _try(rows, "aot_compile", lambda: AotPeer(bs, d))
    for budget in budgets:
        sel = make_selection(batch, nb, budget, gen)
        shared = make_selection(batch, nb, budget, gen, shared=True)
        frac = sel.shape[-1] / nb
        sel_bytes = sel.numel() * bs * d * 2 * 2
        fi_ms, fi_err = None, fi.error
        if fi_err is None and "no_peer" not in extras:
            try:
                fi_ms = time_ms(fi.decode_fn(q, pool, table, shared[:, 0].contiguous(), ctx), cx.reps)
            except Exception as exc:  # noqa: BLE001
                msg = f"{type(exc).__name__}: {exc}"
                print(msg, flush=True)  # whole, into the log (a ninja failure's cause is at its end)
                fi_err = msg if len(msg) <= 3000 else msg[:600] + " [...] " + msg[-2400:]
                fi.error = fi_err  # do not retry (a failed JIT build would fail again)
        if fi_ms is not None:
            add("flashinfer_paged_decode", "flashinfer", frac, fi_ms, sel_bytes, flashinfer=fi.version,
                selection="head-shared")
        def vs(ms):
            return {"speedup_vs_flashinfer": round(fi_ms / ms, 3) if fi_ms else None, "flashinfer_error": fi_err}

        ms = time_ms(lambda: paged_sparse_attention(q, pool, table, seq, sel, out=out, validate=False, workspace=ws),
                     cx.reps)
        add("ours_sparse", "jit", frac, ms, sel_bytes, selection="per-head", **vs(ms))
        jit_ms = ms
        ms = time_ms(lambda: paged_sparse_attention(q, pool, table, seq, shared, out=out, validate=False,
                                                    workspace=ws), cx.reps)
        add("ours_sparse_shared", "jit", frac, ms, sel_bytes, selection="head-shared", **vs(ms))
        if aot is not None:
            inputs = AotPeer.inputs(q, pool, table, seq, sel)

            def aot_rows():
                # the AOT output checked against the runtime kernel's on these inputs before it is timed
                ref = paged_sparse_attention(q, pool, table, seq, sel, out=torch.empty_like(out), validate=False,
                                             workspace=ws)  # fmt: skip
                fn, keep, splits = aot.split_fn(inputs, out)
                out.fill_(float("nan"))
                fn()
                diff = float((out.float() - ref.float()).abs().max())  # NaN if anything was left unwritten
                ms = time_ms(fn, cx.reps)
                add("ours_sparse", "aot", frac, ms, sel_bytes, selection="per-head", launches=1, splits=splits,
                    jit_splits=jit_splits(batch, sel.shape[-1], bs), aot_vs_jit=round(jit_ms / ms, 3),
                    max_abs_diff_vs_jit=diff, matches_jit=diff <= 2e-2, **vs(ms))
                fn, keep2 = aot.single_fn(inputs, out)
                ms = time_ms(fn, cx.reps)
                add("ours_sparse_nosplit", "aot", frac, ms, sel_bytes, selection="per-head", launches=1, splits=1,
                    aot_vs_jit=round(jit_ms / ms, 3))
                del keep, keep2
                if "aot_tiles" in extras and abs(budget - 0.125) < 1e-6:  # the AOT tile rule's choice against the other tiles that fit 48 KiB
                    from dataclasses import replace

                    chosen = aot.split().config
                    for bn, ns in ((16, 1), (16, 2), (16, 3), (16, 4), (32, 1), (32, 2), (64, 1)):
                        tile = replace(chosen, block_n=bn, num_stages=ns)
                        try:
                            fn, keep3, _ = aot.split_fn(inputs, out, tile)
                        except Exception as exc:  # noqa: BLE001 - over the limit: a row saying so
                            rows.append({"op": "ours_sparse_aot_tile", "block_n": bn, "num_stages": ns,
                                         "batch": batch, "error": f"{type(exc).__name__}"})
                            continue
                        ms = time_ms(fn, cx.reps)
                        add("ours_sparse_aot_tile", "aot", frac, ms, sel_bytes, block_n=bn, num_stages=ns,
                            chosen=(bn, ns) == (chosen.block_n, chosen.num_stages), splits=splits,
                            aot_vs_jit=round(jit_ms / ms, 3))
                        del keep3

            _try(rows, "aot_run", aot_rows)
        if "guard" in extras:
            guard = IndexGuard("cuda", ATTENTION_GUARD_CODES)
            ms = time_ms(lambda: paged_sparse_attention(q, pool, table, seq, sel, out=out, validate=False, workspace=ws,
                                                        guard=guard), cx.reps)  # fmt: skip
            add("ours_sparse_guard", "jit", frac, ms, sel_bytes, selection="per-head",
                guard_overhead_pct=round(100 * (ms / jit_ms - 1), 2))
            guard.check("benchmark")  # good ids: the flag must be clear
        if "jit_tiles" in extras and abs(budget - 0.125) < 1e-6:
            for la in tile_sweep():
                ms = time_ms(lambda: paged_sparse_attention(q, pool, table, seq, sel, out=out, validate=False,
                                                            workspace=ws, launch=la), cx.reps)  # fmt: skip
                add("ours_sparse_tile", "jit", frac, ms, sel_bytes, selection="per-head", **tile_fields(la, bs, d, dense=False),
                    vs_default=round(jit_ms / ms, 3), **vs(ms))
            # Triton 3.6 (the lent cards') gives the default tile 162 registers, 3 CTAs per SM; capped:
            for cap in (128, 96):
                la = AttentionLaunch(max_registers=cap)
                ms = time_ms(lambda: paged_sparse_attention(q, pool, table, seq, sel, out=out, validate=False,
                                                            workspace=ws, launch=la), cx.reps)  # fmt: skip
                add("ours_sparse_maxnreg", "jit", frac, ms, sel_bytes, selection="per-head", max_registers=cap,
                    vs_default=round(jit_ms / ms, 3), **vs(ms))
        if "ppsm" in extras:
            for pps in (1, 2, 4, 8):
                la = AttentionLaunch(programs_per_sm=pps)
                ms = time_ms(lambda: paged_sparse_attention(q, pool, table, seq, sel, out=out, validate=False, workspace=ws,
                                                            launch=la), cx.reps)  # fmt: skip
                add("ours_sparse_ppsm", "jit", frac, ms, sel_bytes, programs_per_sm=pps)
        if "rerope" in extras:
            ms = time_ms(lambda: paged_rerope_attention(q, pool, table, seq, sel, window=32768, theta=1e6,
                                                        logn_training_length=32768, out=out, validate=False, workspace=ws),
                         cx.reps)  # fmt: skip
            add("ours_rerope_sparse", "jit", frac, ms, sel_bytes, window=32768)
    pool = table = None
    torch.cuda.empty_cache()
    print(f"attention ctx={ctx} batch={batch} bs={bs} d={d} done", flush=True)


def bench_attention(cx, args, rows):
    """Every attention shape; the rows are saved after each shape, and no new shape starts after ``--max-minutes``."""
    fi = FlashInferPeer(args.flashinfer_cache)
    rows.append({"op": "flashinfer_status", "flashinfer": fi.version, "flashinfer_error": fi.error})
    big = max(args.contexts)
    args.sdpa_done = set()
    for ctx in [] if args.odd_head_dims_only else args.contexts:
        for batch in args.batches:
            for bs in args.block_sizes if ctx == big else [64]:
                extras = {"dense_splits"} if (ctx != big and batch == 8) else set()
                budgets = [1 / 8]
                if ctx == big and bs == 64:
                    budgets = args.budgets
                    extras |= {"guard", "rerope", "aot_tiles", "jit_tiles"} | ({"ppsm"} if batch == 1 else set())
                if args.out_of_time(f"shape_{ctx}_{batch}_{bs}"):
                    continue
                _try(rows, f"shape_{ctx}_{batch}_{bs}", lambda: bench_shape(
                    cx, args, rows, fi, ctx, batch, bs, D, budgets, extras=extras))
                args.save()
    for d in args.odd_head_dims:
        for batch in args.batches:
            if args.out_of_time(f"shape_d{d}_{batch}"):
                continue
            _try(rows, f"shape_d{d}_{batch}", lambda: bench_shape(
                cx, args, rows, fi, big, batch, 64, d, [1 / 8],
                extras={"no_peer"} | ({"dense_tiles"} if batch == max(args.batches) else set())))
            args.save()
    status = next(r for r in rows if r["op"] == "flashinfer_status")
    status["flashinfer_error"] = fi.error


def bench_retrieval(cx, args, rows):
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
        rows.append(row(cx, "retrieval_hash_topk", "jit", ctx, batch, 1 / 8, BS, D, ms, code_bytes, None,
                        us_per_layer=round(ms * 1e3, 2), hash_bits=bits))
        ms = time_ms(lambda: hamming_block_scores(q, codes, w, table, seq, validate=False), args.reps)
        rows.append(row(cx, "retrieval_hash_scores_only", "jit", ctx, batch, 1 / 8, BS, D, ms, code_bytes, None,
                        us_per_layer=round(ms * 1e3, 2), hash_bits=bits))
        # the default preset's width (GSA_ON_DEVICE_HASH_BITS_PER_DIM["default"] bits per channel)
        wide = GSA_ON_DEVICE_HASH_BITS_PER_DIM["default"] * D
        codes_w = torch.randint(0, 256, (nphys, HKV, BS, wide // 8), device="cuda", dtype=torch.uint8, generator=gen)
        w_w = torch.randn((D, wide), device="cuda", generator=gen)
        ms = time_ms(lambda: hash_retrieve(q, codes_w, w_w, table, seq, top_k=top_k, sink_blocks=1, local_blocks=2,
                                           shared=True, validate=False), args.reps)
        rows.append(row(cx, "retrieval_hash_topk", "jit", ctx, batch, 1 / 8, BS, D, ms, codes_w[1:].numel(), None,
                        us_per_layer=round(ms * 1e3, 2), hash_bits=wide))
        scores = torch.randn((batch, HKV, nb), device="cuda", generator=gen)
        ms = time_ms(lambda: block_topk(scores, seq, top_k=top_k, block_size=BS, sink_blocks=1, local_blocks=2,
                                        largest=False, shared=True), args.reps)
        rows.append(row(cx, "retrieval_topk_only", "jit", ctx, batch, 1 / 8, BS, D, ms, scores.numel() * 4, None,
                        us_per_layer=round(ms * 1e3, 2)))
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
        rows.append(row(cx, "retrieval_dot_mean_topk", "jit", ctx, batch, 1 / 8, BS, D, ms, batch * nb * HKV * D * 2, None,
                        us_per_layer=round(ms * 1e3, 2)))
        ms = time_ms(quest_path, args.reps)
        rows.append(row(cx, "retrieval_quest_topk", "jit", ctx, batch, 1 / 8, BS, D, ms, batch * nb * HKV * D * 2 * 2, None,
                        us_per_layer=round(ms * 1e3, 2)))
        # the same two scorings fused with the top-k in one launch (kernels/fused_retrieval.py)
        for name, fn, nbytes in (
            ("retrieval_dot_fused", lambda: dot_retrieve(q, mean, table, seq, block_size=BS, top_k=top_k, sink_blocks=1,
                                                         local_blocks=2, validate=False), batch * nb * HKV * D * 2),
            ("retrieval_quest_fused", lambda: quest_retrieve(q, mean, kmax, table, seq, block_size=BS, top_k=top_k,
                                                             sink_blocks=1, local_blocks=2, validate=False),
             batch * nb * HKV * D * 2 * 2),
        ):  # fmt: skip
            ms = _try(rows, name, lambda fn=fn: time_ms(fn, args.reps))
            if ms is not None:
                rows.append(row(cx, name, "jit", ctx, batch, 1 / 8, BS, D, ms, nbytes, None,
                                us_per_layer=round(ms * 1e3, 2)))
        print(f"retrieval batch={batch} done", flush=True)


def print_table(rows, cx):
    print(f"\ncard: {cx.card}   measured copy bandwidth: {cx.copy_tbps:.3f} TB/s (read+write)   bf16, GQA 32/8")
    print(f"{'op':<26}{'path':<11}{'ctx':>7}{'B':>3}{'bs':>4}{'d':>4}{'budget':>7}{'us':>9}{'%copy':>7}"
          f"{'x dense':>8}{'x FI':>7}")
    for r in rows:
        if r.get("us") is None or r["op"] in ("ours_sparse_ppsm", "ours_dense_paged_splits", "ours_sparse_aot_tile",
                                              "ours_sparse_maxnreg"):
            continue
        sp = f"{r['speedup_vs_dense']:.2f}" if r.get("speedup_vs_dense") else "-"
        fi = f"{r['speedup_vs_flashinfer']:.2f}" if r.get("speedup_vs_flashinfer") else "-"
        pct = f"{r['pct_of_copy_bw']:.1f}" if r.get("pct_of_copy_bw") else "-"
        print(f"{r['op']:<26}{r['path']:<11}{r['context_len']:>7}{r['batch']:>3}{r['block_size']:>4}{r['head_dim']:>4}"
              f"{r['budget']:>7.3f}{r['us']:>9.1f}{pct:>7}{sp:>8}{fi:>7}")
    for r in rows:
        if r["op"] == "ours_sparse_ppsm":
            print(f"batch-1 split rule: programs_per_sm={r['programs_per_sm']}: {r['us']:.1f} us")
        if r["op"] == "ours_sparse_maxnreg" and r.get("us") is not None:
            print(f"max_registers={r['max_registers']} batch {r['batch']}: {r['us']:.1f} us ({r['vs_default']}x default)")
        if r["op"] == "ours_sparse_aot_tile" and r.get("us") is not None:
            print(f"AOT split tile batch {r['batch']} budget {r['budget']:.3f}: BLOCK_N={r['block_n']} "
                  f"stages={r['num_stages']}{' (chosen)' if r['chosen'] else ''}: {r['us']:.1f} us "
                  f"({r['aot_vs_jit']}x JIT)")
        if r["op"] == "ours_dense_paged_splits":
            print(f"dense paged ctx {r['context_len']} batch {r['batch']}: num_splits={r['num_splits']}: {r['us']:.1f} us"
                  f" ({r['speedup_vs_dense']}x SDPA)")
    for r in rows:
        if r["op"].startswith("error_") or r["op"] in ("flashinfer_status", "skipped"):
            print(r)
        if r.get("matches_jit") is False:
            print(f"AOT OUTPUT DIFFERS from the runtime kernel's: batch {r['batch']} bs {r['block_size']} d {r['head_dim']}"
                  f" budget {r['budget']:.3f}: max |diff| {r['max_abs_diff_vs_jit']}")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--contexts", type=int, nargs="+", default=[32768, 131072])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--block-sizes", type=int, nargs="+", default=[16, 32, 64, 128],
                   help="at the largest context (smaller contexts: 64)")
    p.add_argument("--budgets", type=float, nargs="+", default=[1 / 4, 1 / 8, 1 / 16],
                   help="budgets at the largest context and block size 64 (others: 1/8)")
    p.add_argument("--odd-head-dims", type=int, nargs="*", default=[80, 96])
    p.add_argument("--odd-head-dims-only", action="store_true",
                   help="only the --odd-head-dims shapes (largest context; the dense tile sweep at the largest batch)")
    p.add_argument("--reps", type=int, default=30)
    p.add_argument("--flashinfer-cache", default=os.path.join(os.environ.get("TMPDIR", "/tmp"), "flashinfer-ws"),
                   help="FlashInfer's JIT cache (FLASHINFER_WORKSPACE_BASE; must be writable)")
    p.add_argument("--skip-retrieval", action="store_true")
    p.add_argument("--retrieval-first", action="store_true", help="run the retrieval rows before the attention rows")
    p.add_argument("--max-minutes", type=float, default=None,
                   help="start no new attention shape after this (skipped shapes are listed in a 'skipped' row)")
    p.add_argument("--out", default=os.environ.get("OUT", "."))
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_kernels.py needs a CUDA GPU")
    card = torch.cuda.get_device_name()
    date = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d")
    t0 = time.time()
    cx = Ctx(card, date, copy_bandwidth_tbps(), args.reps)
    rows = [{"op": "copy_bandwidth", "effective_tbps": round(cx.copy_tbps, 4), "card": card, "date": date,
             "torch": torch.__version__, "triton": __import__("triton").__version__}]  # fmt: skip
    slug = card.replace(" ", "-").replace("/", "-")
    path = os.path.join(args.out, f"kernels_{slug}_{date}.json")
    skipped = {"op": "skipped", "shapes": []}

    def save():
        with open(path + ".tmp", "w") as f:
            json.dump(rows + ([skipped] if skipped["shapes"] else []), f, indent=1)
        os.replace(path + ".tmp", path)

    def out_of_time(what):
        late = args.max_minutes is not None and time.time() - t0 > 60 * args.max_minutes
        if late:
            skipped["shapes"].append(what)
        return late

    args.save, args.out_of_time = save, out_of_time
    benches = [bench_attention] + ([] if args.skip_retrieval else [bench_retrieval])
    if args.retrieval_first:
        benches.reverse()
    for fn in benches:
        _try(rows, fn.__name__, lambda: fn(cx, args, rows))
        save()
    save()
    print(f"wrote {len(rows)} rows to {path} in {time.time() - t0:.0f} s")
    print_table(rows, cx)
    if skipped["shapes"]:
        print(f"skipped after --max-minutes {args.max_minutes}: {skipped['shapes']}")
    return 0 if not any(r["op"].startswith("error_") for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
