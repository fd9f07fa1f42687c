"""Throughput at the capacity wall (issue 13 item 1): dense at its largest batch vs the offload
algorithms at theirs, in ONE device KV budget, aggregate decode tokens/s.

What is compared, per model shape and context:

* **dense** at the largest batch whose full KV fits the device budget;
* **GSA On-Device** (KV on the device, sparse attention) at the largest batch whose full KV *and
  hash codes* fit the same budget;
* **ESA, GSA, KVStar** with offload (every sequence's full KV in the pinned host store, only the
  working sets on the device) at the largest batch whose working sets fit the same budget, with
  room kept for one prompt being prefilled (a continuous-batching server admits new requests), and
  whose full KV fits the host store;
* every algorithm again at batch 1 (``speedup_vs_dense`` against dense at batch 1).

The arithmetic (bytes per token per layer, per sequence, the budget, the host store, the batches)
is computed by :func:`plan_capacity`, printed, and stored in the JSON.

Prefill. A decode step's cost does not depend on the values in the KV cache, so the prompts are
not run through the model: :class:`FilledPrefillBackend` is a benchmark-only backend whose
prefill chunks write random K/V (and random queries for the policies) through the engine's own
step (``StepContext.append_kv``: the pool slots the plan reserved, the policy's ``on_append``
hook). Everything around it is the engine's real code: ``KVManager.plan_step`` allocates the
blocks, ``write_back`` fills the host store, ``Policy.on_prefill_end`` builds the block
representations from the pool's K and runs the first retrieval, and the first token is sampled.
Decode steps run the real model (random weights). ``--prefill model`` runs the model instead
(real chunked prefill; minutes at 128K).

Turnover. ``random``: the random model's own decode queries drive the retrievals (nearly unrelated
from one step to the next, so most top-k blocks change at every retrieval: the worst case).
``realistic``: the offload policies retrieve with ``QueryDrift`` queries (``RetrievalConfig``,
:mod:`ucm_trt.sparse.turnover`) that drift from the model's query with a persistence calibrated so
that the top-k turnover per retrieval matches the one measured on SmolLM2
(:func:`measured_turnover`, :func:`calibrate_turnover`). Dense and GSA On-Device do not read the
retrieval queries: they are measured once and their rows say ``turnover_independent``.

Offload variants: ``esa``, ``gsa``, ``kvstar`` keep their block representations on the host and
score on the CPU retrieval threads (UCM's design); ``esa-gpu-reps`` / ``gsa-gpu-reps`` /
``kvstar-gpu-reps`` keep them on the GPU (``RetrievalConfig(representations="device")``; KVStar's float16
sub-block tiles, 1/16 of the KV at its defaults), counted against the device budget.

Example (one H100, both shapes; prints a table last)::

    python benchmarks/bench_capacity.py --out-dir benchmarks/results/runtime

CPU smoke run (about 30 s): ``python benchmarks/bench_capacity.py --shapes tiny --contexts 512 1024
--block-size 16 --decode-steps 10 --warmup-steps 4 --stride 2 --host-gib 0.004 --realistic-turnover 0.2
--out-dir /tmp/cap``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
import sys
import time
import traceback
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))

from ucm_trt.config import Budget, DenseLayers, GSAOnDeviceConfig, KVStarConfig, SparseConfig  # noqa: E402
from ucm_trt.runtime import Engine, PoolExhaustedError, RuntimeConfig, SamplingParams  # noqa: E402
from ucm_trt.runtime.algorithms import make_policy, sparse_config_for  # noqa: E402
from ucm_trt.runtime.backends.base import Backend  # noqa: E402

GIB = 2**30
#: benchmark name -> (policy algorithm, where an offload policy keeps its block representations):
#: "host" (UCM's design: CPU scoring on the retrieval threads) or "device" (GPU-resident
#: representations, scoring and top-k on the GPU; the KV blocks stay in the host store)
VARIANTS: dict[str, tuple[str, str | None]] = {
    "dense": ("dense", None),
    "gsa-on-device": ("gsa-on-device", None),
    "esa": ("esa", "host"),
    "gsa": ("gsa", "host"),
    "kvstar": ("kvstar", "host"),
    "esa-gpu-reps": ("esa", "device"),
    "gsa-gpu-reps": ("gsa", "device"),
    "kvstar-gpu-reps": ("kvstar", "device"),
}
ALGORITHMS = tuple(VARIANTS)
OFFLOAD_ALGORITHMS = tuple(a for a, (_, reps) in VARIANTS.items() if reps is not None)
#: the default algorithms (run order: :func:`job_order`)
DEFAULT_ALGORITHMS = ("dense", "gsa-on-device", "esa", "gsa", "esa-gpu-reps", "kvstar-gpu-reps", "kvstar")
#: in run order: the realistic turnover (the one issue 13's targets are about) before the worst case, whose
#: PCIe-bound steps are the slowest (the H100 call of 2026-12-07 spent its time limit on ESA's random row)
TURNOVERS = ("realistic", "random")


# ============================================================================ model shapes
@dataclass(frozen=True, kw_only=True)
class ModelSpec:
    """A Llama-architecture shape with random weights (speed only)."""

    name: str
    layers: int
    hidden: int
    intermediate: int
    q_heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied_embeddings: bool
    rope_theta: float = 500000.0

    def describe(self) -> str:
        return (f"{self.layers} layers, hidden {self.hidden}, {self.q_heads} q / {self.kv_heads} kv heads, "
                f"head_dim {self.head_dim}, MLP {self.intermediate}, vocab {self.vocab}, "
                f"{'tied' if self.tied_embeddings else 'untied'} embeddings")


SHAPES: dict[str, ModelSpec] = {
    # Llama-3.2-1B, as bench_runtime.py uses it
    "llama1b": ModelSpec(name="llama-3.2-1b-shape", layers=16, hidden=2048, intermediate=8192, q_heads=32,
                         kv_heads=8, head_dim=64, vocab=128256, tied_embeddings=True),
    # Llama-3.1-8B, full MLP and vocabulary (nothing cut): 8.0 B parameters, 16 GB in bf16
    "llama8b": ModelSpec(name="llama-3.1-8b-shape", layers=32, hidden=4096, intermediate=14336, q_heads=32,
                         kv_heads=8, head_dim=128, vocab=128256, tied_embeddings=False),
    # the CPU smoke test's shape
    "tiny": ModelSpec(name="tiny", layers=2, hidden=128, intermediate=256, q_heads=4, kv_heads=2, head_dim=32,
                      vocab=256, tied_embeddings=True, rope_theta=10000.0),
}


def build_model(spec: ModelSpec, *, dtype: torch.dtype, device: str, max_positions: int, seed: int = 0):
    """A ``LlamaForCausalLM`` of ``spec`` with random weights, created directly in ``dtype`` on ``device``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=spec.vocab, hidden_size=spec.hidden, intermediate_size=spec.intermediate,
                      num_hidden_layers=spec.layers, num_attention_heads=spec.q_heads,
                      num_key_value_heads=spec.kv_heads, head_dim=spec.head_dim,
                      max_position_embeddings=max_positions, rope_theta=spec.rope_theta,
                      tie_word_embeddings=spec.tied_embeddings)
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # no fp32 copy of an 8B model on the way
    try:
        with torch.device(device):
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(previous)
    return model.eval()


