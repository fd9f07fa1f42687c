"""How delta-prefetch loads should move host -> device: speed of each way, and what it costs the
compute running beside it (issue 13 item 3). GPU only.

N blocks of one layer (Llama-1B shape ``2 x 8 heads x 64 tokens x 64 dims`` bf16 = 128 KiB, or the
8B shape with head_dim 128 = 256 KiB) are copied from a pinned host store at random host ids into a
device pool at random physical ids (what a retrieval with random turnover produces), by:

* ``kernel``      ``ucm_trt.kernels.copy_blocks``: one launch, SMs read the pinned store over the bus;
* ``per_block``   one ``copy_`` per block (DMA; one driver call each);
* ``runs``        one ``copy_`` per run of consecutive host *and* physical ids (DMA); with random ids a
                  run is ~1 block, so this is ``per_block`` plus the run search (``--run-length`` makes
                  the host ids come in runs, the best case of coalescing);
* ``staged``      the runtime's ``load_method="staged"``: CPU ``index_select`` into a pinned staging
                  slot (64 blocks, two slots), one DMA copy per slot, one ``index_copy_`` on the device;
* ``batch_dma``   every block in ONE driver call, ``cuMemcpyBatchAsync`` (CUDA 12.8+ driver, through
                  ``ucm_trt.runtime.batch_copy``; copy engines, no SMs); probed first in a child
                  process, skipped with the reason when the driver lacks it or it fails;
* ``runtime_<method>``: the runtime's own load path (``KVManager._copy_layers`` with that
                  ``load_method``) for the same blocks spread over 16 layers.

Per way: the copy alone (CUDA events, median of ``--reps``) -> GB/s and the host time spent issuing
it; then the same copy repeated beside a compute stream running the paged sparse decode attention
(batch 4, 128K context, 1/8 of blocks; ``--compute gemv`` = a bf16 GEMV instead): the compute's
slowdown (time with / time alone) and the copy's GB/s while it overlaps. Writes
``OUT/block_copy_<card>_<date>.json`` and prints a table last.

    python benchmarks/bench_block_copy.py --out benchmarks/results/runtime        # ~1 minute on an H100
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))

from ucm_trt.kernels.block_copy import copy_blocks  # noqa: E402

SHAPES = {"llama1b": (2, 8, 64, 64), "8b": (2, 8, 64, 128)}


def _median_ms(fn, reps: int) -> tuple[float, float]:
    """(median GPU ms between events around ``fn``, median host ms to issue it)."""
    fn()
    torch.cuda.synchronize()
    gpu, host = [], []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        t0 = time.perf_counter()
        fn()
        host.append(1e3 * (time.perf_counter() - t0))
        b.record()
        b.synchronize()
        gpu.append(a.elapsed_time(b))
    return statistics.median(gpu), statistics.median(host)


def _runs(hid: np.ndarray, did: np.ndarray) -> list[tuple[int, int, int]]:
    """(host start, device start, length) of maximal runs where both ids go up by one."""
    order = np.argsort(hid, kind="stable")
    h, d = hid[order], did[order]
    brk = np.flatnonzero((np.diff(h) != 1) | (np.diff(d) != 1)) + 1
    starts = np.concatenate([[0], brk])
    ends = np.concatenate([brk, [h.size]])
    return [(int(h[s]), int(d[s]), int(e - s)) for s, e in zip(starts, ends, strict=True)]


def _probe_batch_dma() -> str | None:
    """Run one small batched copy in a child process (a driver that crashes on it must not take this
    run down); None if it copied right, else why not."""
    import subprocess

    code = (
        "import sys, torch, numpy as np; sys.path.insert(0, {!r})\n"
        "from ucm_trt.runtime.batch_copy import BatchMemcpy\n"
        "h = torch.randn(8, 1024).pin_memory(); d = torch.zeros(8, 1024, device='cuda'); s = torch.cuda.Stream()\n"
        "ids = np.array([5, 1, 7]); nb = 4096\n"
        "BatchMemcpy().copy(d.data_ptr() + np.arange(3, dtype=np.uint64) * nb, h.data_ptr() + ids.astype(np.uint64) * nb,"
        " nb, s.cuda_stream)\n"
        "s.synchronize(); assert torch.equal(d[:3].cpu(), h[ids]), 'wrong contents'\n"
    ).format(str(Path(__file__).resolve().parents[1] / "python"))
    try:
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired:
        return "probe timed out"
    if r.returncode != 0:
        return f"probe exit {r.returncode}: {(r.stderr.strip().splitlines() or ['?'])[-1]}"
    return None


def _compute(kind: str, shape: tuple[int, ...]):
    """A step-like compute kernel for the slowdown measurement and its description."""
    if kind == "gemv":
        w = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
        x = torch.randn(8192, 8, dtype=torch.bfloat16, device="cuda")
        return (lambda: w @ x), "bf16 GEMV 8192x8192 @ 8192x8"
    from ucm_trt.kernels import paged_sparse_attention

    b, ctx, bs = 4, 131072, shape[2]
    hkv, d = shape[1], shape[3]
    nb = ctx // bs
    pool = torch.randn(b * nb + 1, *shape, dtype=torch.bfloat16, device="cuda")
    table = (1 + torch.arange(b * nb, dtype=torch.int32, device="cuda")).view(b, nb)
    seq = torch.full((b,), ctx, dtype=torch.int32, device="cuda")
    k = nb // 8
    sel = torch.sort(torch.stack([torch.stack([torch.randperm(nb)[:k] for _ in range(hkv)]) for _ in range(b)]),
                     dim=-1).values.to(torch.int32).cuda()
    q = torch.randn(b, 4 * hkv, 1, d, dtype=torch.bfloat16, device="cuda")
    out = torch.empty_like(q)
    fn = lambda: paged_sparse_attention(q, pool, table, seq, sel, out=out, validate=False)  # noqa: E731
    return fn, f"paged sparse decode attention, batch {b}, {ctx // 1024}K, 1/8 of blocks, {4 * hkv}q/{hkv}kv d{d}"


def _concurrent(copy_fn, repeat: int, compute_fn, launches: int, side: torch.cuda.Stream) -> tuple[float, float]:
    """(compute ms, copy ms) with ``repeat`` copies on ``side`` beside ``launches`` compute launches;
    both streams are held at a gate (a sleep kernel) until everything is enqueued."""
    main = torch.cuda.current_stream()
    torch.cuda.synchronize()
    torch.cuda._sleep(50_000_000)  # ~25-30 ms: the host enqueues both sides meanwhile
    gate = torch.cuda.Event()
    gate.record(main)
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    c, d = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record(main)
    for _ in range(launches):
        compute_fn()
    b.record(main)
    side.wait_event(gate)
    with torch.cuda.stream(side):
        c.record(side)
        for _ in range(repeat):
            copy_fn()
        d.record(side)
    torch.cuda.synchronize()
    return a.elapsed_time(b), c.elapsed_time(d)


def _methods(host, dev, hid: np.ndarray, did: np.ndarray, stream: torch.cuda.Stream, layers: int):
    """name -> (copy function on the current stream, note)."""
    hid_d = torch.from_numpy(hid).cuda()
    did_d = torch.from_numpy(did).cuda()
    out = {"kernel": (lambda: copy_blocks(host, dev, hid_d, did_d), "SMs read pinned memory")}
    pairs = list(zip(hid.tolist(), did.tolist(), strict=True))

    def per_block():
        for h, d in pairs:
            dev[d].copy_(host[h], non_blocking=True)

    out["per_block"] = (per_block, "DMA, one call per block")
    runs = _runs(hid, did)

    def by_runs():
        for h, d, n in _runs(hid, did):
            dev[d : d + n].copy_(host[h : h + n], non_blocking=True)

    out["runs"] = (by_runs, f"DMA, {len(runs)} runs of consecutive ids")
    slots = [torch.empty(64, *host.shape[1:], dtype=host.dtype).pin_memory() for _ in range(2)]
    dslots = [torch.empty(64, *host.shape[1:], dtype=host.dtype, device="cuda") for _ in range(2)]
    events: list[torch.cuda.Event | None] = [None, None]
    hid_t = torch.from_numpy(hid)

    def staged():
        cur = torch.cuda.current_stream()
        for k, lo in enumerate(range(0, hid.size, 64)):
            hi = min(hid.size, lo + 64)
            s = k % 2
            if events[s] is not None:
                events[s].synchronize()  # the slot's last DMA ran: the host may overwrite it
            torch.index_select(host, 0, hid_t[lo:hi], out=slots[s][: hi - lo])
            dslots[s][: hi - lo].copy_(slots[s][: hi - lo], non_blocking=True)
            events[s] = torch.cuda.Event()
            events[s].record(cur)
            dev.index_copy_(0, did_d[lo:hi], dslots[s][: hi - lo])

    out["staged"] = (staged, "CPU gather to pinned, DMA, device scatter")
    why = _probe_batch_dma()
    if why is None:
        from ucm_trt.runtime.batch_copy import BatchMemcpy

        dma = BatchMemcpy()
        nbytes = host[0].numel() * host.element_size()
        srcs = np.uint64(host.data_ptr()) + hid.astype(np.uint64) * np.uint64(nbytes)
        dsts = np.uint64(dev.data_ptr()) + did.astype(np.uint64) * np.uint64(nbytes)
        dma_stream = torch.cuda.Stream()  # the call refuses the legacy default stream (CUresult 1)

        def batch_dma():
            cur = torch.cuda.current_stream()
            dma_stream.wait_stream(cur)
            dma.copy(dsts, srcs, nbytes, dma_stream.cuda_stream)
            cur.wait_stream(dma_stream)

        out["batch_dma"] = (batch_dma, f"DMA, one {dma.name} call")
    else:
        out["batch_dma"] = (None, f"unavailable: {why}")
    for method in ("kernel", "staged") + (("batch_dma",) if why is None else ()):
        out[f"runtime_{method}"] = _runtime_path(host, hid, did, layers, method)
    return out


def _runtime_path(host, hid, did, layers, method):
    """The runtime's own load path for the same blocks spread over ``layers`` layers."""
    from ucm_trt.runtime.kv import KVLayout, KVManager

    _, hkv, bs, d = host.shape[1:]
    n = hid.size
    per = -(-n // layers)
    layout = KVLayout(num_layers=layers, num_kv_heads=hkv, head_dim=d, block_size=bs, dtype=host.dtype,
                      device=torch.device("cuda"))
    kv = KVManager(layout, max_batch=1, max_blocks=8, num_device_blocks=per + 2, offload=True,
                   num_host_blocks=1, load_method=method)
    kv.host = [host] * layers  # every layer reads the one pinned store of the benchmark (no more host memory)
    copies = []
    for layer in range(layers):
        h = hid[layer * per : (layer + 1) * per]
        copies.append([(h, 1 + np.random.default_rng(layer).permutation(per + 1)[: h.size].astype(np.int64))])

    def run():
        kv._copy_layers(copies, to_device=True)
        torch.cuda.current_stream().wait_stream(kv.copy_stream)

    return run, f"KVManager load path, {layers} layers, load_method={method!r}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--blocks", type=int, nargs="+", default=[256, 3500])
    p.add_argument("--shape", choices=sorted(SHAPES), default="llama1b")
    p.add_argument("--run-length", type=int, default=1, help="host ids come in runs of this many consecutive ids")
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--compute", choices=("attention", "gemv"), default="attention")
    p.add_argument("--layers", type=int, default=16, help="layers of the runtime_* rows")
    p.add_argument("--out", type=Path, default=None, help="folder for the JSON")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2
    shape = SHAPES[args.shape]
    compute_fn, compute_what = _compute(args.compute, shape)
    one_ms, _ = _median_ms(compute_fn, args.reps)
    launches = max(1, math.ceil(30.0 / max(one_ms, 1e-3)))  # ~30 ms of compute
    compute_alone, _ = _median_ms(lambda: [compute_fn() for _ in range(launches)], 3)
    side = torch.cuda.Stream()
    card = torch.cuda.get_device_name()
    rows = []
    out_file = None
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        out_file = args.out / f"block_copy_{card.replace(' ', '-')}_{datetime.date.today().isoformat()}.json"
    rng = np.random.default_rng(0)
    for n in args.blocks:
        store = 4 * n
        host = torch.randn(store, *shape, dtype=torch.bfloat16).pin_memory()
        dev = torch.zeros(2 * n, *shape, dtype=torch.bfloat16, device="cuda")
        starts = rng.permutation(store // args.run_length)[: -(-n // args.run_length)] * args.run_length
        hid = (starts[:, None] + np.arange(args.run_length)[None]).reshape(-1)[:n].astype(np.int64)
        did = rng.permutation(2 * n)[:n].astype(np.int64)
        nbytes = n * host[0].numel() * host.element_size()
        want = host[torch.from_numpy(hid)].cuda()
        for name, (fn, note) in _methods(host, dev, hid, did, side, args.layers).items():
            row = {"method": name, "blocks": n, "block_bytes": host[0].numel() * 2, "bytes": nbytes, "note": note,
                   "shape": args.shape, "run_length": args.run_length}
            if fn is None:
                row["error"] = note
                rows.append(row)
                continue
            try:
                dev.zero_()
                fn()
                torch.cuda.synchronize()
                if not name.startswith("runtime_") and not torch.equal(dev[torch.from_numpy(did).cuda()], want):
                    raise RuntimeError("copied blocks differ from the source")
                ms, host_ms = _median_ms(fn, args.reps)
                repeat = max(1, math.ceil(compute_alone / max(ms, 1e-3)))
                with_ms, copy_ms = _concurrent(fn, repeat, compute_fn, launches, side)
                row.update(ms=ms, GBps=nbytes / ms / 1e6, host_issue_ms=host_ms, compute_alone_ms=compute_alone,
                           compute_with_copy_ms=with_ms, compute_slowdown=with_ms / compute_alone,
                           copy_GBps_under_compute=repeat * nbytes / copy_ms / 1e6, repeats=repeat)
            except Exception as exc:  # noqa: BLE001 - one way failing must not lose the others
                row["error"] = f"{type(exc).__name__}: {exc}"
            rows.append(row)
            if out_file:
                out_file.write_text(json.dumps({"card": card, "compute": compute_what, "rows": rows}, indent=2) + "\n")
    print(f"\n{card}; compute beside the copy: {compute_what}, {compute_alone:.2f} ms alone")
    print(f"{'method':>15} {'blocks':>6} {'MiB':>7} {'ms':>8} {'GB/s':>6} {'host ms':>8} {'compute x':>9} "
          f"{'GB/s beside':>11}")
    for r in rows:
        if "error" in r:
            print(f"{r['method']:>15} {r['blocks']:>6} {r['bytes'] / 2**20:7.1f}  {r['error']}")
            continue
        print(f"{r['method']:>15} {r['blocks']:>6} {r['bytes'] / 2**20:7.1f} {r['ms']:8.2f} {r['GBps']:6.1f} "
              f"{r['host_issue_ms']:8.2f} {r['compute_slowdown']:9.3f} {r['copy_GBps_under_compute']:11.1f}")
    if out_file:
        print(f"wrote {out_file}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
