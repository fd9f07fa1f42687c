"""CPU speed measurements: retrieval cost per decode step and offload traffic.

Everything here measures real work with ``time.perf_counter``: each figure is the median of
``repeats`` timed runs after ``warmup`` untimed ones. Nothing is modelled or hard-coded.

Retrieval (DESIGN §5: <= 1 ms per step per sequence at 1024 blocks x 8 KV heads x 32 layers)
------------------------------------------------------------------------------------------
One decode step of ESA retrieval for one sequence = for every layer: GQA-averaged query . mean-K
block representations, then top-k under the budget with forced sink / local windows. Variants:

- ``all_layers``: what the runtime's ESA policy runs now (``ESAPolicy._select_all``), one call for
  every layer: the representations live in one :class:`~ucm_trt.sparse.batched.BlockRepStore`
  ``[L, Hkv, D, nb]``, scored by one batched matmul (:func:`~ucm_trt.sparse.batched.batched_dot_scores`)
  and selected by one :func:`~ucm_trt.sparse.batched.select_batched`. Its rows also carry the
  scoring and the selection timed alone (``score_ms``, ``select_ms``).
- ``all_layers_per_head``: the same with ``selection="per_head"`` (every KV head its own top-k).
- ``per_layer``: one :func:`~ucm_trt.sparse.score.dot_scores` +
  ``ucm_trt.sparse.policies.base.select_from_scores`` call per layer: the runtime's path before the
  batched one, still the reference (``ESAPolicy._select``) the batched path is tested against.
- ``batched``: the per-layer library functions with the layers folded into their batch dimension
  (one ``dot_scores`` / ``select_blocks`` call over ``[layers, ...]``); checked equal to ``per_layer``.
- ``bare_torch_floor``: one matmul + one ``topk`` in bare torch, no checks or output format.
- ``score_only_*``: scoring alone with bfloat16 / float16 representations (half the bytes), to
  see whether half-precision storage would pay (:func:`half_storage_case`); no selection.

Equality is checked on every run: ``batched`` == ``per_layer``; ``all_layers`` == ``select_from_scores``
applied layer by layer to its own scores (exact), its scores == ``dot_scores``' to float32
rounding, and the number of layers whose selection differs from ``per_layer`` (possible only
where two blocks' scores are within rounding at the budget's edge) is recorded in the row.

Offload
-------
ESA and GSA through :class:`ucm_trt.runtime.Engine` with the torch backend on CPU, on a tiny random
Llama; bytes moved host -> device per decode step and the cache hit rate from the runtime's
metrics, swept over retrieval stride and budget ratio; every step's ``bytes_h2d`` is checked
against ``blocks_loaded x block_bytes``.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from ucm_trt.config import Budget, DenseLayers, SparseConfig
from ucm_trt.sparse.batched import BlockRepStore, batched_dot_scores, select_batched
from ucm_trt.sparse.policies.base import select_from_scores
from ucm_trt.sparse.score import dot_scores, reduce_scores
from ucm_trt.sparse.select import select_blocks

__all__ = [
    "RetrievalShape",
    "OffloadSetup",
    "machine_facts",
    "time_median",
    "retrieval_case",
    "all_layers_case",
    "bench_retrieval",
    "bench_offload",
    "python_overhead",
    "plan_cost",
    "read_bandwidth_gbps",
    "SCHEMA_VERSION",
]

SCHEMA_VERSION = 1
#: DESIGN §5 target: CPU retrieval per step per sequence at 1024 blocks x 8 KV heads x 32 layers.
TARGET_MS_PER_STEP = 1.0
TARGET_BLOCKS = 1024

Progress = Callable[[str], None]


def _pos(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


@dataclasses.dataclass(frozen=True, kw_only=True)
class RetrievalShape:
    """Model shape of the retrieval benchmark (defaults: a Llama-3-8B-like 32 layers, 32q/8kv, d=128)."""

    num_layers: int = 32
    num_heads: int = 32
    num_kv_heads: int = 8
    head_dim: int = 128
    block_size: int = 128

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            _pos(f.name, getattr(self, f.name))
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads must be a multiple of num_kv_heads, got num_heads={self.num_heads}, "
                f"num_kv_heads={self.num_kv_heads}"
            )


def machine_facts() -> dict[str, Any]:
    """CPU model, cores, torch threads, load average, date (UTC), versions."""
    from ucm_trt.eval.results import cpu_model_name

    try:
        load = list(os.getloadavg())
    except OSError:
        load = None
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:
        affinity = None
    return {
        "cpu_model": cpu_model_name(),
        "logical_cores": os.cpu_count(),
        "cores_available": affinity,
        "torch_threads_default": torch.get_num_threads(),
        "load_average_1_5_15": load,
        "date_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
    }


def read_bandwidth_gbps(*, mbytes: int = 256, warmup: int = 1, repeats: int = 5, threads: int = 1) -> float:
    """Measured single-pass read bandwidth (GB/s) of a float32 ``sum`` over ``mbytes`` MiB with ``threads``.

    Scoring reads every block representation once per step; ``rep bytes / this`` (``read_floor_ms``)
    is the time a plain torch reduction needs to stream them once. A reference rate, not a hard
    floor: an explicit matmul can stream faster than ``sum`` (the full run shows it at 4096 blocks).
    """
    _pos("mbytes", mbytes)
    x = torch.ones(mbytes * (1 << 20) // 4)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(_pos("threads", threads))
        t = time_median(lambda: x.sum(), warmup=warmup, repeats=repeats)
    finally:
        torch.set_num_threads(before)
    return x.numel() * 4 / (t["median_ms"] * 1e-3) / 1e9


def time_median(fn: Callable[[], Any], *, warmup: int, repeats: int) -> dict[str, float]:
    """Run ``fn`` ``warmup`` times untimed, then ``repeats`` timed; milliseconds median/min/max."""
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise ValueError(f"warmup must be an int >= 0, got {warmup!r}")
    _pos("repeats", repeats)
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return {"median_ms": statistics.median(times), "min_ms": min(times), "max_ms": max(times),
            "repeats": repeats, "warmup": warmup}


def retrieval_case(shape: RetrievalShape, num_blocks: int, sparse: SparseConfig, *, seed: int = 0):
    """Random decode queries ``[L, Hq, D]`` and mean-K reps ``[L, nb, Hkv, D]`` and the two step functions.

    Returns ``(per_layer, batched)``: callables that each run one decode step's retrieval for one
    sequence over all layers and return the selections (``list`` of ``[Hkv, S]`` / ``[L, Hkv, S]``).
    """
    _pos("num_blocks", num_blocks)
    if not isinstance(sparse, SparseConfig):
        raise TypeError(f"sparse must be a SparseConfig, got {type(sparse).__name__}")
    if sparse.scoring != "dot" or sparse.representation != "mean":
        raise ValueError(f"sparse must use ESA scoring ('dot' over 'mean' reps), got scoring={sparse.scoring!r}, "
                         f"representation={sparse.representation!r}")
    g = torch.Generator().manual_seed(seed)
    L, hq, hkv, d = shape.num_layers, shape.num_heads, shape.num_kv_heads, shape.head_dim
    q = torch.randn(L, hq, d, generator=g)
    reps = torch.randn(L, num_blocks, hkv, d, generator=g)
    q_layers = [q[i].clone() for i in range(L)]  # the runtime keeps one tensor per layer
    r_layers = [reps[i].clone() for i in range(L)]
    nb_batch = torch.full((L,), num_blocks, dtype=torch.int32)

    def per_layer() -> list[torch.Tensor]:
        out = []
        for layer in range(L):
            scores = dot_scores(q_layers[layer][None], r_layers[layer])[0]  # [Hkv, nb]
            out.append(select_from_scores(scores, num_blocks, sparse, "dot", hkv))
        return out

    def batched() -> torch.Tensor:
        s = dot_scores(q, reps)  # [L, Hkv, nb]: layers folded into the batch dim
        if sparse.selection == "shared":
            s = reduce_scores(s, "dot")
        return select_blocks(s, nb_batch, sparse, num_kv_heads=hkv)

    return per_layer, batched


def _case_layers(shape: RetrievalShape, num_blocks: int, *, seed: int = 0):
    """``(q [Hq, D], reps [nb, Hkv, D])`` per layer, the data of :func:`retrieval_case` with ``seed``."""
    g = torch.Generator().manual_seed(seed)
    L, hq, hkv, d = shape.num_layers, shape.num_heads, shape.num_kv_heads, shape.head_dim
    q = torch.randn(L, hq, d, generator=g)
    reps = torch.randn(L, num_blocks, hkv, d, generator=g)
    return [(q[i], reps[i]) for i in range(L)]


def all_layers_case(shape: RetrievalShape, num_blocks: int, sparse: SparseConfig, *, seed: int = 0):
    """The runtime's batched retrieval on the same random data as :func:`retrieval_case` (same seed).

    Returns ``(step, score, select, reference)``: ``step()`` scores and selects every layer
    (``[L, Hkv, S]``), ``score()`` / ``select()`` time the two halves alone, and
    ``reference()`` applies the per-layer ``select_from_scores`` to ``step``'s own scores
    (for the exactness check).
    """
    _pos("num_blocks", num_blocks)
    if not isinstance(sparse, SparseConfig):
        raise TypeError(f"sparse must be a SparseConfig, got {type(sparse).__name__}")
    g = torch.Generator().manual_seed(seed)
    L, hq, hkv, d = shape.num_layers, shape.num_heads, shape.num_kv_heads, shape.head_dim
    q = torch.randn(L, hq, d, generator=g)
    store = BlockRepStore(num_layers=L, num_kv_heads=hkv, head_dim=d, capacity=num_blocks)
    store.append(torch.randn(L, num_blocks, hkv, d, generator=g))
    reps = store.reps()
    scores = batched_dot_scores(q, reps)

    def step() -> torch.Tensor:
        return select_batched(batched_dot_scores(q, reps), num_blocks, sparse, "dot", hkv)

    def score() -> torch.Tensor:
        return batched_dot_scores(q, reps)

    def select() -> torch.Tensor:
        return select_batched(scores, num_blocks, sparse, "dot", hkv)

    def reference() -> list[torch.Tensor]:
        return [select_from_scores(scores[layer], num_blocks, sparse, "dot", hkv) for layer in range(L)]

    return step, score, select, reference


HALF_STORAGE_VARIANTS = ("score_only_bf16_matmul", "score_only_bf16_upcast", "score_only_fp16_upcast")


def half_storage_case(shape: RetrievalShape, num_blocks: int, variant: str, *, seed: int = 0):
    """Scoring alone (no selection) with the representations stored in half precision (half the bytes).

    - ``score_only_bf16_matmul``: one batched bf16 matmul (scores come out in bf16: coarser, timing only);
    - ``score_only_bf16_upcast`` / ``score_only_fp16_upcast``: per layer, upcast the layer's
      ``[Hkv, D, nb]`` to a float32 buffer (cache-resident), then the float32 matmul.
    For comparison only; the runtime stores float32 (see docs/cpu-performance.md §1).
    """
    if variant not in HALF_STORAGE_VARIANTS:
        raise ValueError(f"variant must be one of {', '.join(HALF_STORAGE_VARIANTS)}, got {variant!r}")
    _pos("num_blocks", num_blocks)
    g = torch.Generator().manual_seed(seed)
    L, hq, hkv, d = shape.num_layers, shape.num_heads, shape.num_kv_heads, shape.head_dim
    q = torch.randn(L, hq, d, generator=g)
    qg = q.view(L, hkv, hq // hkv, d).mean(2)[:, :, None, :]  # [L, Hkv, 1, D]
    dtype = torch.float16 if "fp16" in variant else torch.bfloat16
    # the same draws as retrieval_case, stored [L, Hkv, D, nb]
    reps = torch.randn(L, num_blocks, hkv, d, generator=g).permute(0, 2, 3, 1).contiguous().to(dtype)
    if variant == "score_only_bf16_matmul":
        qh = qg.to(dtype)
        return lambda: torch.matmul(qh, reps)
    buf = torch.empty(hkv, d, num_blocks)
    out = torch.empty(L, hkv, 1, num_blocks)

    def upcast() -> torch.Tensor:
        for layer in range(L):
            buf.copy_(reps[layer])
            torch.matmul(qg[layer], buf, out=out[layer])
        return out

    return upcast


def floor_case(shape: RetrievalShape, num_blocks: int, sparse: SparseConfig, *, seed: int = 0):
    """Lower bound for comparison: the same step in bare torch (one matmul + one topk over all layers).

    Shared selection of ``k = floor(ratio * candidates)`` (or top_k) blocks with sink / local windows
    forced by +inf scores; no argument checks, no sorting/padding into the DESIGN §3 format.
    Not used by the runtime: it shows how much of ``batched`` is library overhead.
    """
    budget = sparse.budget
    if budget.kind not in ("ratio", "top_k"):
        raise ValueError(f"sparse.budget.kind must be 'ratio' or 'top_k' for the floor variant, got {budget.kind!r}")
    g = torch.Generator().manual_seed(seed)
    L, hq, hkv, d = shape.num_layers, shape.num_heads, shape.num_kv_heads, shape.head_dim
    q = torch.randn(L, hq, d, generator=g)
    reps_t = torch.randn(L, num_blocks, hkv, d, generator=g).permute(0, 2, 3, 1).contiguous()  # [L, Hkv, D, nb]
    sink = min(sparse.sink_blocks, num_blocks)
    local = min(sparse.local_blocks, num_blocks - sink)
    cand = num_blocks - sink - local
    k = int(budget.value * cand) if budget.kind == "ratio" else int(budget.value)
    k = min(max(k, 1 if cand else 0), cand) + sink + local

    def floor() -> torch.Tensor:
        qg = q.view(L, hkv, hq // hkv, d).mean(2, keepdim=True)  # [L, Hkv, 1, D]
        s = torch.matmul(qg, reps_t).sum(1).squeeze(1)  # [L, nb] shared over heads
        s[:, :sink] = float("inf")
        s[:, num_blocks - local:] = float("inf")
        return torch.topk(s, k, dim=-1, sorted=False).indices

    return floor


def _layers_differing(per_layer: list[torch.Tensor], batched: torch.Tensor) -> list[int]:
    out = []
    for layer, sel in enumerate(per_layer):
        width = sel.shape[-1]
        b = batched[layer]
        if b.shape[-1] < width or not torch.equal(b[:, :width], sel) or bool((b[:, width:] != -1).any()):
            out.append(layer)
    return out


def _check_same(per_layer: list[torch.Tensor], batched: torch.Tensor, what: str = "batched retrieval") -> None:
    bad = _layers_differing(per_layer, batched)
    if bad:
        raise RuntimeError(f"{what} differs from per-layer retrieval at layer(s) {bad}")


def bench_retrieval(
    *,
    shape: RetrievalShape,
    num_blocks: Sequence[int],
    threads: Sequence[int],
    sparse: SparseConfig,
    warmup: int,
    repeats: int,
    progress: Progress | None = None,
) -> list[dict[str, Any]]:
    """Median ms per decode step per sequence for every (num_blocks, threads, variant)."""
    if not num_blocks:
        raise ValueError("num_blocks must list at least one block count, got an empty list")
    if not threads:
        raise ValueError("threads must list at least one thread count, got an empty list")
    for t in threads:
        _pos("threads", t)
    rows = []
    before = torch.get_num_threads()
    bw = {t: read_bandwidth_gbps(threads=t) for t in threads}
    try:
        for nb in num_blocks:
            per_layer, batched = retrieval_case(shape, nb, sparse)
            want = per_layer()
            _check_same(want, batched())
            selected = int((batched()[0] >= 0).sum(-1).max())
            rep_bytes = shape.num_layers * nb * shape.num_kv_heads * shape.head_dim * 4  # float32 mean-K reps
            step, score, select, reference = all_layers_case(shape, nb, sparse)
            _check_same(reference(), step(), "all_layers selection (on its own scores)")
            ref_scores = torch.stack([dot_scores(q[None], r)[0] for q, r in _case_layers(shape, nb)])
            torch.testing.assert_close(score(), ref_scores, rtol=1e-5, atol=1e-5)
            per_head = dataclasses.replace(sparse, selection="per_head")
            ph_step, ph_score, ph_select, ph_reference = all_layers_case(shape, nb, per_head)
            _check_same(ph_reference(), ph_step(), "all_layers per-head selection (on its own scores)")
            extra = {
                "all_layers": {"differs_from_per_layer_layers": len(_layers_differing(want, step())),
                               "parts": {"score_ms": score, "select_ms": select}},
                "all_layers_per_head": {"parts": {"score_ms": ph_score, "select_ms": ph_select}},
            }
            variants = [("all_layers", step), ("all_layers_per_head", ph_step),
                        ("per_layer", per_layer), ("batched", batched)]
            if sparse.selection == "shared" and sparse.budget.kind in ("ratio", "top_k"):
                floor = floor_case(shape, nb, sparse)
                if floor().shape[-1] != selected:
                    raise RuntimeError(f"floor variant keeps {floor().shape[-1]} blocks, select_blocks {selected}")
                variants.append(("bare_torch_floor", floor))
            variants += [(v, half_storage_case(shape, nb, v)) for v in HALF_STORAGE_VARIANTS]
            for t in threads:
                torch.set_num_threads(t)
                for name, fn in variants:
                    if progress:
                        progress(f"retrieval: {nb} blocks x {shape.num_kv_heads} kv heads x "
                                 f"{shape.num_layers} layers, {t} thread(s), {name}")
                    tm = time_median(fn, warmup=warmup, repeats=repeats)
                    more: dict[str, Any] = {}
                    for key, part in extra.get(name, {}).get("parts", {}).items():
                        more[key] = time_median(part, warmup=warmup, repeats=repeats)["median_ms"]
                    if "differs_from_per_layer_layers" in extra.get(name, {}):
                        more["differs_from_per_layer_layers"] = extra[name]["differs_from_per_layer_layers"]
                    rows.append({
                        "num_blocks": nb,
                        "context_tokens": nb * shape.block_size,
                        "threads": t,
                        "variant": name,
                        "calls_per_step": shape.num_layers if name == "per_layer" else 1,
                        "selected_blocks_per_head": selected,
                        "ms_per_step_per_seq": tm["median_ms"],
                        "min_ms": tm["min_ms"],
                        "max_ms": tm["max_ms"],
                        "us_per_layer": tm["median_ms"] * 1e3 / shape.num_layers,
                        "repeats": tm["repeats"],
                        "warmup": tm["warmup"],
                        "meets_target": tm["median_ms"] <= TARGET_MS_PER_STEP,
                        "rep_bytes_per_step": rep_bytes // 2 if name in HALF_STORAGE_VARIANTS else rep_bytes,
                        "read_bandwidth_gbps": bw[t],
                        "read_floor_ms": rep_bytes / (bw[t] * 1e9) * 1e3 / (2 if name in HALF_STORAGE_VARIANTS else 1),
                        **more,
                    })
    finally:
        torch.set_num_threads(before)
    return rows


def python_overhead(shape: RetrievalShape, sparse: SparseConfig, *, warmup: int, repeats: int,
                    threads: int) -> dict[str, Any]:
    """Per-layer call cost at a tiny block count (8 blocks): what the Python/dispatch overhead alone costs."""
    nb = max(8, sparse.sink_blocks + sparse.local_blocks + sparse.min_blocks + 1)
    per_layer, batched = retrieval_case(shape, nb, sparse)
    step = all_layers_case(shape, nb, sparse)[0]
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        tp = time_median(per_layer, warmup=warmup, repeats=repeats)
        tb = time_median(batched, warmup=warmup, repeats=repeats)
        ta = time_median(step, warmup=warmup, repeats=repeats)
        plan = plan_cost(shape, sparse, num_blocks=TARGET_BLOCKS, repeats=max(50, repeats))
    finally:
        torch.set_num_threads(before)
    return {"num_blocks": nb, "threads": threads,
            "per_layer_ms_per_step": tp["median_ms"], "us_per_layer_call": tp["median_ms"] * 1e3 / shape.num_layers,
            "batched_ms_per_step": tb["median_ms"], "all_layers_ms_per_step": ta["median_ms"], "plan": plan}


def plan_cost(shape: RetrievalShape, sparse: SparseConfig, *, num_blocks: int, repeats: int) -> dict[str, Any]:
    """Per-step ``plan`` cost of an offload policy for one request (median ms of ``repeats`` calls).

    ``old_per_layer_ms``: ``extend_selection`` once per layer (the plan before the batched path);
    ``cached_ms``: ``OffloadPolicy.plan`` when the extended selection is reused (most steps);
    ``rebuild_ms``: ``OffloadPolicy.plan`` when it is rebuilt (a new selection or a new block).
    The selection keeps ``floor(sparse budget)`` blocks of ``num_blocks`` prompt blocks on every head.
    """
    from ucm_trt.sparse.policies import ESAPolicy
    from ucm_trt.sparse.policies._offload import OffloadRequestState
    from ucm_trt.sparse.policies.base import ModelShape, PolicyRuntime, RequestView, extend_selection

    _pos("num_blocks", num_blocks)
    _pos("repeats", repeats)
    L, hkv = shape.num_layers, shape.num_kv_heads
    mshape = ModelShape(num_layers=L, num_q_heads=shape.num_heads, num_kv_heads=hkv, head_dim=shape.head_dim,
                        rope_theta=1e4, max_positions=(num_blocks + 2) * shape.block_size)
    pol = ESAPolicy()
    # plan only reads the policy's state: no KV manager or worker is needed
    pol.bind(PolicyRuntime(shape=mshape, sparse=sparse, kv=None, worker=None, device=torch.device("cpu")))
    g = torch.Generator().manual_seed(0)
    keep = max(1, min(num_blocks, int(sparse.budget.value * num_blocks) if sparse.budget.kind == "ratio" else 64))
    sel = torch.randperm(num_blocks, generator=g)[:keep].sort().values.to(torch.int32).expand(L, hkv, keep).contiguous()
    pol._state["r"] = OffloadRequestState(dense=False, sel=sel, sel_nb=num_blocks)
    prompt = num_blocks * shape.block_size
    view = RequestView(rid="r", prompt_len=prompt, seq_len=prompt + 4, new_len=prompt + 5, step=5)

    def cached() -> None:
        pol.plan([view])

    def rebuild() -> None:
        pol._state["r"].ext = None
        pol.plan([view])

    def old() -> None:
        for layer in range(L):
            extend_selection(sel[layer], num_blocks, num_blocks + 1)

    return {"num_blocks": num_blocks, "num_layers": L, "num_kv_heads": hkv, "selected_per_head": keep,
            "old_per_layer_ms": time_median(old, warmup=2, repeats=repeats)["median_ms"],
            "cached_ms": time_median(cached, warmup=2, repeats=repeats)["median_ms"],
            "rebuild_ms": time_median(rebuild, warmup=2, repeats=repeats)["median_ms"]}


@dataclasses.dataclass(frozen=True, kw_only=True)
class OffloadSetup:
    """Tiny random Llama and the run through the runtime Engine (torch backend, CPU)."""

    layers: int = 4
    hidden: int = 256
    heads: int = 4
    kv_heads: int = 2
    vocab: int = 512
    prompt_tokens: int = 1536
    block_size: int = 32
    decode_steps: int = 32
    cache_blocks: int = 2
    prefill_chunk: int = 512
    seed: int = 0

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            if f.name in ("cache_blocks", "seed"):
                v = getattr(self, f.name)
                if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                    raise ValueError(f"{f.name} must be an int >= 0, got {v!r}")
            else:
                _pos(f.name, getattr(self, f.name))
        if self.hidden % self.heads or self.heads % self.kv_heads:
            raise ValueError(f"hidden must be a multiple of heads and heads of kv_heads, got hidden={self.hidden}, "
                             f"heads={self.heads}, kv_heads={self.kv_heads}")


def _tiny_llama(setup: OffloadSetup):
    from transformers import LlamaConfig, LlamaForCausalLM

    head_dim = setup.hidden // setup.heads
    cfg = LlamaConfig(vocab_size=setup.vocab, hidden_size=setup.hidden, num_hidden_layers=setup.layers,
                      num_attention_heads=setup.heads, num_key_value_heads=setup.kv_heads, head_dim=head_dim,
                      intermediate_size=4 * setup.hidden,
                      max_position_embeddings=setup.prompt_tokens + setup.decode_steps + setup.block_size,
                      rope_theta=10000.0)
    torch.manual_seed(setup.seed)
    return LlamaForCausalLM(cfg).eval()


def bench_offload(
    *,
    setup: OffloadSetup,
    algorithms: Sequence[str],
    strides: Sequence[int],
    ratios: Sequence[float],
    progress: Progress | None = None,
) -> list[dict[str, Any]]:
    """Run every (algorithm, stride, ratio) through the Engine; bytes moved per decode step, hit rate."""
    from ucm_trt.runtime import Engine, RuntimeConfig, SamplingParams, TorchBackend
    from ucm_trt.runtime.algorithms import make_policy, sparse_config_for

    for a in algorithms:
        if a not in ("esa", "gsa"):
            raise ValueError(f"algorithms must be 'esa' or 'gsa' (offload policies benchmarked here), got {a!r}")
    for s in strides:
        _pos("strides", s)
    for r in ratios:
        if isinstance(r, bool) or not isinstance(r, float | int) or not 0 < r < 1:
            raise ValueError(f"ratios must be floats in (0, 1), got {r!r}")
    model = _tiny_llama(setup)
    g = torch.Generator().manual_seed(setup.seed + 1)
    prompt = torch.randint(0, setup.vocab, (setup.prompt_tokens,), generator=g).tolist()
    rows = []
    for alg in algorithms:
        for stride in strides:
            for ratio in ratios:
                if progress:
                    progress(f"offload: {alg}, stride {stride}, budget ratio {ratio}")
                sparse = sparse_config_for(alg, SparseConfig(block_size=setup.block_size, budget=Budget.ratio(ratio),
                                                             retrieval_stride=stride))
                cfg = RuntimeConfig(max_batch=1, max_seq_len=setup.prompt_tokens + setup.decode_steps + 1,
                                    prefill_chunk=setup.prefill_chunk, cache_blocks=setup.cache_blocks,
                                    retrieval_threads=1)
                # every layer sparse: the model is random, so the default preset's automatic dense-layer
                # detection would find every layer diffuse and run it dense, and there would be no offload
                # traffic to measure
                engine = Engine(TorchBackend(model), make_policy(alg, dense_layers=DenseLayers()), sparse=sparse,
                                config=cfg)
                try:
                    t0 = time.perf_counter()
                    engine.generate([prompt], SamplingParams(max_new_tokens=setup.decode_steps))
                    wall = time.perf_counter() - t0
                    st = engine.stats()
                    steps = list(engine.metrics.steps)
                finally:
                    engine.close()
                block_bytes = st["block_bytes_per_layer"]
                dec = [s for s in steps if s.kind == "decode"]
                bad = [i for i, s in enumerate(steps) if s.bytes_h2d != s.blocks_loaded * block_bytes]
                per_step = [s.bytes_h2d for s in dec]
                rows.append({
                    "algorithm": alg,
                    "retrieval_stride": stride,
                    "budget_ratio": ratio,
                    "decode_steps": len(dec),
                    "block_bytes_per_layer": block_bytes,
                    "decode_bytes_h2d_per_step_mean": st["decode_bytes_h2d_per_step"],
                    "decode_bytes_h2d_per_step_median": statistics.median(per_step) if per_step else None,
                    "decode_bytes_h2d_max_step": st["decode_bytes_h2d_max_step"],
                    "decode_blocks_loaded_total": sum(s.blocks_loaded for s in dec),
                    "decode_blocks_needed_total": sum(s.blocks_needed for s in dec),
                    "cache_hit_rate": st["cache_hit_rate"],
                    "device_kv_bytes_last_decode": st["device_kv_bytes_last_decode"],
                    "dense_kv_bytes_last_decode": st["dense_kv_bytes_last_decode"],
                    "device_kv_over_working_set": st["device_kv_over_working_set"],
                    "retrieval_mean_ms": st.get("retrieval_mean_ms"),
                    "retrieval_overlap": st.get("retrieval_overlap"),
                    "bytes_equal_loaded_blocks_x_block_bytes": not bad,
                    "steps_violating_bytes_rule": bad,
                    "wall_seconds": wall,
                })
    return rows