# ============================================================================ arithmetic
@dataclass(frozen=True, kw_only=True)
class CapacityPlan:
    """The capacity arithmetic of one (shape, context). Block counts are per layer."""

    shape: str
    dtype_bytes: int
    block_size: int
    context_len: int  # prompt tokens
    sequence_len: int  # prompt + decode tokens: what one sequence's KV holds at the end
    bytes_per_token_per_layer: int  # K and V
    bytes_per_token: int  # all layers
    sequence_blocks: int
    sequence_gib: float
    kv_budget_gib: float
    dense_pool_blocks: int  # device blocks per layer the budget buys (incl. the null block)
    hash_code_bytes_per_block: int  # GSA On-Device's hash codes of one block of one layer
    gsa_on_device_pool_blocks: int
    host_store_gib: float
    host_blocks: int
    host_limit_sequences: int
    working_set_blocks: dict[str, int]  # per (sequence, layer), offload algorithms
    device_rep_blocks: dict[str, int]  # GPU-resident representations of one sequence, per layer, in KV blocks
    pool_blocks: dict[str, int]  # the device pool each algorithm's engine gets (budget minus codes / reps)
    max_batch: dict[str, int]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def block_bytes(spec: ModelSpec, block_size: int, dtype_bytes: int) -> int:
    """One block of one layer, K and V."""
    return 2 * spec.kv_heads * block_size * spec.head_dim * dtype_bytes


def hash_code_bytes(spec: ModelSpec, block_size: int) -> int:
    """GSA On-Device's codes of one block of one layer: ``head_dim`` bits per token and KV head
    (``GSAOnDeviceConfig.hash_bits`` default), stored in a pool that shares the KV's block ids."""
    return spec.kv_heads * block_size * GSAOnDeviceConfig().resolved_hash_bits(spec.head_dim) // 8


def default_kv_budget_gib(spec: ModelSpec, sequence_len: int, *, block_size: int, dtype_bytes: int,
                          dense_batch: int = 2) -> float:
    """The smallest round budget in which ``dense_batch`` sequences of ``sequence_len`` tokens fit
    with their full KV and GSA On-Device's hash codes (plus the null block): the bytes needed,
    rounded up to a multiple of 1/32 of the power of two below them (8.04 GiB -> 8.25 GiB)."""
    blocks = dense_batch * (-(-sequence_len // block_size)) + 1
    need = spec.layers * blocks * (block_bytes(spec, block_size, dtype_bytes) + hash_code_bytes(spec, block_size))
    step = 2 ** (math.floor(math.log2(need)) - 5)
    return math.ceil(need / step) * step / GIB


def host_store_blocks(spec: ModelSpec, host_gib: float, *, block_size: int, dtype_bytes: int) -> int:
    """Blocks of the host store that fit ``host_gib`` of page-locked memory: one tensor per layer,
    ``layers x size <= host_gib``. The runtime page-locks each at its exact size
    (:mod:`ucm_trt.runtime.host_memory`; torch's caching host allocator would round each up to a
    power of two, which made an 8B-class store of 108 GiB cost 128)."""
    per_layer = host_gib * GIB / spec.layers
    bb = block_bytes(spec, block_size, dtype_bytes)
    if per_layer < bb:
        raise ValueError(f"--host-gib {host_gib} holds less than one block per layer of {spec.name}")
    return int(per_layer // bb)


def device_rep_blocks(spec: ModelSpec, prompt_blocks: int, block_size: int, dtype_bytes: int,
                      algorithm: str = "esa") -> int:
    """GPU-resident block representations of one sequence's prompt (``RetrievalConfig(representations=
    "device")``), per layer, in KV blocks. ESA / GSA (preset ``ucm``): float32 ``[Hkv, D]`` per block, 1/64 of
    bf16 K+V at block 64. KVStar: its compact vote layout (``PreparedVote(compact=True)``, default
    ``KVStarConfig``), float16 ``[Hkv, kept channels, block_size / token_merge]`` per block in tiles of
    ``PreparedVote.TILE_BLOCKS`` blocks, + one mask byte per sub-block and the 8-byte block id: 1/16 of bf16
    K+V at the defaults (the vote's float32 scratch, one chunk of tiles per retrieval thread, is not counted)."""
    from ucm_trt.sparse.policies.kvstar import PreparedVote

    bb = block_bytes(spec, block_size, dtype_bytes)
    if algorithm in ("esa", "gsa"):
        return -(-prompt_blocks * spec.kv_heads * spec.head_dim * 4 // bb)
    if algorithm != "kvstar":
        raise ValueError(f"algorithm must be esa, gsa or kvstar, got {algorithm!r}")
    cfg = KVStarConfig()
    cfg.check_block_size(block_size)
    m = block_size // cfg.token_merge
    tiles = -(-prompt_blocks // PreparedVote.TILE_BLOCKS) * PreparedVote.TILE_BLOCKS
    per_block = spec.kv_heads * cfg.kept_channels(spec.head_dim) * m * 2 + m
    return -(-(tiles * per_block + prompt_blocks * 8) // bb)


def offload_working_set(algorithm: str, prompt_blocks: int, sequence_blocks: int, sparse: SparseConfig,
                        cache_blocks: int) -> int:
    """Device blocks one offloaded sequence holds per layer while it decodes: the selection
    (sink + local windows + the budget's share of the candidates, + GSA's prefetch block), every
    decode-generated block, and the LRU cache."""
    if sparse.budget.kind != "ratio":
        raise ValueError(f"the working-set estimate needs a ratio budget, got {sparse.budget}")
    candidates = max(0, prompt_blocks - sparse.sink_blocks - sparse.local_blocks)
    chosen = max(1, math.floor(sparse.budget.value * candidates)) if candidates else 0
    extra = 1 if VARIANTS[algorithm][0] == "gsa" else 0  # GSAPolicy(prefetch_blocks=1)
    return sparse.forced_blocks + chosen + extra + (sequence_blocks - prompt_blocks) + cache_blocks


def plan_capacity(spec: ModelSpec, *, sequence_len: int, decode_steps: int, kv_budget_gib: float,
                  host_gib: float, sparse: SparseConfig, cache_blocks: int, dtype_bytes: int) -> CapacityPlan:
    """The arithmetic of one (shape, context): ``sequence_len`` tokens per sequence at the end,
    of which ``sequence_len - block_size`` are the prompt (block-aligned; the last block receives
    the ``decode_steps`` generated tokens)."""
    bs = sparse.block_size
    if sequence_len % bs or sequence_len < 4 * bs:
        raise ValueError(f"context {sequence_len} must be a multiple of the block size {bs} and >= {4 * bs}")
    if not 1 <= decode_steps < bs:
        raise ValueError(f"--decode-steps must be in [1, block size - 1 = {bs - 1}] (the generated tokens "
                         f"fill the sequence's last block), got {decode_steps}")
    prompt = sequence_len - bs
    bb = block_bytes(spec, bs, dtype_bytes)
    codes = hash_code_bytes(spec, bs)
    seq_blocks = sequence_len // bs
    budget_bytes = kv_budget_gib * GIB
    dense_pool = int(budget_bytes // (spec.layers * bb))
    od_pool = int(budget_bytes // (spec.layers * (bb + codes)))
    host_blocks = host_store_blocks(spec, host_gib, block_size=bs, dtype_bytes=dtype_bytes)
    host_limit = host_blocks // seq_blocks
    ws = {a: offload_working_set(a, prompt // bs, seq_blocks, sparse, cache_blocks) for a in OFFLOAD_ALGORITHMS}
    max_batch = {"dense": (dense_pool - 1) // seq_blocks, "gsa-on-device": (od_pool - 1) // seq_blocks}
    pools = {"dense": dense_pool, "gsa-on-device": od_pool}
    reps = {a: device_rep_blocks(spec, prompt // bs, bs, dtype_bytes, VARIANTS[a][0]) if VARIANTS[a][1] == "device"
            else 0 for a in OFFLOAD_ALGORITHMS}
    for a, w in ws.items():
        # one prompt being prefilled (all its blocks resident, then its representations) + the
        # others' working sets and representations; the pool is what the representations leave
        room = dense_pool - 1 - seq_blocks - reps[a]
        max_batch[a] = 0 if room < 0 else min(host_limit, 1 + room // (w + reps[a]))
        pools[a] = dense_pool - max_batch[a] * reps[a]
    return CapacityPlan(
        shape=spec.name, dtype_bytes=dtype_bytes, block_size=bs, context_len=prompt, sequence_len=sequence_len,
        bytes_per_token_per_layer=bb // bs, bytes_per_token=spec.layers * bb // bs, sequence_blocks=seq_blocks,
        sequence_gib=spec.layers * seq_blocks * bb / GIB, kv_budget_gib=kv_budget_gib, dense_pool_blocks=dense_pool,
        hash_code_bytes_per_block=codes, gsa_on_device_pool_blocks=od_pool,
        host_store_gib=spec.layers * host_blocks * bb / GIB, host_blocks=host_blocks, host_limit_sequences=host_limit,
        working_set_blocks=ws, device_rep_blocks=reps, pool_blocks=pools, max_batch=max_batch,
    )


def format_plan(p: CapacityPlan) -> str:
    mb = ", ".join(f"{a} {n}" for a, n in p.max_batch.items())
    ws = ", ".join(f"{a} {n}" + (f" + {p.device_rep_blocks[a]} of GPU representations" if p.device_rep_blocks[a] else "")
                   for a, n in p.working_set_blocks.items())
    return (f"{p.shape} context {p.context_len} (+{p.sequence_len - p.context_len} tokens of decode room): "
            f"{p.bytes_per_token_per_layer} B/token/layer, {p.bytes_per_token / 1024:.0f} KiB/token, "
            f"{p.sequence_gib:.3f} GiB/sequence ({p.sequence_blocks} blocks of {p.block_size} per layer); "
            f"device budget {p.kv_budget_gib} GiB = {p.dense_pool_blocks} blocks/layer "
            f"({p.gsa_on_device_pool_blocks} with GSA On-Device's codes); host store {p.host_store_gib:.1f} GiB = "
            f"{p.host_blocks} blocks/layer = {p.host_limit_sequences} sequences; working set blocks/layer: {ws}; "
            f"max batch: {mb}")


# ============================================================================ prefill by filling
class FilledPrefillBackend(Backend):
    """Benchmark-only backend: prefill chunks write random K/V instead of running the model.

    Wraps a real backend (``inner``). A forward of more than one token per row is a prefill chunk:
    for every layer it draws K and V ``~ N(0, 1)`` (the pool's dtype) and writes them with
    :meth:`ucm_trt.runtime.step.StepContext.append_kv` (the slots the engine's plan reserved, and
    the policy's ``on_append`` hook: GSA On-Device hashes them), draws the queries of the chunk's
    last ``capture_width`` tokens into the step's query capture (what ``Policy.on_prefill_end``
    receives), and returns random logits. Everything the engine does around the forward is
    unchanged (block allocation, write-back to the host store, the policy's representations and
    first retrieval, sampling), so the state a decode step starts from is built by the same code
    as after a real prefill; only the numbers in it are random. One-token forwards (decode steps)
    run ``inner``. Prompts must therefore never end in a one-token prefill chunk
    (:func:`check_chunking`).
    """

    def __init__(self, inner: Backend, *, vocab_size: int, seed: int = 0) -> None:
        if not isinstance(inner, Backend):
            raise TypeError(f"inner must be a ucm_trt Backend, got {type(inner).__name__}")
        self.inner = inner
        self.shape = inner.shape
        self.device = inner.device
        self.kv_dtype = inner.kv_dtype
        self.block_size = inner.block_size
        self.rerope = inner.rerope
        self.supports_layer_hooks = inner.supports_layer_hooks
        self.max_query_window = inner.max_query_window
        self.supports_cuda_graph = inner.supports_cuda_graph
        self.attention = inner.attention
        self.vocab_size = vocab_size
        self._gen = torch.Generator(device=inner.device).manual_seed(seed)
        self.filled_tokens = 0

    def attention_name(self) -> str:
        return self.inner.attention_name()

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, step) -> torch.Tensor:
        b, t = input_ids.shape
        if t == 1:
            return self.inner.forward(input_ids, positions, step)
        sh, dev, g = self.shape, self.device, self._gen
        w = min(t, step.capture_width)
        for layer in range(sh.num_layers):
            step.wait_for_loads(layer)  # as StepContext.attend: the layer's pool waits for the copies it touches
            k = torch.randn(b, sh.num_kv_heads, t, sh.head_dim, generator=g, device=dev, dtype=self.kv_dtype)
            v = torch.randn(b, sh.num_kv_heads, t, sh.head_dim, generator=g, device=dev, dtype=self.kv_dtype)
            step.append_kv(layer, k, v)
            step.capture[layer, :b, :, :w] = torch.randn(b, sh.num_q_heads, w, sh.head_dim, generator=g, device=dev)
        step.layers_run = sh.num_layers
        self.filled_tokens += b * t
        return torch.randn(b, self.vocab_size, generator=g, device=dev)


def check_chunking(prompt_len: int, chunk: int) -> None:
    """A filled prefill needs every chunk longer than one token (one-token forwards are decode steps)."""
    if prompt_len < 2 or (prompt_len % chunk == 1):
        raise ValueError(f"prompt of {prompt_len} tokens in chunks of {chunk} ends in a one-token chunk, which "
                         "FilledPrefillBackend would take for a decode step; change --fill-chunk")


# ============================================================================ turnover
def measured_turnover(results_dir: Path, *, block_size: int, ratio: float, stride: int) -> tuple[float, str]:
    """The top-k turnover per retrieval measured on SmolLM2 (``benchmarks/turnover_smollm2.py``:
    ``summary`` rows of ``turnover_smollm2_*.json``) at this block size, ratio and stride with a
    shared selection: the mean over the files that have it. Returns ``(turnover, "file, file")``."""
    found, files = [], []
    for path in sorted(results_dir.glob("turnover_smollm2_*.json")):
        for row in json.loads(path.read_text()).get("summary", []):
            if (row.get("block_size"), row.get("ratio"), row.get("selection"), row.get("stride")) == \
                    (block_size, ratio, "shared", stride):
                found.append(float(row["topk_turnover"]))
                files.append(path.name)
    if not found:
        raise ValueError(
            f"no SmolLM2 turnover measurement at block size {block_size}, ratio {ratio}, stride {stride} (shared "
            f"selection) in {results_dir}/turnover_smollm2_*.json; pass --realistic-turnover or run "
            "benchmarks/turnover_smollm2.py with these settings")
    return sum(found) / len(found), ", ".join(files)


@dataclass(frozen=True, kw_only=True)
class TurnoverModel:
    """Drifting retrieval queries calibrated to a target top-k turnover (``ucm_trt.sparse.turnover``)."""

    target_topk_turnover: float
    source: str
    persistence: float
    calibrated_topk_turnover: float
    calibration: str

    def query_drift(self, seed: int):
        from ucm_trt.sparse.turnover import QueryDrift

        return QueryDrift(persistence=self.persistence, seed=seed)


def calibrate_turnover(plan: CapacityPlan, spec: ModelSpec, sparse: SparseConfig, target: float, source: str,
                       *, seed: int, layers: int = 4) -> TurnoverModel:
    """The query drift (:class:`ucm_trt.sparse.turnover.QueryDrift` persistence ``a``) whose top-k
    turnover per retrieval is ``target`` on block representations distributed as this benchmark's:
    the mean of ``block_size`` N(0, 1) keys, i.e. N(0, 1/block_size) per channel, for the prompt's
    blocks, ``layers`` layers (the layers are independent and identically distributed), ESA's
    scoring and selection at the benchmark's ratio and stride (``calibrate_persistence``)."""
    from ucm_trt.sparse.turnover import calibrate_persistence

    g = torch.Generator().manual_seed(seed)
    nb = plan.context_len // plan.block_size
    n_layers = min(layers, spec.layers)
    reps = torch.randn(n_layers, spec.kv_heads, spec.head_dim, nb, generator=g) / math.sqrt(plan.block_size)
    q0 = torch.randn(n_layers, spec.q_heads, spec.head_dim, generator=g)
    a, got = calibrate_persistence(target, reps, q0, sparse, seed=seed)
    return TurnoverModel(target_topk_turnover=target, source=source, persistence=a, calibrated_topk_turnover=got,
                         calibration=f"calibrate_persistence on {n_layers} layers x {nb} blocks of N(0, 1/{plan.block_size}) "
                                     f"representations, ESA scoring, ratio {sparse.budget.value}, stride "
                                     f"{sparse.retrieval_stride}")


# ============================================================================ one engine, one round
@dataclass(frozen=True, kw_only=True)
class Settings:
    block_size: int = 64
    ratio: float = 0.125
    stride: int = 4
    cache_blocks: int = 2
    decode_steps: int = 32
    warmup_steps: int = 8
    fill_chunk: int = 16384
    retrieval_threads: int = 8
    stagger: bool = False  # RetrievalConfig.stagger (--stagger)
    prefill: str = "fill"  # "fill" (FilledPrefillBackend) or "model"
    cuda_graph: bool | None = None
    batch1: bool = True
    max_attempts: int = 3
    runtime_options: tuple[tuple[str, object], ...] = ()  # further RuntimeConfig fields (--runtime-option)

    def sparse_for(self, algorithm: str) -> SparseConfig:
        return sparse_config_for(algorithm, SparseConfig(block_size=self.block_size, budget=Budget.ratio(self.ratio),
                                                         retrieval_stride=self.stride))


def make_engine(model, name: str, plan: CapacityPlan, settings: Settings, *, max_batch: int,
                drift: TurnoverModel | None = None, seed: int = 0) -> Engine:
    """An engine of benchmark algorithm ``name`` (:data:`VARIANTS`) whose device pool is the plan's
    budget and host store the plan's; ``drift``: the realistic-turnover query model (offload only)."""
    from ucm_trt.runtime import TorchBackend

    algorithm, reps = VARIANTS[name]
    bs = settings.block_size
    kw: dict = {}
    if reps is not None and (reps == "device" or drift is not None or settings.stagger):
        from ucm_trt.sparse.policies import RetrievalConfig

        kw["retrieval"] = RetrievalConfig(representations=reps, stagger=settings.stagger,
                                          query_drift=None if drift is None else drift.query_drift(seed))
    if algorithm == "kvstar":
        kw["kvstar"] = KVStarConfig(retrieval_stride=settings.stride)
    if algorithm == "gsa-on-device":
        kw["gsa_on_device"] = GSAOnDeviceConfig(top_k_tokens=max(8 * bs, int(plan.context_len * settings.ratio)),
                                                seq_len_threshold=0)
    if algorithm != "dense":
        # every layer sparse: on random weights every layer's attention is diffuse, so the automatic
        # dense-layer detection (the default preset's) would run them all dense; a speed benchmark of the
        # sparse path fixes the layer set instead (a real model adds its detected layers' full KV)
        kw["dense_layers"] = DenseLayers()
    # preset ucm: ESA / GSA keep one mean K per block, the representation size plan_capacity and
    # device_rep_blocks model (the default preset's 8-token sub-block means are block_size / 8 times that)
    policy = make_policy(algorithm, preset="ucm", **kw)
    pool = plan.pool_blocks[name]
    chunk = min(settings.fill_chunk, plan.context_len)
    check_chunking(plan.context_len, chunk)
    rt = RuntimeConfig(max_batch=max_batch, max_seq_len=plan.sequence_len, prefill_chunk=chunk,
                       cache_blocks=settings.cache_blocks, num_device_blocks=pool,
                       # the store holds every running sequence's full KV: no more is page-locked
                       num_host_blocks=min(plan.host_blocks, max_batch * plan.sequence_blocks) if policy.offload
                       else None,
                       retrieval_threads=settings.retrieval_threads, cuda_graph=settings.cuda_graph,
                       **dict(settings.runtime_options))
    backend = TorchBackend(model, attention="auto", validate=False)
    if settings.prefill == "fill":
        backend = FilledPrefillBackend(backend, vocab_size=model.config.vocab_size, seed=seed)
    return Engine(backend, policy, sparse=settings.sparse_for(algorithm), config=rt)


def _worker_delta(before: dict, after: dict, steps: int) -> dict:
    """CPU retrieval over the measured steps: tasks, mean task time, time the steps waited for
    results, and the fraction hidden behind model steps (1 - wait / busy)."""
    tasks = after["retrieval_tasks"] - before["retrieval_tasks"]
    busy = after["retrieval_busy_ms"] - before["retrieval_busy_ms"]
    wait = after["retrieval_wait_ms"] - before["retrieval_wait_ms"]
    return {"retrieval_tasks": tasks, "retrieval_ms_per_task": busy / tasks if tasks else None,
            "retrieval_wait_ms_per_step": wait / steps, "retrieval_overlap": (1.0 - wait / busy) if busy > 0 else None}


_TURNOVER_COUNTERS = ("topk_changed", "topk_selected", "turnover_changed", "turnover_selected")


def _turnover_counts(policy) -> dict | None:
    """The offload policies' cumulative turnover counters (blocks of each collected selection its
    predecessor lacked, and blocks selected; all / top-k part), where the policy keeps them."""
    if not all(hasattr(policy, n) for n in _TURNOVER_COUNTERS):
        return None
    return {n: getattr(policy, n) for n in _TURNOVER_COUNTERS}


def load_hiding(steps: list) -> dict:
    """Fraction of the loads' GPU time the compute stream did not wait for, over ``steps``
    (``1 - load_wait_ms / load_gpu_ms``, from the runtime's CUDA-event timing of the loads,
    ``StepRecord.load_gpu_ms`` / ``load_wait_ms``, where the runtime records them): in total, and
    the 10th percentile and median over the steps whose timed loads finished."""
    if not steps or not hasattr(steps[0], "load_gpu_ms"):
        return {"load_hidden_fraction": None, "load_timing": "not recorded by this runtime"}
    load = sum(r.load_gpu_ms for r in steps)
    wait = sum(r.load_wait_ms for r in steps)
    per = sorted(max(0.0, 1.0 - r.load_wait_ms / r.load_gpu_ms) for r in steps if r.load_gpu_ms > 0)
    return {"load_hidden_fraction": max(0.0, 1.0 - wait / load) if load > 0 else None,
            "load_gpu_ms_per_step": load / len(steps), "load_wait_ms_per_step": wait / len(steps),
            "load_hidden_fraction_p10": per[len(per) // 10] if per else None,
            "load_hidden_fraction_median": per[len(per) // 2] if per else None}


def decode_round(engine: Engine, *, batch: int, prompt_len: int, vocab: int, settings: Settings, seed: int) -> dict:
    """Prefill ``batch`` prompts of ``prompt_len`` tokens, decode ``settings.decode_steps`` tokens
    for all of them together, and measure the decode steps after ``settings.warmup_steps``
    (the first decode steps load every working set, compile kernels and capture CUDA graphs).

    tokens/s = rows x measured steps / their wall time (each step's time as the engine records
    it: plan, forward, write-back, retrieval hand-off and the greedy token's copy to the host)."""
    g = torch.Generator().manual_seed(seed)
    params = SamplingParams(max_new_tokens=settings.decode_steps + 1)  # the first token comes from the prefill
    first = len(engine.metrics.steps)
    t0 = time.perf_counter()
    for _ in range(batch):
        engine.add_request(torch.randint(0, vocab, (prompt_len,), generator=g), params)
    decoded = 0
    worker_start = turnover_start = None
    try:
        while engine.has_work:
            seen = len(engine.metrics.steps)
            engine.step()
            if not any(r.kind == "decode" for r in engine.metrics.steps[seen:]):
                continue
            decoded += 1
            if decoded == settings.warmup_steps:
                worker_start = engine.worker.stats()
                turnover_start = _turnover_counts(engine.policy)
    except BaseException:
        engine.abort_all()
        raise
    wall = time.perf_counter() - t0
    recs = engine.metrics.steps[first:]
    prefill = [r for r in recs if r.kind == "prefill"]
    decode = [r for r in recs if r.kind == "decode"]
    if any(r.rows != batch for r in decode):
        raise RuntimeError(f"decode steps ran {sorted({r.rows for r in decode})} rows, expected {batch} throughout")
    measured = decode[settings.warmup_steps:]
    if not measured:
        raise ValueError(f"--decode-steps ({settings.decode_steps}) must exceed --warmup-steps ({settings.warmup_steps})")
    secs = [r.seconds for r in measured]
    total = sum(secs)
    needed = sum(r.blocks_needed for r in measured)
    loaded = sum(r.blocks_loaded for r in measured)
    out = {
        "batch": batch,
        "tokens_per_s": batch * len(measured) / total,
        "measured_steps": len(measured),
        "step_ms_mean": 1e3 * total / len(measured),
        "step_ms_median": 1e3 * statistics.median(secs),
        "step_ms_max": 1e3 * max(secs),
        "warmup_ms_total": 1e3 * sum(r.seconds for r in decode[: settings.warmup_steps]),
        "prefill_seconds": sum(r.seconds for r in prefill),
        "prefill_tokens": sum(r.tokens for r in prefill),
        "round_wall_seconds": wall,
        "bytes_h2d_per_step": sum(r.bytes_h2d for r in measured) / len(measured),
        "blocks_loaded_per_step": loaded / len(measured),
        "cache_hit_rate": (1.0 - loaded / needed) if needed else None,
        "device_kv_bytes_peak": max(r.device_kv_bytes for r in measured),
        "host_kv_bytes_peak": max(r.host_kv_bytes for r in recs),
        "dense_kv_bytes": measured[-1].dense_kv_bytes,
        # host time issuing this step's loads (the runtime's StepRecord.load_seconds) per step
        "load_issue_ms_per_step": 1e3 * sum(r.load_seconds for r in measured) / len(measured),
        "plan_ms_per_step": 1e3 * sum(r.plan_seconds for r in measured) / len(measured),
        # the rest of the step's host time (StepRecord, where the runtime records it): the forward's call
        # (a CUDA-graph replay), the token copy (waits for the GPU), the policy's after_step (retrieval), and
        # the next step's plan made while this step's forward ran (RuntimeConfig.plan_ahead; plan_ms is then 0),
        # and the rest, so that the parts add up to the step: before the forward's launch (input ids upload),
        # after it (deferred loads issue, write-backs, copy starts), after the sync (sampling, emitting)
        **{f"{name}_ms_per_step": 1e3 * sum(getattr(r, f"{name}_seconds", 0.0) for r in measured) / len(measured)
           for name in ("forward", "sync", "after_step", "plan_ahead", "launch", "enqueue", "emit")},
        # every numeric StepRecord field summed over the measured steps (whatever the runtime records)
        "measured_step_totals": {f.name: sum(getattr(r, f.name) for r in measured)
                                 for f in dataclasses.fields(measured[0])
                                 if isinstance(getattr(measured[0], f.name), (int, float))},
        **load_hiding(measured),
        "cuda_graph_replays_total": engine.stats().get("cuda_graph_replays"),  # the engine's, all rounds so far
        "load_method": engine.kv.load_method,  # the one used ("auto" resolved)
    }
    if worker_start is not None:
        out.update(_worker_delta(worker_start, engine.worker.stats(), len(measured)))
        # what waiting for CPU retrieval adds to the step (DESIGN §5: <= 10 % at the reported batch)
        out["retrieval_wait_share_of_step"] = out["retrieval_wait_ms_per_step"] / out["step_ms_mean"]
    if turnover_start is not None:
        # the selections collected during the measured steps vs their predecessors
        end = _turnover_counts(engine.policy)
        d = {n: end[n] - turnover_start[n] for n in _TURNOVER_COUNTERS}
        out["topk_turnover_measured"] = d["topk_changed"] / d["topk_selected"] if d["topk_selected"] else None
        out["selection_turnover_measured"] = (d["turnover_changed"] / d["turnover_selected"]
                                              if d["turnover_selected"] else None)
    return out


# ============================================================================ one algorithm
def _free_memory() -> None:
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def release_pinned_cache() -> None:
    """Give the pinned host blocks that torch's caching host allocator keeps after a host store is
    freed back to the OS (stores of another shape have other sizes and would not reuse them)."""
    _free_memory()
    empty = getattr(getattr(torch, "accelerator", None), "empty_host_cache", None) or getattr(
        torch._C, "_host_emptyCache", None)
    if empty is not None and torch.cuda.is_available():
        empty()


def pinned_host_stats() -> dict:
    """torch's caching host allocator counters (bytes / segments), where this torch reports them."""
    stats = getattr(torch.cuda, "host_memory_stats", None)
    if stats is None or not torch.cuda.is_available():
        return {}
    return {k: v for k, v in stats().items() if "bytes" in k or "segment" in k}


def run_algorithm(model, algorithm: str, plan: CapacityPlan, settings: Settings, *, turnover: str,
                  drift: TurnoverModel | None, seed: int) -> dict:
    """Batch 1 (if ``settings.batch1``) and the plan's largest batch of ``algorithm`` in one engine.

    If the largest batch runs out of device blocks (``PoolExhaustedError``: the working-set
    estimate was short), the batch is lowered by 10 % (at least 1) in a fresh engine, at most
    ``settings.max_attempts`` times; every attempt is recorded."""
    n = plan.max_batch[algorithm]
    if n < 1:
        return {"algorithm": algorithm, "turnover": turnover, "error": f"no batch fits the budget: {format_plan(plan)}",
                "attempts": []}
    vocab = model.config.vocab_size
    attempts: list[dict] = []
    one = big = None
    t0 = time.perf_counter()
    for _ in range(settings.max_attempts):
        engine = make_engine(model, algorithm, plan, settings, max_batch=n, drift=drift, seed=seed)
        try:
            if one is None and settings.batch1:
                one = decode_round(engine, batch=1, prompt_len=plan.context_len, vocab=vocab, settings=settings,
                                   seed=seed)
            big = decode_round(engine, batch=n, prompt_len=plan.context_len, vocab=vocab, settings=settings,
                               seed=seed + 1)
            big["policy"] = engine.policy.stats()
            attempts.append({"batch": n, "ok": True})
            break
        except PoolExhaustedError as exc:
            attempts.append({"batch": n, "ok": False, "error": str(exc).splitlines()[0]})
            print(f"  {algorithm} batch {n}: PoolExhaustedError, retrying lower", flush=True)
            n -= max(1, n // 10)
            if n < 1:
                break
        finally:
            engine.close()
            del engine
            _free_memory()
    return {"algorithm": algorithm, "turnover": turnover, "batch1": one, "max_batch": big,
            "attempts": attempts, "wall_seconds": time.perf_counter() - t0}


# ============================================================================ rows, summary, table
def result_rows(res: dict, plan: CapacityPlan, turnovers: list[str], settings: Settings) -> list[dict]:
    """JSON rows of one algorithm's result: one per batch kind (max, and 1) and turnover. Dense and
    GSA On-Device are measured once; their rows are repeated per turnover with
    ``turnover_independent`` (neither reads the retrieval queries the turnover model changes)."""
    alg = res["algorithm"]
    independent = alg not in OFFLOAD_ALGORITHMS
    base = {"kind": "run", "shape": plan.shape, "context_len": plan.context_len, "sequence_len": plan.sequence_len,
            "context_label": f"{plan.sequence_len // 1024}K" if plan.sequence_len >= 1024 else str(plan.sequence_len),
            "algorithm": alg, "offload": alg in OFFLOAD_ALGORITHMS, "kv_budget_gib": plan.kv_budget_gib,
            "host_store_gib": plan.host_store_gib, "planned_max_batch": plan.max_batch[alg],
            "prefill": settings.prefill, "turnover_independent": independent, "attempts": res.get("attempts"),
            "algorithm_wall_seconds": res.get("wall_seconds")}
    rows = []
    for t in (turnovers if independent else [res["turnover"]]):
        if "error" in res:
            rows.append({**base, "turnover": t, "batch_kind": "max", "error": res["error"]})
            continue
        for kind, r in (("max", res["max_batch"]), ("one", res["batch1"])):
            if r is None:
                if kind == "max":
                    rows.append({**base, "turnover": t, "batch_kind": kind, "error": "no attempt completed"})
                continue
            # measured device KV per sequence and layer, in blocks, next to the plan's estimate
            per_seq = r["device_kv_bytes_peak"] / (r["batch"] * plan.bytes_per_token * plan.block_size)
            rows.append({**base, "turnover": t, "batch_kind": kind, **r,
                         "device_blocks_per_sequence_layer_peak": per_seq,
                         "planned_working_set_blocks": plan.working_set_blocks.get(alg)})
    return rows


def add_ratios(rows: list[dict]) -> list[dict]:
    """``speedup_vs_dense`` on batch-1 rows and ``speedup_vs_dense_max_batch`` on largest-batch rows
    (same shape, context and turnover), then one summary row per shape, context and turnover."""
    runs = [r for r in rows if r["kind"] == "run" and "tokens_per_s" in r]

    def dense(r: dict, kind: str) -> dict | None:
        return next((d for d in runs if d["algorithm"] == "dense" and d["batch_kind"] == kind and d["shape"] == r["shape"]
                     and d["context_len"] == r["context_len"] and d["turnover"] == r["turnover"]), None)

    for r in runs:
        d = dense(r, r["batch_kind"])
        key = "speedup_vs_dense" if r["batch_kind"] == "one" else "speedup_vs_dense_max_batch"
        r[key] = r["tokens_per_s"] / d["tokens_per_s"] if d else None
    summary = []
    for shape, ctx, turnover in dict.fromkeys((r["shape"], r["context_len"], r["turnover"]) for r in runs):
        group = [r for r in runs if (r["shape"], r["context_len"], r["turnover"]) == (shape, ctx, turnover)
                 and r["batch_kind"] == "max"]
        d = next((r for r in group if r["algorithm"] == "dense"), None)
        off = [r for r in group if r["offload"]]
        best = max(off, key=lambda r: r["tokens_per_s"], default=None)
        od = next((r for r in group if r["algorithm"] == "gsa-on-device"), None)
        summary.append({
            "kind": "summary", "shape": shape, "context_len": ctx, "turnover": turnover,
            "context_label": group[0]["context_label"], "kv_budget_gib": group[0]["kv_budget_gib"],
            "dense_batch": d["batch"] if d else None, "dense_tokens_per_s": d["tokens_per_s"] if d else None,
            "best_offload_algorithm": best["algorithm"] if best else None,
            "best_offload_batch": best["batch"] if best else None,
            "best_offload_tokens_per_s": best["tokens_per_s"] if best else None,
            "capacity_speedup_vs_dense": best["tokens_per_s"] / d["tokens_per_s"] if best and d else None,
            "best_offload_load_hidden_fraction": best.get("load_hidden_fraction") if best else None,
            "best_offload_topk_turnover_measured": best.get("topk_turnover_measured") if best else None,
            "best_offload_retrieval_wait_share_of_step": best.get("retrieval_wait_share_of_step") if best else None,
            "gsa_on_device_batch": od["batch"] if od else None,
            "gsa_on_device_speedup_vs_dense": od["tokens_per_s"] / d["tokens_per_s"] if od and d else None,
        })
    return [r for r in rows if r["kind"] != "summary"] + summary


def _f(x, spec: str = ".1f") -> str:
    return "-" if x is None else format(x, spec)


def _table_lines(rows: list[dict]) -> tuple[list[str], list[dict]]:
    """The algorithms present, and per summary row: its largest-batch cells (tok/s, batch) and
    batch-1 speedups per algorithm."""
    algs = [a for a in ALGORITHMS if any(r.get("algorithm") == a for r in rows)]
    out = []
    for s in (r for r in rows if r["kind"] == "summary"):
        cells, b1 = {}, {}
        for a in algs:
            pick = [r for r in rows if r["kind"] == "run" and r["algorithm"] == a and r["shape"] == s["shape"]
                    and r["context_len"] == s["context_len"] and r["turnover"] == s["turnover"]]
            mx = next((r for r in pick if r["batch_kind"] == "max"), None)
            one = next((r for r in pick if r["batch_kind"] == "one"), None)
            cells[a] = "-" if mx is None else ("error" if "tokens_per_s" not in mx
                                               else f"{mx['tokens_per_s']:.0f} ({mx['batch']})")
            b1[a] = _f(one.get("speedup_vs_dense") if one else None, ".2f")
        out.append({"summary": s, "cells": cells, "batch1": b1})
    return algs, out


def table(rows: list[dict]) -> str:
    """Largest-batch tokens/s per algorithm (batch in brackets), the capacity speedup, the load time
    hidden of the best offload run, and the batch-1 speedups, one line per shape, context and turnover."""
    algs, lines = _table_lines(rows)
    others = [a for a in algs if a != "dense"]
    text = [f"{'shape':<20} {'ctx':>5} {'turnover':<9} " + " ".join(f"{a:>17}" for a in algs)
            + f" {'cap x':>6} {'hidden':>6}  batch-1 x dense: " + " ".join(others)]
    for ln in lines:
        s = ln["summary"]
        text.append(f"{s['shape'][:20]:<20} {s['context_label']:>5} {s['turnover']:<9} "
                    + " ".join(f"{ln['cells'][a]:>17}" for a in algs)
                    + f" {_f(s['capacity_speedup_vs_dense'], '.2f'):>6} "
                    f"{_f(s['best_offload_load_hidden_fraction'], '.2f'):>6}  "
                    + " ".join(ln["batch1"][a] for a in others))
    return "\n".join(text)


def markdown_table(rows: list[dict]) -> str:
    """The same as :func:`table`, as the Markdown table of docs/runtime.md's capacity section."""
    algs, lines = _table_lines(rows)
    others = [a for a in algs if a != "dense"]
    head = (["shape", "context", "turnover"] + [f"{a} tok/s (batch)" for a in algs]
            + ["capacity speedup", "load hidden (best)", f"batch 1 vs dense ({' / '.join(others)})"])
    text = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for ln in lines:
        s = ln["summary"]
        cells = ([s["shape"], s["context_label"], s["turnover"]] + [ln["cells"][a] for a in algs]
                 + [_f(s["capacity_speedup_vs_dense"], ".2f") + "x",
                    _f(s["best_offload_load_hidden_fraction"], ".2f"),
                    " / ".join(ln["batch1"][a] for a in others)])
        text.append("| " + " | ".join(cells) + " |")
    return "\n".join(text)


# ============================================================================ main
def _card() -> str:
    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"


def _versions() -> dict:
    out = {"torch": torch.__version__}
    for mod in ("triton", "transformers"):
        try:
            out[mod] = __import__(mod).__version__
        except ImportError:
            out[mod] = None
    return out


#: RuntimeConfig fields the benchmark sets itself (from the plan and its own options)
_SET_BY_BENCHMARK = ("max_batch", "max_seq_len", "prefill_chunk", "cache_blocks", "num_device_blocks",
                     "num_host_blocks", "retrieval_threads", "cuda_graph")


#: run first, for every context of a shape: what the capacity speedup needs (dense and an offload
#: algorithm) and GSA On-Device; the other algorithms follow, KVStar (the slowest) last
FIRST_PHASE = ("dense", "gsa-on-device", "esa")


def job_order(algorithms: list[str], contexts: list[int], turnovers: list[str]) -> list[tuple[int, str, str]]:
    """``(context, algorithm, turnover)`` in run order: the :data:`FIRST_PHASE` algorithms for every
    context, then the others (in ``algorithms`` order) for every context; offload algorithms once per
    turnover, dense and GSA On-Device once (their rows serve every turnover)."""
    phases = ([a for a in algorithms if a in FIRST_PHASE], [a for a in algorithms if a not in FIRST_PHASE])
    return [(ctx, alg, t) for phase in phases for ctx in contexts for alg in phase
            for t in (turnovers if alg in OFFLOAD_ALGORITHMS else ["random"])]


def parse_runtime_options(items: list[str]) -> tuple[tuple[str, object], ...]:
    """``NAME=VALUE`` strings -> RuntimeConfig keyword arguments (``true``/``false`` -> bool, then
    int, float, else the string); names must be RuntimeConfig fields the benchmark does not set."""
    fields = {f.name for f in dataclasses.fields(RuntimeConfig)} - set(_SET_BY_BENCHMARK)
    out = []
    for item in items:
        name, sep, text = item.partition("=")
        if not sep or name not in fields:
            raise ValueError(f"--runtime-option {item!r} must be NAME=VALUE with NAME one of {', '.join(sorted(fields))}")
        value: object = text
        if text.lower() in ("true", "false"):
            value = text.lower() == "true"
        else:
            for kind in (int, float):
                try:
                    value = kind(text)
                    break
                except ValueError:
                    pass
        out.append((name, value))
    return tuple(out)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", nargs="+", default=["llama1b", "llama8b"], choices=sorted(SHAPES))
    p.add_argument("--contexts", type=int, nargs="+", default=[32768, 131072],
                   help="tokens per sequence at the end (prompt = context - one block, block-aligned)")
    p.add_argument("--algorithms", nargs="+", default=list(DEFAULT_ALGORITHMS), choices=ALGORITHMS,
                   help="*-gpu-reps: the offload policy with GPU-resident representations (RetrievalConfig)")
    p.add_argument("--turnovers", nargs="+", default=list(TURNOVERS), choices=TURNOVERS)
    p.add_argument("--kv-budget-gib", type=float, nargs="+", default=None,
                   help="device KV budget per shape (one value per --shapes entry); default: the smallest round "
                        "size holding --dense-batch sequences of the longest context (default_kv_budget_gib)")
    p.add_argument("--dense-batch", type=int, default=2, help="dense batch the default budget holds at the longest context")
    p.add_argument("--budget-per-context", action="store_true",
                   help="default budget per context (dense holds --dense-batch at each context) instead of per shape")
    p.add_argument("--host-gib", type=float, default=108.0,
                   help="pinned host memory the host store may use (128 GiB machine, 20 GiB left for the rest)")
    p.add_argument("--realistic-turnover", type=float, default=None,
                   help="top-k turnover per retrieval the realistic run reproduces (default: the SmolLM2 measurement)")
    p.add_argument("--dtype", default="auto", choices=("auto", "bfloat16", "float16", "float32"),
                   help="auto: bfloat16 on CUDA, float32 on the CPU")
    p.add_argument("--block-size", type=int, default=64)
    p.add_argument("--ratio", type=float, default=0.125)
    p.add_argument("--stride", type=int, default=4, help="retrieval stride of ESA, GSA and KVStar")
    p.add_argument("--cache-blocks", type=int, default=2)
    p.add_argument("--decode-steps", type=int, default=32)
    p.add_argument("--warmup-steps", type=int, default=8)
    p.add_argument("--fill-chunk", type=int, default=16384, help="prefill chunk (filled or real)")
    p.add_argument("--retrieval-threads", type=int, default=8)
    p.add_argument("--stagger", action="store_true",
                   help="RetrievalConfig.stagger: each request's retrieval schedule shifted to the least-used phase")
    p.add_argument("--prefill", default="fill", choices=("fill", "model"),
                   help="fill: FilledPrefillBackend writes random prompt KV; model: run the model's prefill")
    p.add_argument("--cuda-graph", default="auto", choices=("auto", "on", "off"))
    p.add_argument("--no-batch1", action="store_true", help="skip the batch-1 rounds")
    p.add_argument("--runtime-option", action="append", default=[], metavar="NAME=VALUE",
                   help="another RuntimeConfig field for every engine (e.g. overlap_loads=false, load_method=staged)")
    p.add_argument("--max-minutes", type=float, default=None,
                   help="start no new run after this many minutes; shape i of n stops at (i+1)/n of it "
                        "(the rest is recorded as skipped)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    p.add_argument("--out-dir", type=Path, default=Path("benchmarks/results/runtime"))
    p.add_argument("--turnover-dir", type=Path, default=Path(__file__).resolve().parent / "results" / "runtime",
                   help="where the SmolLM2 turnover measurement (turnover_smollm2_*.json) is read from")
    p.add_argument("--tag", default="", help="appended to the JSON file name")
    args = p.parse_args(argv)
    if args.kv_budget_gib is not None and len(args.kv_budget_gib) != len(args.shapes):
        p.error(f"--kv-budget-gib takes one value per --shapes entry ({len(args.shapes)}), got {len(args.kv_budget_gib)}")
    if not 1 <= args.warmup_steps < args.decode_steps:
        p.error(f"--warmup-steps must be in [1, --decode-steps); got {args.warmup_steps} and {args.decode_steps}")
    try:
        args.runtime_options = parse_runtime_options(args.runtime_option)
    except ValueError as exc:
        p.error(str(exc))
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = getattr(torch, args.dtype) if args.dtype != "auto" else (torch.bfloat16 if device == "cuda" else torch.float32)
    dtype_bytes = torch.empty((), dtype=dtype).element_size()
    settings = Settings(block_size=args.block_size, ratio=args.ratio, stride=args.stride, cache_blocks=args.cache_blocks,
                        decode_steps=args.decode_steps, warmup_steps=args.warmup_steps, fill_chunk=args.fill_chunk,
                        retrieval_threads=args.retrieval_threads, stagger=args.stagger, prefill=args.prefill,
                        cuda_graph={"auto": None, "on": True, "off": False}[args.cuda_graph], batch1=not args.no_batch1,
                        runtime_options=args.runtime_options)
    card = _card()
    stamp = datetime.now(timezone.utc)
    out_path = args.out_dir / f"capacity_{card.replace(' ', '-')}_{stamp:%Y-%m-%d}{args.tag}.json"
    result = {"benchmark": "capacity", "card": card, "date_utc": stamp.isoformat(timespec="seconds"),
              **_versions(), "dtype": str(dtype).replace("torch.", ""), "device": device,
              "settings": dataclasses.asdict(settings), "argv": sys.argv[1:] if argv is None else argv,
              "shapes": {SHAPES[s].name: SHAPES[s].describe() for s in args.shapes},
              "plans": [], "turnover_models": [], "rows": [], "skipped": [], "pinned_host_memory": []}
    target, no_target = None, None
    if "realistic" in args.turnovers:
        try:
            target = ((args.realistic_turnover, "--realistic-turnover") if args.realistic_turnover is not None else
                      measured_turnover(args.turnover_dir, block_size=args.block_size, ratio=args.ratio,
                                        stride=args.stride))
            print(f"realistic turnover: top-k turnover {target[0]:.3f} per retrieval ({target[1]})")
        except ValueError as exc:
            # one GPU call should still bring the random half: every realistic run is recorded as
            # skipped with this reason, and the exit status is 1
            no_target = str(exc)
            print(f"WARNING: the realistic-turnover runs are skipped: {no_target}", flush=True)
    drift_models: dict[tuple[str, int], TurnoverModel] = {}
    t_start = time.perf_counter()
    deadline = None if args.max_minutes is None else t_start + 60 * args.max_minutes

    def save() -> None:
        result["rows"] = add_ratios(result["rows"])
        result["wall_seconds"] = time.perf_counter() - t_start
        args.out_dir.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps(result, indent=1, default=str) + "\n")

    for si, shape_key in enumerate(args.shapes):
        spec = SHAPES[shape_key]
        longest = max(args.contexts)
        # each shape gets its share of --max-minutes (and whatever the shapes before it left)
        shape_deadline = None if deadline is None else t_start + (deadline - t_start) * (si + 1) / len(args.shapes)
        t0 = time.perf_counter()
        model = build_model(spec, dtype=dtype, device=device, max_positions=longest)
        print(f"== {spec.name}: {spec.describe()}; built in {time.perf_counter() - t0:.1f} s", flush=True)
        plans = {}
        for ctx in sorted(args.contexts):
            if args.kv_budget_gib is not None:
                budget = args.kv_budget_gib[si]
            else:
                budget = default_kv_budget_gib(spec, ctx if args.budget_per_context else longest,
                                               block_size=args.block_size, dtype_bytes=dtype_bytes,
                                               dense_batch=args.dense_batch)
            plans[ctx] = plan_capacity(spec, sequence_len=ctx, decode_steps=args.decode_steps, kv_budget_gib=budget,
                                       host_gib=args.host_gib, sparse=settings.sparse_for("esa"),
                                       cache_blocks=args.cache_blocks, dtype_bytes=dtype_bytes)
            result["plans"].append(plans[ctx].to_dict())
            print(format_plan(plans[ctx]), flush=True)
        for ctx, alg, turnover in job_order(args.algorithms, sorted(args.contexts), args.turnovers):
            plan = plans[ctx]
            what = {"shape": spec.name, "context_len": plan.context_len, "algorithm": alg, "turnover": turnover}
            if shape_deadline is not None and time.perf_counter() > shape_deadline:
                result["skipped"].append({**what, "reason": f"this shape's share of --max-minutes {args.max_minutes} "
                                                            "was used"})
                continue
            if turnover == "realistic" and no_target is not None:
                result["skipped"].append({**what, "reason": no_target})
                continue
            drift = None
            if turnover == "realistic":
                key = (spec.name, plan.context_len)
                if key not in drift_models:
                    t0 = time.perf_counter()
                    drift_models[key] = calibrate_turnover(plan, spec, settings.sparse_for("esa"), target[0],
                                                           target[1], seed=si)
                    result["turnover_models"].append({"shape": spec.name, "context_len": plan.context_len,
                                                      **dataclasses.asdict(drift_models[key]),
                                                      "seconds": time.perf_counter() - t0})
                drift = drift_models[key]
            try:
                res = run_algorithm(model, alg, plan, settings, turnover=turnover, drift=drift, seed=si)
            except Exception as exc:  # noqa: BLE001 - reported in the JSON and the log, the others still run
                traceback.print_exc()
                res = {"algorithm": alg, "turnover": turnover,
                       "error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"}
                _free_memory()
            result["rows"] += result_rows(res, plan, args.turnovers, settings)
            mx = res.get("max_batch") or {}
            print(f"  {plan.sequence_len // 1024:>4}K {alg:<14} {turnover:<9} batch {mx.get('batch', '-')}: "
                  f"{_f(mx.get('tokens_per_s'))} tok/s (step {_f(mx.get('step_ms_mean'), '.2f')} ms; batch 1: "
                  f"{_f((res.get('batch1') or {}).get('tokens_per_s'))} tok/s) in {_f(res.get('wall_seconds'))} s"
                  + (f" ERROR {res['error']}" if "error" in res else ""), flush=True)
            save()
        del model
        result["pinned_host_memory"].append({"shape": spec.name, **pinned_host_stats()})
        release_pinned_cache()
    save()
    errors = [r for r in result["rows"] if "error" in r]
    print(f"wrote {out_path} ({time.perf_counter() - t_start:.0f} s); {len(errors)} error rows, "
          f"{len(result['skipped'])} runs skipped")
    print(table(result["rows"]))
    return 1 if errors or no_target else 0


if __name__ == "__main__":
    sys.exit(main())
