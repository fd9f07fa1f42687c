"""Generation API: requests, chunked prefill, batched decode, sampling, stop tokens, streaming.

``Engine`` owns the KV manager (pools, tables, host store, working sets), the retrieval worker,
the policy and every per-step buffer; all are allocated once at construction at the sizes of
:class:`~ucm_trt.runtime.config.RuntimeConfig` (plan/run style). A step is either one prefill chunk
of one request or one decode token for every running request:

``plan``  policy selections -> working-set delta prefetch -> block tables, slots, selections
          written to host mirrors and copied (``non_blocking`` on CUDA) into the device buffers;
``run``   the backend's forward over views of those buffers;
``after`` write-back of filled blocks, query hand-off to the policy (retrieval schedule),
          sampling, stop checks, streaming callbacks, freeing finished requests.

With ``RuntimeConfig.plan_ahead`` (default) a decode step makes the *next* step's plan while its
forward runs on the device, before it waits for its tokens (``docs/runtime.md``, "Planning step N+1
while step N runs"); the tokens are those of the serial order.

Errors (including a failed retrieval task) propagate to the caller; :meth:`Engine.generate`
frees every block of every request before re-raising, so nothing leaks.
"""

from __future__ import annotations

import itertools
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from ucm_trt import algorithms as registry
from ucm_trt.config import SparseConfig
from ucm_trt.runtime.backends.base import Backend
from ucm_trt.runtime.config import RuntimeConfig
from ucm_trt.runtime.cuda_graph import SELECTION_WIDTH_BUCKET, DecodeGraphs
from ucm_trt.runtime.kv import KVLayout, KVManager, StepTransfer
from ucm_trt.runtime.metrics import RuntimeMetrics, StepRecord
from ucm_trt.runtime.prefill_cache import PrefillCache, PrefillRecording
from ucm_trt.runtime.step import StepContext
from ucm_trt.runtime.worker import RetrievalWorker
from ucm_trt.sparse.policies.base import Policy, PolicyRuntime, RequestView, extend_selection
from ucm_trt.sparse.policies.dense import DensePolicy

__all__ = ["Engine", "GenerationResult", "SamplingParams"]

TokenCallback = Callable[[str, int], None]


@dataclass(frozen=True, kw_only=True)
class SamplingParams:
    """How tokens are drawn.

    ``temperature == 0`` is greedy (argmax). ``temperature > 0`` samples from
    ``softmax(logits / temperature)`` restricted to the smallest set of tokens whose probability
    reaches ``top_p``, with a ``torch.Generator`` seeded by ``seed`` (required: the global RNG is
    never used). Generation stops after ``max_new_tokens`` or at any of ``stop_token_ids`` (the
    stop token is kept in the output ids).
    """

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        c = "SamplingParams"
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(f"{c}.max_new_tokens must be an int >= 1, got {self.max_new_tokens!r}")
        if isinstance(self.temperature, bool) or not isinstance(self.temperature, (int, float)) or not self.temperature >= 0:
            raise ValueError(f"{c}.temperature must be a number >= 0, got {self.temperature!r}")
        if isinstance(self.top_p, bool) or not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1:
            raise ValueError(f"{c}.top_p must be in (0, 1], got {self.top_p!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0):
            raise ValueError(f"{c}.seed must be an int >= 0 or None, got {self.seed!r}")
        if self.temperature > 0 and self.seed is None:
            raise ValueError(f"{c}.seed is required when temperature > 0 (got temperature={self.temperature}); "
                             "sampling uses an explicit torch.Generator, never the global RNG")
        if self.temperature == 0 and self.top_p != 1.0:
            raise ValueError(f"{c}.top_p={self.top_p} has no effect with temperature=0 (greedy); set temperature > 0")
        if not isinstance(self.stop_token_ids, tuple) or any(
            isinstance(t, bool) or not isinstance(t, int) or t < 0 for t in self.stop_token_ids
        ):
            raise ValueError(f"{c}.stop_token_ids must be a tuple of ints >= 0, got {self.stop_token_ids!r}")


@dataclass
class GenerationResult:
    request_id: str
    prompt_tokens: int
    token_ids: list[int]
    finish_reason: str  # "stop" | "length"
    ttft_seconds: float


@dataclass
class _Request:
    rid: str
    prompt: list[int]
    params: SamplingParams
    callback: TokenCallback | None
    bounds: list[int]
    generator: torch.Generator | None
    chunk: int = 0  # next prefill chunk index
    step: int = 0  # decode steps done
    out: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    t_start: float = 0.0
    ttft: float = 0.0
    # prefill cache: the recording this request's prefill replays, or the chunks being recorded
    replay: PrefillRecording | None = None
    recording: list | None = None


@dataclass
class _DecodePlan:
    """A decode step's plan (:meth:`Engine._make_plan`), made before its forward: the step's rows and
    views, its transfers, the selection widths and the step context over the uploaded buffers."""

    rows: list[str]
    views: list[RequestView]
    transfer: StepTransfer
    widths: tuple
    context: StepContext
    seconds: float


def _check_prompt(prompt: object) -> list[int]:
    if isinstance(prompt, torch.Tensor):
        if prompt.dim() != 1:
            raise ValueError(f"prompt tensor must be 1-D token ids, got shape {tuple(prompt.shape)}")
        prompt = prompt.tolist()
    if not isinstance(prompt, Sequence) or isinstance(prompt, (str, bytes)) or len(prompt) == 0:
        raise ValueError(f"prompt must be a non-empty sequence of token ids, got {type(prompt).__name__}")
    out = []
    for i, t in enumerate(prompt):
        if isinstance(t, bool) or not isinstance(t, int) or t < 0:
            raise ValueError(f"prompt[{i}] must be an int token id >= 0, got {t!r}")
        out.append(t)
    return out


def _selection_blocks(sels: list[torch.Tensor]) -> list[np.ndarray]:
    """The blocks each selection ``[Hkv, S]`` (int, sorted, -1 padded) reads: int64, unique,
    ascending, negative entries dropped. Selections of one shape are converted together; where every
    KV-head row is the same strictly ascending selection (a shared selection), its first row's
    valid prefix is the answer, otherwise ``np.unique`` of the row's entries."""
    out: list[np.ndarray | None] = [None] * len(sels)
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, s in enumerate(sels):
        groups.setdefault(tuple(s.shape), []).append(i)
    for idx in groups.values():
        m = torch.stack([sels[i] for i in idx]).cpu().numpy().astype(np.int64)  # [P, H, S]
        if m.shape[-1] == 0 or m.ndim != 3:
            for j, i in enumerate(idx):
                a = m[j].reshape(-1)
                out[i] = np.unique(a[a >= 0])
            continue
        first = m[:, 0]  # [P, S]
        valid = first >= 0
        count = valid.sum(-1)
        ok = (m == first[:, None]).all(axis=(1, 2)) & (valid == (np.arange(m.shape[-1]) < count[:, None])).all(-1)
        ok &= ((first[:, 1:] > first[:, :-1]) | ~valid[:, 1:]).all(-1)
        for j, i in enumerate(idx):
            if ok[j]:
                out[i] = first[j, : count[j]]
            else:
                a = m[j].reshape(-1)
                out[i] = np.unique(a[a >= 0])
    return out


def _index_guard(device: torch.device):
    """The engine's IndexGuard, knowing the words of the attention's and the block copies' codes
    (imported here: the Triton kernels are needed on CUDA only)."""
    from ucm_trt.kernels.attention import ATTENTION_GUARD_CODES
    from ucm_trt.kernels.block_copy import GUARD_CODES
    from ucm_trt.kernels.guard import IndexGuard

    return IndexGuard(device, codes={**ATTENTION_GUARD_CODES, **GUARD_CODES})


class Engine:
    """Paged-KV generation runtime with a UCM policy.

    Parameters
    ----------
    backend:
        A :class:`~ucm_trt.runtime.backends.base.Backend` (e.g. ``TorchBackend(model)``).
    policy:
        A :class:`~ucm_trt.sparse.policies.base.Policy` (default dense). Bound to this engine.
    sparse:
        Block size, windows, budget, scoring (:class:`~ucm_trt.config.SparseConfig`).
    config:
        Maximum sizes (:class:`~ucm_trt.runtime.config.RuntimeConfig`).
    prefill_cache:
        A :class:`~ucm_trt.runtime.prefill_cache.PrefillCache` of the same backend, shared with other
        engines: a prompt another engine prefilled with the same chunking is replayed instead of
        computed (a prefill is dense for every policy); None (default) computes every prefill.
    """

    def __init__(
        self,
        backend: Backend,
        policy: Policy | None = None,
        *,
        sparse: SparseConfig | None = None,
        config: RuntimeConfig | None = None,
        prefill_cache: PrefillCache | None = None,
    ) -> None:
        policy, sparse, config = self._checked_args(backend, policy, sparse, config)
        self._refuse_incompatible(backend, policy, sparse, config)
        self._check_prefill_cache(prefill_cache, backend, policy, config)
        self.backend, self.policy, self.sparse, self.config = backend, policy, sparse, config
        self.prefill_cache = prefill_cache
        self.shape = backend.shape
        self._build_kv()
        self._allocate_step_buffers()
        self._init_scheduler()

    @staticmethod
    def _checked_args(backend, policy, sparse, config) -> tuple[Policy, SparseConfig, RuntimeConfig]:
        """The arguments' types, with the defaults filled in (dense policy, default configs)."""
        if not isinstance(backend, Backend):
            raise TypeError(f"backend must be a ucm_trt Backend, got {type(backend).__name__}")
        policy = DensePolicy() if policy is None else policy
        if not isinstance(policy, Policy):
            raise TypeError(f"policy must be a ucm_trt Policy, got {type(policy).__name__}")
        sparse = SparseConfig() if sparse is None else sparse
        if not isinstance(sparse, SparseConfig):
            raise TypeError(f"sparse must be a SparseConfig, got {type(sparse).__name__}")
        config = RuntimeConfig() if config is None else config
        if not isinstance(config, RuntimeConfig):
            raise TypeError(f"config must be a RuntimeConfig, got {type(config).__name__}")
        return policy, sparse, config

    @staticmethod
    def _refuse_incompatible(backend: Backend, policy: Policy, sparse: SparseConfig, config: RuntimeConfig) -> None:
        """What this combination cannot serve: positions beyond the model's, a block size other than
        the rewritten model's, the registry's rules (backend, rewritten model, query window), graphs."""
        shape = backend.shape
        if policy.rerope is None and config.max_seq_len > shape.max_positions:
            raise ValueError(
                f"RuntimeConfig.max_seq_len ({config.max_seq_len}) exceeds the model's max positions "
                f"({shape.max_positions}); use the rerope policy to extrapolate, or lower max_seq_len"
            )
        if backend.block_size is not None and backend.block_size != sparse.block_size:
            raise ValueError(
                f"SparseConfig.block_size ({sparse.block_size}) must equal the block size the backend's model "
                f"was built for ({backend.block_size})"
            )
        registry.check_backend(policy.name, backend.kind,
                               in_layer_selection=type(policy).layer_selection is not Policy.layer_selection)
        registry.check_graph_model(policy.name, model_algorithm=backend.algorithm, model_rerope=backend.rerope,
                                   policy_rerope=policy.rerope)
        registry.check_query_window(policy.name, max(1, policy.query_window), backend=backend.kind,
                                    most=backend.max_query_window, prefill_chunk=config.prefill_chunk)
        if config.cuda_graph is True and not backend.supports_cuda_graph:
            raise ValueError(
                f"RuntimeConfig.cuda_graph=True, but {type(backend).__name__} cannot capture its decode step "
                "(CUDA graphs need the PyTorch backend on a CUDA device with attention='triton' and "
                "validate=False); use cuda_graph=None (auto) or False"
            )

    @staticmethod
    def _check_prefill_cache(cache: PrefillCache | None, backend: Backend, policy: Policy,
                             config: RuntimeConfig) -> None:
        """A cache of this backend, a policy whose prefill it can stand for, a window it holds."""
        if cache is None:
            return
        if not isinstance(cache, PrefillCache):
            raise TypeError(f"prefill_cache must be a PrefillCache or None, got {type(cache).__name__}")
        if cache.backend is not backend:
            raise ValueError("prefill_cache was made for another backend (its recordings are another model's K/V); "
                             "make one PrefillCache(backend) per backend")
        if policy.rerope is not None:
            raise ValueError(f"prefill_cache cannot serve the {policy.name!r} policy: ReRoPE prefills un-rotated keys "
                             "into the pool, not the post-RoPE keys a recording holds")
        if policy.query_window > cache.query_window:
            raise ValueError(f"prefill_cache keeps {cache.query_window} prompt queries per layer, the {policy.name!r} "
                             f"policy needs {policy.query_window}; use PrefillCache(query_window="
                             f"{policy.query_window}) or more")
        registry.check_query_window(policy.name, cache.query_window, backend=backend.kind,
                                    most=backend.max_query_window, prefill_chunk=config.prefill_chunk)

    def _build_kv(self) -> None:
        """The KV manager (device pools, host store when the policy offloads), the index guard, the
        retrieval worker, and the policy bound to them."""
        shape, config, policy, dev = self.shape, self.config, self.policy, self.backend.device
        bs = self.sparse.block_size
        max_blocks = config.max_blocks(bs)
        n_dev = config.num_device_blocks or config.max_batch * max_blocks + 1
        n_host = (config.num_host_blocks or config.max_batch * max_blocks) if policy.offload else 0
        layout = KVLayout(num_layers=shape.num_layers, num_kv_heads=shape.num_kv_heads, head_dim=shape.head_dim,
                          block_size=bs, dtype=self.backend.kv_dtype, device=dev)
        # one device flag for the Triton kernels' out-of-range ids (block copies, attention): set
        # without a sync, read with the step's one device-to-host copy (_check_guard)
        self.guard = _index_guard(dev) if dev.type == "cuda" else None
        self.kv = KVManager(layout, max_batch=config.max_batch, max_blocks=max_blocks, num_device_blocks=n_dev,
                            offload=policy.offload, num_host_blocks=n_host, cache_blocks=config.cache_blocks,
                            overlap=config.overlap_loads, load_method=config.load_method,
                            time_copies=config.time_loads and dev.type == "cuda", guard=self.guard)
        self.worker = RetrievalWorker(config.retrieval_threads, intra_op_threads=config.retrieval_intra_op_threads)
        policy.bind(PolicyRuntime(shape=shape, sparse=self.sparse, kv=self.kv, worker=self.worker, device=dev))

    def _allocate_step_buffers(self) -> None:
        """Per-step buffers, allocated once: device tensors and their host mirrors (pinned on CUDA)."""
        shape, config, dev = self.shape, self.config, self.backend.device
        pin = dev.type == "cuda"
        L, B, H = shape.num_layers, config.max_batch, shape.num_kv_heads
        max_blocks = config.max_blocks(self.sparse.block_size)
        # the policy's own query window; with a prefill cache the cache's (larger or equal): every engine
        # sharing the cache captures, and chunks its prompts, alike (a recording's key holds the chunking)
        self._policy_width = max(1, self.policy.query_window)
        width = self._policy_width if self.prefill_cache is None else self.prefill_cache.query_window
        tok = config.prefill_chunk + width  # the last prefill chunk may absorb a short remainder
        self._capture_width = width
        self._ids = torch.zeros(B, tok, dtype=torch.long, device=dev)
        self._pos = torch.zeros(B, tok, dtype=torch.long, device=dev)
        self._seq_lens = torch.zeros(B, dtype=torch.int32, device=dev)
        self._ids_h = torch.zeros(B, tok, dtype=torch.long, pin_memory=pin)
        self._pos_h = torch.zeros(B, tok, dtype=torch.long, pin_memory=pin)
        self._seq_lens_h = torch.zeros(B, dtype=torch.int32, pin_memory=pin)
        slots = max(B, tok)
        self._slot_b = torch.zeros(L, slots, dtype=torch.long, device=dev)
        self._slot_o = torch.zeros(L, slots, dtype=torch.long, device=dev)
        self._slot_b_h = torch.zeros(L, slots, dtype=torch.long, pin_memory=pin)
        self._slot_o_h = torch.zeros(L, slots, dtype=torch.long, pin_memory=pin)
        self._sel = torch.full((L, B, H, max_blocks), -1, dtype=torch.int32, device=dev)
        self._sel_h = torch.full((L, B, H, max_blocks), -1, dtype=torch.int32, pin_memory=pin)
        self._sel_hw = np.zeros((L, B), dtype=np.int64)  # per (layer, row): the mirror is -1 from there on
        self._capture = torch.zeros(L, B, shape.num_q_heads, width, shape.head_dim, dtype=torch.float32, device=dev)
        # host copy of the captured queries (pinned on CUDA), only for policies that read them
        # (their after_step is not the base no-op): a non-blocking copy per decode step
        self._host_queries = type(self.policy).after_step is not Policy.after_step
        # [B, L, Hq, D]: a step's rows are one contiguous slice, so the copy lands directly in it
        self._capture_h = torch.zeros(B, L, shape.num_q_heads, shape.head_dim, dtype=torch.float32,
                                      pin_memory=pin) if self._host_queries else None
        self._arange = torch.arange(max_blocks, dtype=torch.int32)

    def _init_scheduler(self) -> None:
        """Request queues, metrics, the decode graphs and the caches of the last step's plan."""
        config, backend = self.config, self.backend
        self._requests: dict[str, _Request] = {}
        self._waiting: deque[str] = deque()
        self._prefilling: str | None = None
        self._running: list[str] = []
        self._ids_counter = itertools.count()
        self.metrics = RuntimeMetrics()
        use_graphs = config.cuda_graph is not False and backend.supports_cuda_graph
        self._graphs = DecodeGraphs(backend, max_graphs=config.max_cuda_graphs) if use_graphs else None
        self._eager_decode_steps = 0
        # per request and layer: (selection tensor, its blocks) of the last plan (the tensor kept
        # alive, so its identity stays its own: a policy never writes a selection it handed out)
        self._needed_cache: dict[str, dict[int, tuple[torch.Tensor, np.ndarray]]] = {}
        self._prefetch_cache: dict[str, dict[int, tuple[torch.Tensor, np.ndarray]]] = {}
        # what the selection buffers hold: (key, the keyed tensors kept alive, (views, widths))
        self._sel_last: tuple | None = None
        # overlapped schedule: the selections the last decode step attended, {rid: row}, new lens
        self._attended: tuple[dict[str, int], list, list[int]] | None = None
        self._uploads_done = None  # event after the last step's host-mirror uploads (CUDA)
        self._ahead: _DecodePlan | None = None  # the next decode step's plan, made during the last step
        # the last step's after_step, deferred to run beside this step's forward: (rows, views, query copy event)
        self._after: tuple[list[int], list[RequestView], object] | None = None
        self._unreleased: set[str] = set()  # stopped requests a plan made ahead still holds (freed after it)
        self._planning_rows: list[str] = []  # the rows of the plan being made (error messages)
        self._output_h: torch.Tensor | None = None  # pinned buffer of the step's output copy (CUDA)
        self._closed = False

    # ================================================================== requests
    def add_request(
        self,
        prompt: Sequence[int] | torch.Tensor,
        params: SamplingParams | None = None,
        *,
        request_id: str | None = None,
        on_token: TokenCallback | None = None,
    ) -> str:
        """Queue a prompt; returns the request id. ``on_token(request_id, token_id)`` streams tokens."""
        if self._closed:
            raise RuntimeError("engine is closed")
        ids = _check_prompt(prompt)
        params = SamplingParams() if params is None else params
        if not isinstance(params, SamplingParams):
            raise TypeError(f"params must be SamplingParams, got {type(params).__name__}")
        if on_token is not None and not callable(on_token):
            raise TypeError(f"on_token must be callable, got {type(on_token).__name__}")
        rid = request_id if request_id is not None else f"req-{next(self._ids_counter)}"
        if not isinstance(rid, str) or not rid:
            raise ValueError(f"request_id must be a non-empty str, got {rid!r}")
        if rid in self._requests:
            raise ValueError(f"request_id {rid!r} is already in use")
        if len(ids) + 1 > self.config.max_seq_len:
            raise ValueError(
                f"prompt of {len(ids)} tokens leaves no room to generate within RuntimeConfig.max_seq_len "
                f"({self.config.max_seq_len})"
            )
        gen = None
        if params.temperature > 0:
            gen = torch.Generator(device="cpu").manual_seed(params.seed)
        self._requests[rid] = _Request(rid=rid, prompt=ids, params=params, callback=on_token,
                                       bounds=self._chunk_bounds(len(ids)), generator=gen)
        self._waiting.append(rid)
        return rid

    def _chunk_bounds(self, n: int) -> list[int]:
        c, w = self.config.prefill_chunk, min(self._capture_width, n)
        bounds = list(range(0, n, c)) + [n]
        if len(bounds) > 2 and n - bounds[-2] < w:
            bounds[-2] = n - w
            if bounds[-2] <= bounds[-3]:
                del bounds[-2]
        return bounds

    @property
    def has_work(self) -> bool:
        return bool(self._waiting or self._prefilling or self._running or self._ahead is not None)

    # ================================================================== stepping
    def step(self) -> list[tuple[str, int]]:
        """Run one step; returns the ``(request_id, token)`` pairs it produced."""
        if self._closed:
            raise RuntimeError("engine is closed")
        if self._ahead is not None:  # the decode step planned during the last one runs first
            return self._decode()
        if self._prefilling is None and self._waiting and len(self._running) < self.config.max_batch:
            rid = self._waiting.popleft()
            req = self._requests[rid]
            req.t_start = time.perf_counter()
            self.kv.add_request(rid)
            self.policy.on_request_start(rid, len(req.prompt))
            self._prefilling = rid
        if self._prefilling is not None:
            return self._prefill_chunk(self._requests[self._prefilling])
        if self._running:
            return self._decode()
        return []

    def _context(self, rows: list[str], t: int, new_lens: list[int], selections) -> StepContext:
        b = len(rows)
        return StepContext(
            kv=self.kv, policy=self.policy, attention=self.backend.attention, rows=rows, num_tokens=t,
            new_lens=new_lens, seq_lens=self._seq_lens[:b], positions=self._pos[:b, :t], selections=selections,
            slot_blocks=self._slot_b[:, : b * t], slot_offsets=self._slot_o[:, : b * t], capture=self._capture,
            capture_width=self._capture_width, rope_theta=self.shape.rope_theta,
            layer_waits=self.kv.layer_waits(),
        )

    def _write_slots(self, rows: list[str], starts: list[int], t: int) -> None:
        pos = torch.tensor(starts, dtype=torch.long)[:, None] + torch.arange(t)[None, :]  # [B, T]
        self._write_positions(rows, pos, [s + t for s in starts])

    def _write_positions(self, rows: list[str], pos: torch.Tensor, seq_lens: list[int]) -> None:
        """Slots (physical block, offset) of the tokens at ``pos`` [B, T], positions and seq_lens:
        host mirrors, then one copy each into the device buffers."""
        self._guard_host_mirrors()
        bs = self.sparse.block_size
        th = self.kv.tables_host
        b, t = pos.shape
        row_idx = torch.arange(b)[:, None].expand(b, t)
        blocks = th[:, row_idx, pos // bs].reshape(th.shape[0], b * t)  # [L, B*T]
        self._slot_b_h[:, : b * t] = blocks
        self._slot_o_h[:, : b * t] = (pos % bs).reshape(1, b * t)
        self._pos_h[:b, :t] = pos
        self._seq_lens_h[:b] = torch.tensor(seq_lens, dtype=torch.int32)
        nb = self._slot_b.device.type == "cuda"
        self._slot_b[:, : b * t].copy_(self._slot_b_h[:, : b * t], non_blocking=nb)
        self._slot_o[:, : b * t].copy_(self._slot_o_h[:, : b * t], non_blocking=nb)
        self._pos[:b, :t].copy_(self._pos_h[:b, :t], non_blocking=nb)
        self._seq_lens[:b].copy_(self._seq_lens_h[:b], non_blocking=nb)
        self._mark_uploads_done()  # the last upload of a step: covers the ids and selections before it

    def _record(self, kind: str, rows: int, tokens: int, t0: float, tr: StepTransfer, held: tuple[int, int, int],
                plan_seconds: float = 0.0, **host: float) -> None:
        timed = self.kv.collect_timings() if self.kv.time_copies else (0.0, 0.0)
        self.metrics.record(StepRecord(
            plan_seconds=plan_seconds, **host,
            kind=kind, rows=rows, tokens=tokens, seconds=time.perf_counter() - t0,
            blocks_loaded=tr.blocks_loaded, blocks_needed=tr.blocks_needed,
            blocks_written_back=tr.blocks_written_back, blocks_evicted=tr.blocks_evicted,
            bytes_h2d=tr.bytes_h2d, bytes_d2h=tr.bytes_d2h, load_seconds=tr.load_seconds,
            blocks_prefetched=tr.blocks_prefetched, blocks_deferred=tr.blocks_deferred,
            stale_layers=tr.stale_layers, sync_switches=tr.sync_switches,
            load_gpu_ms=timed[0], load_wait_ms=timed[1],
            device_kv_bytes=held[0], host_kv_bytes=held[1], dense_kv_bytes=held[2],
            working_set_bytes=tr.working_set_blocks * self.kv.block_bytes,
        ))

    def _held(self) -> tuple[int, int, int]:
        return self.kv.device_bytes_held(), self.kv.host_bytes_held(), self.kv.dense_bytes()

    def _queries(self, b: int, last_only: bool) -> list[torch.Tensor]:
        """The captured queries on the host, a blocking copy: per layer ``[B, Hq, W, D]`` (or
        ``[B, Hq, D]`` with ``last_only``). Used once per request, at the end of its prefill (and by
        Blend); decode steps use :meth:`_start_query_copy` instead."""
        cap = self._capture[:, :b].cpu()  # [L, B, Hq, W, D]
        if last_only:
            return list(cap[:, :, :, 0])
        return list(cap)

    def _start_query_copy(self, b: int) -> torch.cuda.Event | None:
        """Start copying this decode step's queries (slot 0 = the new token) into the pinned host
        buffer without waiting; returns the event that marks the copy done (None on the CPU)."""
        # gathered contiguous on the device first: a non-blocking copy into a non-contiguous host
        # view would go through a host temporary
        src = self._capture[:, :b, :, 0].transpose(0, 1).contiguous()  # [b, L, Hq, D]
        self._capture_h[:b].copy_(src, non_blocking=self._capture.device.type == "cuda")
        if self._capture.device.type != "cuda":
            return None
        ev = torch.cuda.Event()
        ev.record(torch.cuda.current_stream(self._capture.device))
        return ev

    def _prefill_chunk(self, req: _Request) -> list[tuple[str, int]]:
        t0 = time.perf_counter()
        rid = req.rid
        lo, hi = req.bounds[req.chunk], req.bounds[req.chunk + 1]
        t = hi - lo
        tr = StepTransfer()
        L = self.shape.num_layers
        if req.chunk == 0 and self.prefill_cache is not None:
            key = PrefillCache.key(req.prompt, req.bounds, self.kv.layout.dtype)
            req.replay = self.prefill_cache.lookup(key)
            req.recording = [] if req.replay is None else None
        self.kv.plan_step([rid], [t], [[None] for _ in range(L)], tr)
        self._guard_host_mirrors()
        self._ids_h[0, :t] = torch.tensor(req.prompt[lo:hi], dtype=torch.long)
        self._ids[:1, :t].copy_(self._ids_h[:1, :t], non_blocking=self._ids.device.type == "cuda")
        self._write_slots([rid], [lo], t)
        ctx = self._context([rid], t, [hi], [None] * L)
        self.kv.mark_forward_start()
        if req.replay is not None:
            logits = self._replay_chunk(ctx, req.replay.kv[req.chunk], req.replay.logits)
        else:
            ctx.record = [] if req.recording is not None else None
            logits = self.backend.forward(self._ids[:1, :t], self._pos[:1, :t], ctx)
            if req.recording is not None:
                # a policy that selected blocks made this prefill its own: not a recording for others
                usable = not ctx.selected_in_step and len(ctx.record) == L
                if usable:
                    req.recording.append(tuple(ctx.record))
                else:
                    req.recording = None
        self.kv.issue_deferred(tr)
        self.kv.write_back([rid], tr)
        held = self._held()
        req.chunk += 1
        emitted: list[tuple[str, int]] = []
        if hi == len(req.prompt):
            queries = self._prefill_queries(req, t, logits)
            self._check_guard(f"prefill of request {rid!r}")  # the copy in _prefill_queries synchronised
            view = RequestView(rid=rid, prompt_len=len(req.prompt), seq_len=len(req.prompt),
                               new_len=len(req.prompt), step=0)
            self.policy.on_prefill_end(view, self._policy_window(queries))
            self._prefilling = None
            self._running.append(rid)
            token = self._sample(logits[0], req)
            req.ttft = time.perf_counter() - req.t_start
            self.metrics.ttft[rid] = req.ttft
            emitted.append((rid, token))
            self._emit(req, token)
        self._record("prefill", 1, t, t0, tr, held)
        return emitted

    def _replay_chunk(self, ctx: StepContext, kv: tuple, logits: torch.Tensor) -> torch.Tensor:
        """A recorded prefill chunk in place of the forward: every layer's K/V appended through the
        step's own path (pool slots, the policy's ``on_append``); returns the recorded logits."""
        for layer, (k, v) in enumerate(kv):
            ctx.wait_for_loads(layer)
            ctx.append_kv(layer, k, v)
        return logits

    def _policy_window(self, queries: list[torch.Tensor]) -> list[torch.Tensor]:
        """The last ``policy.query_window`` (at least one) of the captured prompt queries ``[Hq, w, D]``
        per layer: what ``on_prefill_end`` gets when the capture is wider (a prefill cache's window)."""
        return [q[:, q.shape[1] - min(self._policy_width, q.shape[1]):] for q in queries]

    def _prefill_queries(self, req: _Request, t: int, logits: torch.Tensor) -> list[torch.Tensor]:
        """Per layer ``[Hq, w, D]``: the queries of the prompt's last ``w = min(capture width, t)`` tokens
        (recorded, or captured by the forward just run: a blocking copy); a recording being made is
        completed and stored here."""
        if req.replay is not None:
            queries = list(req.replay.queries)
            req.replay = None
            return queries
        w = min(self._capture_width, t)
        queries = [q[0, :, :w] for q in self._queries(1, False)]
        if req.recording is not None:
            rec = PrefillRecording(kv=tuple(req.recording), queries=tuple(q.clone() for q in queries),
                                   logits=logits.detach().clone())
            self.prefill_cache.store(PrefillCache.key(req.prompt, req.bounds, self.kv.layout.dtype), rec)
            req.recording = None
        return queries

    def _decode(self) -> list[tuple[str, int]]:
        """One decode step: the plan (made now, or ahead during the last step), the forward, then —
        while the forward runs on the device — the next step's plan where :meth:`_plan_ahead_rows`
        allows it, and only then the wait for this step's tokens (module docstring)."""
        t0 = time.perf_counter()
        plan, self._ahead = self._ahead, None
        plan_seconds = 0.0
        if plan is None:
            plan = self._make_plan(self._decode_views(list(self._running)))
            plan_seconds = plan.seconds
        rows, views, tr = plan.rows, plan.views, plan.transfer
        b = len(rows)
        reqs = [self._requests[rid] for rid in rows]
        live = [row for row, req in enumerate(reqs) if req.finish_reason is None]  # the rest stopped last step
        self._guard_host_mirrors()
        self._ids_h[:b, 0] = torch.tensor([req.out[-1] for req in reqs], dtype=torch.long)
        self._ids[:b, :1].copy_(self._ids_h[:b, :1], non_blocking=self._ids.device.type == "cuda")
        self._mark_uploads_done()
        t_plan = time.perf_counter()
        self.kv.mark_forward_start()
        logits = self._decode_forward(b, plan.widths, plan.context)
        t_forward = time.perf_counter()
        self.kv.issue_deferred(tr)  # overlapped loads run beside the forward just enqueued
        self.kv.write_back([rows[row] for row in live], tr)
        held = self._held()
        t_after0 = time.perf_counter()
        self._run_deferred_after_step()  # the last step's, beside this forward (before its queries are copied)
        t_copies = time.perf_counter()
        after_seconds = t_copies - t_after0
        query_copy = self._start_query_copy(b) if self._host_queries else None
        greedy = all(req.params.temperature == 0 for req in reqs)
        output = self._start_output_copy(logits.argmax(-1) if greedy else logits.float())
        enqueue_seconds = (t_after0 - t_forward) + (time.perf_counter() - t_copies)
        live_views = [views[row] for row in live]
        ahead_seconds = 0.0
        next_rows = self._plan_ahead_rows(rows, live)
        if next_rows:
            # the next step's plan while this forward runs: the retrievals due after this step are
            # collected first (they need none of its queries), then the plan sees them as it would
            # after the sync; the tokens stay those of the serial order
            t_ahead = time.perf_counter()
            self.policy.collect(live_views)
            by_rid = dict(zip(rows, views, strict=True))
            self._ahead = self._make_plan([self._next_view(by_rid[rid]) for rid in next_rows])
            ahead_seconds = time.perf_counter() - t_ahead
        t_sync = time.perf_counter()
        out = self._finish_output_copy(output, "decode step")  # waits for this step's forward
        t_after = time.perf_counter()
        if next_rows is None:
            self.policy.collect(live_views)
        # planned ahead, the next step surely runs: this step's after_step (retrieval submissions) waits
        # for it and runs beside its forward, for the rows that go on (see _run_deferred_after_step)
        defer = next_rows is not None and self._host_queries and self.config.defer_after_step
        if self._host_queries and live and not defer:
            if query_copy is not None:
                query_copy.synchronize()  # normally done: the output copy above waited for the step
            self._after_step(live, live_views)
        t_done = time.perf_counter()
        emitted = []
        for row in live:
            req = reqs[row]
            token = out[row] if greedy else self._sample(out[row], req)
            req.step += 1
            emitted.append((req.rid, token))
            self._emit(req, token)
        for row in range(b):  # rows that stopped at the last step rode along (planned ahead): free them now
            if row not in live:
                self._release(rows[row])
        if self._ahead is not None and all(self._requests[rid].finish_reason is not None for rid in self._ahead.rows):
            self._drop_ahead()  # every row of the plan made ahead stopped on a stop token at this step
        if defer and self._ahead is not None:
            going = [row for row in live if reqs[row].finish_reason is None]
            self._after = (going, [views[row] for row in going], query_copy)
        self._record("decode", b, len(live), t0, tr, held, plan_seconds, forward_seconds=t_forward - t_plan,
                     sync_seconds=t_after - t_sync, after_step_seconds=after_seconds + t_done - t_after,
                     plan_ahead_seconds=ahead_seconds, launch_seconds=t_plan - t0 - plan_seconds,
                     enqueue_seconds=enqueue_seconds, emit_seconds=time.perf_counter() - t_done)
        return emitted

    def _after_step(self, rows: list[int], views: list[RequestView]) -> None:
        """``Policy.after_step`` of the step whose queries the host buffer holds, for its ``rows``."""
        queries = self._capture_h[: len(rows)] if rows == list(range(len(rows))) else self._capture_h[torch.tensor(rows)]
        self.policy.after_step(views, queries.transpose(0, 1))  # [L, B', Hq, D]: per layer [B', Hq, D]

    def _run_deferred_after_step(self) -> None:
        """The last step's ``after_step``, deferred when the step was planned ahead: it runs once this
        step's forward is enqueued (the GPU computes while the host submits retrievals) and before this
        step's queries are copied into the host buffer it reads. Only the rows that went on get it (a
        row that finished at that step needs no retrieval); what it submits is collected at the same
        later step as in the serial order (``collect`` follows it), so the tokens do not change."""
        if self._after is None:
            return
        rows, views, query_copy = self._after
        self._after = None
        if not rows:
            return
        if query_copy is not None:
            query_copy.synchronize()  # long done: the last step's output copy came after it
        self._after_step(rows, views)

    def _decode_views(self, rows: list[str]) -> list[RequestView]:
        views = []
        for rid in rows:
            req = self._requests[rid]
            n = self.kv.seq_len(rid)
            views.append(RequestView(rid=rid, prompt_len=len(req.prompt), seq_len=n, new_len=n + 1,
                                     step=req.step + 1))
        return views

    @staticmethod
    def _next_view(v: RequestView) -> RequestView:
        """The view of the decode step after ``v``'s."""
        return RequestView(rid=v.rid, prompt_len=v.prompt_len, seq_len=v.new_len, new_len=v.new_len + 1,
                           step=v.step + 1)

    def _plan_ahead_rows(self, rows: list[str], live: list[int]) -> list[str] | None:
        """The rows of the next decode step when its plan can be made now, during this step's forward
        (``RuntimeConfig.plan_ahead``), else None. It can when the next step is surely a decode step
        of these rows: none is waiting to be admitted into a free row (the next step would be a
        prefill), the policy can collect the retrievals due after this step without its queries
        (``Policy.collects_ahead``), and a row leaves only by a length limit, which is known now.
        A row that stops on a stop token at this step is known only after the sync: it rides along
        in the next step (its output dropped) and is freed after it."""
        if not self.config.plan_ahead or not self.policy.collects_ahead():
            return None
        nxt = [rows[row] for row in live if not self._ends_by_length(self._requests[rows[row]], 1)]
        if not nxt or (self._waiting and len(nxt) < self.config.max_batch):
            return None
        return nxt

    def _make_plan(self, views: list[RequestView]) -> _DecodePlan:
        """A decode step's plan for ``views`` (host work only, its uploads enqueued on the compute
        stream): policy selections, block arrays, ``KVManager.plan_step`` (working sets, evictions,
        loads), the overlapped schedule's selections, selection / slot / position uploads. The
        input ids are written when the step runs (they are the last step's tokens)."""
        t0 = time.perf_counter()
        rows = [v.rid for v in views]
        self._planning_rows = rows
        b = len(rows)
        L, H = self.shape.num_layers, self.shape.num_kv_heads
        bs = self.sparse.block_size
        sels = self.policy.plan(views)
        if len(sels) != L or any(len(s) != b for s in sels):
            raise RuntimeError(f"policy {self.policy.name!r} returned selections of the wrong shape")
        needed = self._block_arrays(self._needed_cache, rows, sels)
        prefetch = None
        if self.config.early_prefetch and self.policy.offload:
            coming = self.policy.prefetch(views)
            if coming is not None:
                prefetch = self._block_arrays(self._prefetch_cache, rows, coming)
        tr = StepTransfer()
        stale = self.kv.plan_step(rows, [1] * b, needed, tr, prefetch=prefetch)
        new_lens = [v.new_len for v in views]
        if self.kv.overlap:
            sels = self._attend_selections(rows, sels, stale, new_lens)
        self._guard_host_mirrors()
        selections, widths = self._write_selections(sels, new_lens, bs, b, H)
        self._write_slots(rows, [v.seq_len for v in views], 1)
        ctx = self._context(rows, 1, new_lens, selections)
        return _DecodePlan(rows=rows, views=views, transfer=tr, widths=widths, context=ctx,
                           seconds=time.perf_counter() - t0)

    def _drop_ahead(self) -> None:
        """Drop the plan made ahead (none of its rows is left to run): its deferred loads are not
        issued, its rows (stopped ones waiting to be freed) are freed."""
        plan, self._ahead = self._ahead, None
        self.kv.drop_deferred()
        for ev in plan.context.layer_waits:  # the plan marked its loads' copies waited for: wait for them
            if ev is not None:
                self.kv.wait_on(ev)
        for rid in plan.rows:
            if rid in self._unreleased:
                self._release(rid)

    def _start_output_copy(self, x: torch.Tensor):
        """Start copying the step's output (token ids, or logits when sampling) and the index guard's
        flag to the host without waiting: one non-blocking copy into a pinned buffer on CUDA (the
        output itself elsewhere). Returns what :meth:`_finish_output_copy` takes."""
        if x.device.type != "cuda":
            return x, None
        flat = x.reshape(-1)
        if self.guard is not None:
            flat = torch.cat([flat, self.guard.flag.reshape(-1).to(flat.dtype)])
        buf = self._output_h
        if buf is None or buf.dtype != flat.dtype or buf.numel() != flat.numel():
            buf = self._output_h = torch.empty(flat.numel(), dtype=flat.dtype, pin_memory=True)
        buf.copy_(flat, non_blocking=True)  # one buffer: a step's copy is read before the next one starts
        ev = torch.cuda.Event()
        ev.record(torch.cuda.current_stream(x.device))
        return (buf, tuple(x.shape)), ev

    def _finish_output_copy(self, started, where: str):
        """Wait for :meth:`_start_output_copy`'s copy; check the guard's flag; the token ids (a list)
        or the logits (a host tensor ``[B, V]``)."""
        payload, ev = started
        if ev is None:
            self._check_guard(where)
            x = payload
        else:
            buf, shape = payload
            ev.synchronize()
            n = int(np.prod(shape))
            if self.guard is not None:
                self._raise_flag(int(buf[n].item()), where)
            x = buf[:n].view(shape)
            if x.is_floating_point():
                x = x.clone()  # the buffer is the next step's
        return x if x.is_floating_point() else x.tolist()

    def _attend_selections(self, rows: list[str], sels, stale: list[list[bool]], new_lens: list[int]):
        """Overlapped schedule: the selections attention reads this step. Where the plan left a
        (layer, row) stale (its new blocks load beside this step), the selection that row attended
        at the last decode step, extended with the blocks opened since; elsewhere the policy's."""
        bs = self.sparse.block_size
        out = sels
        if any(any(layer) for layer in stale):
            if self._attended is None:
                raise RuntimeError("overlapped schedule: a stale selection before any decode step (internal)")
            prev_rows, prev_sels, prev_lens = self._attended
            out = [list(per_row) for per_row in sels]
            for layer, flags in enumerate(stale):
                for row, is_stale in enumerate(flags):
                    if not is_stale:
                        continue
                    p = prev_rows.get(rows[row])
                    old = None if p is None else prev_sels[layer][p]
                    if old is None:
                        raise RuntimeError(
                            f"overlapped schedule: request {rows[row]!r} layer {layer} has no selection from its "
                            "last decode step to attend while its new blocks load (internal invariant broken)"
                        )
                    nb_old, nb_new = -(-prev_lens[p] // bs), -(-new_lens[row] // bs)
                    out[layer][row] = extend_selection(old, nb_old, nb_new) if nb_new > nb_old else old
        self._attended = ({rid: row for row, rid in enumerate(rows)}, out, list(new_lens))
        return out

    def _check_guard(self, where: str) -> None:
        """Read the index guard where the host has just synchronised anyway."""
        if self.guard is not None:
            self._raise_flag(self.guard.value(), where)

    def _raise_flag(self, code: int, where: str) -> None:
        if code:
            from ucm_trt.kernels.guard import IndexOutOfRangeError

            what = self.guard.codes.get(code, f"error code {code}")
            self.guard.reset()
            raise IndexOutOfRangeError(
                f"{where}: a kernel met an out-of-range block id ({what}); it was skipped on the device, so no "
                "memory outside the pools was read or written, but the step's result is invalid"
            )

    def _guard_host_mirrors(self) -> None:
        """Before the host writes the pinned mirrors (ids, positions, slots, selections) of a step,
        wait until the last step's uploads from them ran (CUDA; normally long done — in decode the
        token copy already waited — but a non-final prefill chunk has no other sync)."""
        if self._uploads_done is not None:
            self._uploads_done.synchronize()
            self._uploads_done = None

    def _mark_uploads_done(self) -> None:
        if self._ids.device.type == "cuda":
            self._uploads_done = torch.cuda.Event()
            self._uploads_done.record(torch.cuda.current_stream(self._ids.device))

    @staticmethod
    def _block_arrays(caches: dict, rows: list[str], sels) -> list[list[np.ndarray | None]]:
        """Per layer, per row: the blocks of a selection (int64, unique, ascending), or None (every
        block). The same array object comes back while the policy hands back the same tensor (between
        retrievals; a policy never writes a selection it handed out, see ``Policy.plan``), which lets
        the working-set update skip the layer; the cache holds the tensor, so its id is not reused.
        The (row, layer) selections that changed are converted together (:func:`_selection_blocks`)."""
        out: list[list[np.ndarray | None]] = [[None] * len(rows) for _ in sels]
        miss: list[tuple[int, int, torch.Tensor]] = []
        for row, rid in enumerate(rows):
            cache = caches.setdefault(rid, {})
            for layer, per_row in enumerate(sels):
                sel = per_row[row]
                if sel is None:
                    continue
                hit = cache.get(layer)
                if hit is None or hit[0] is not sel:
                    miss.append((layer, row, sel))
                else:
                    out[layer][row] = hit[1]
        if miss:
            arrays = _selection_blocks([sel for _, _, sel in miss])
            for (layer, row, sel), arr in zip(miss, arrays, strict=True):
                caches[rows[row]][layer] = (sel, arr)
                out[layer][row] = arr
        return out

    def _decode_forward(self, b: int, widths: tuple, ctx: StepContext) -> torch.Tensor:
        ids, pos = self._ids[:b, :1], self._pos[:b, :1]
        key = self.policy.graph_key() if self._graphs is not None else None
        if key is None:
            if self.config.cuda_graph is True:
                raise RuntimeError(
                    f"RuntimeConfig.cuda_graph=True, but the {self.policy.name} policy cannot run this decode step "
                    "in a CUDA graph (its graph_key() is None); use cuda_graph=None (auto) or False"
                )
            self._eager_decode_steps += 1
            return self.backend.forward(ids, pos, ctx)
        return self._graphs.run((b, widths, key), ids, pos, ctx)

    def _write_selections(self, sels, new_lens: list[int], bs: int, b: int, h: int):
        """Write the plan's selections into the host mirror and copy them to the device in one go.

        Returns the per-layer device views (``None`` = every block) and their widths; a width is
        rounded up to a multiple of ``SELECTION_WIDTH_BUCKET`` blocks (``-1`` padding, which the
        kernels skip), so steps of a growing sequence share kernel specialisations and CUDA graphs.
        Only the (layer, row) entries whose selection changed since the last step are rewritten and
        checked, all of one shape in one indexed write (not a write per row).
        """
        # a selection is keyed by its identity: a policy never writes one it handed out (Policy.plan)
        key = (b, tuple(tuple(id(x) if x is not None else -(-n // bs) for x, n in zip(per_row, new_lens, strict=True))
                        if any(x is not None for x in per_row) else None for per_row in sels))
        if self._sel_last is not None and key == self._sel_last[0]:
            return self._sel_last[2]  # the same selections as the last step: the device buffer holds them
        nbs = [-(-n // bs) for n in new_lens]
        same_b = self._sel_last is not None and self._sel_last[0][0] == b
        prev = self._sel_last[0] if same_b else None
        prev_out = self._sel_last[2][1] if same_b else None
        out: list[int | None] = []
        writes: list[tuple[int, int]] = []  # (layer, row) entries whose mirror changes
        for layer, per_row in enumerate(sels):
            lkey = key[1][layer]
            if lkey is None:
                out.append(None)
                continue
            pkey = None if prev is None else prev[1][layer]
            if pkey == lkey:  # the layer's selections are those of the last step: checked, width known
                out.append(prev_out[layer])
                continue
            # the rows whose selection changed are rewritten and shape-checked; the others keep
            # their mirror (checked when written)
            rows = range(b) if pkey is None else [r for r in range(b) if lkey[r] != pkey[r]]
            bad = [r for r in rows if per_row[r] is not None and (per_row[r].dim() != 2 or per_row[r].shape[0] != h)]
            if bad:
                raise RuntimeError(
                    f"policy {self.policy.name!r}: layer {layer} row {bad[0]} selection must be [Hkv={h}, S], "
                    f"got shape {tuple(per_row[bad[0]].shape)}"
                )
            width = max(1, *[nbs[r] if x is None else x.shape[1] for r, x in enumerate(per_row)])
            writes += [(layer, r) for r in rows]
            out.append(min(self._sel.shape[-1], -(-width // SELECTION_WIDTH_BUCKET) * SELECTION_WIDTH_BUCKET))
        if writes:
            self._write_mirror(sels, writes, new_lens, bs)
            self._check_selections(writes, new_lens)
            w = max(x for x in out if x is not None)  # the kernels read [:b, :, :width] of each layer
            self._sel[:, :b, :, :w].copy_(self._sel_h[:, :b, :, :w], non_blocking=self._sel.device.type == "cuda")
        views = [None if w is None else self._sel[layer, :b, :, :w] for layer, w in enumerate(out)]
        # the keyed tensors are kept alive so their ids cannot be reused by new tensors
        self._sel_last = (key, [x for per_row in sels for x in per_row], (views, tuple(out)))
        return self._sel_last[2]

    def _write_mirror(self, sels, writes: list[tuple[int, int]], new_lens: list[int], bs: int) -> None:
        """Rewrite the mirror entries ``writes`` (layer, row): the selections of one width ``[Hkv, n]``
        in one indexed write, ``-1`` beyond ``n`` up to what the entry held before
        (``self._sel_hw``: the mirror is ``-1`` past it); ``None`` = every block of the row."""
        sh, hw = self._sel_h, self._sel_hw
        vals_all = [sels[layer][row] for layer, row in writes]
        for (layer, row), x in zip(writes, vals_all, strict=True):
            if x is None:
                nb = -(-new_lens[row] // bs)
                sh[layer, row, :, :nb] = self._arange[:nb]
                if hw[layer, row] > nb:
                    sh[layer, row, :, nb : hw[layer, row]] = -1
                hw[layer, row] = nb
        pl = np.array(writes, dtype=np.int64).reshape(-1, 2)
        widths = np.array([-1 if x is None else x.shape[1] for x in vals_all], dtype=np.int64)
        for n in np.unique(widths[widths >= 0]).tolist():
            idx = np.flatnonzero(widths == n)
            li, ri = pl[idx, 0], pl[idx, 1]
            vals = torch.stack([vals_all[i] for i in idx.tolist()]).to(torch.int32)  # [P, Hkv, n]
            old = int(hw[li, ri].max())
            if old > n:  # clear what wider selections left there
                vals = torch.cat([vals, vals.new_full((*vals.shape[:2], old - n), -1)], dim=-1)
            # one flat index over (layer, row): numpy's single-index write is ~20x faster here than
            # torch's two-index index_put (measured on the CPU mirror)
            flat = sh.numpy().reshape(-1, *sh.shape[2:])
            flat[li * sh.shape[1] + ri, :, : vals.shape[-1]] = vals.numpy()
            hw[li, ri] = n

    def _check_selections(self, writes: list[tuple[int, int]], new_lens: list[int]) -> None:
        """The index checks of the kernels, on the host where the step's selections are built (once
        per change, numpy over the host mirror, every written entry at once; the launches then run
        without a sync): every written (layer, row) holds logical block ids in ``[0, blocks of its
        sequence)``, sorted strictly ascending, then ``-1`` padding, and each selected block is
        resident in that layer's block table (not the null block). The entries not written this
        step were checked when they were written and are unchanged.

        An entry whose KV heads all hold the same row (a shared selection) is checked once, not once
        per head; only when a check fails is every head examined, to name the first bad one."""
        bs = self.sparse.block_size
        nb_all = np.array([-(-n // bs) for n in new_lens], dtype=np.int64)
        li = np.fromiter((p[0] for p in writes), dtype=np.int64, count=len(writes))
        ri = np.fromiter((p[1] for p in writes), dtype=np.int64, count=len(writes))
        w = max(1, int(self._sel_hw[li, ri].max()))  # the mirror is -1 past every entry's width
        sh = self._sel_h
        x = sh.numpy().reshape(-1, *sh.shape[2:])[li * sh.shape[1] + ri, :, :w]  # [P, H, w] int32
        h = x.shape[1]
        shared = (x == x[:, :1]).all(axis=(1, 2))
        if shared.all():
            rows, pair = x[:, 0], np.arange(len(writes))
        else:
            own = np.flatnonzero(~shared)
            rows = np.concatenate([x[shared, 0], x[own].reshape(-1, w)])
            pair = np.concatenate([np.flatnonzero(shared), np.repeat(own, h)])
        bad, not_resident = self._selection_faults(rows, nb_all[ri[pair]][:, None], li[pair], ri[pair])
        if bad.any() or not_resident.any():
            self._raise_selection_error(x, li, ri, nb_all)

    def _selection_faults(self, x: np.ndarray, nb: np.ndarray, li: np.ndarray, ri: np.ndarray):
        """Per entry of ``x`` ``[..., w]`` (selection rows of layers ``li``, rows ``ri``, ``nb`` blocks;
        ``li``/``ri``/``nb`` broadcast against ``x[..., 0]``): which ids break the range / order /
        padding rule (``bad``) and which valid ids are not resident in the block table."""
        w = x.shape[-1]
        valid = x >= 0
        nv = valid.sum(-1, keepdims=True)
        bad = (x < -1) | (valid != (np.arange(w) < nv)) | (valid & (x >= nb))
        bad[..., 1:] |= valid[..., 1:] & (x[..., 1:] <= x[..., :-1])
        ok = valid & ~bad
        tables = self.kv.tables_host.numpy()  # [L, max_batch, max_blocks]; one flat gather (3 index arrays cost more)
        at = (li[..., None] * tables.shape[1] + ri[..., None]) * tables.shape[2] + np.where(ok, x, 0)
        return bad, ok & (tables.reshape(-1)[at] == 0)

    def _raise_selection_error(self, x: np.ndarray, li: np.ndarray, ri: np.ndarray, nb_all: np.ndarray) -> None:
        """The ValueError naming the first bad (entry, head) of ``x`` ``[P, H, w]`` in (entry, head) order."""
        bad, not_resident = self._selection_faults(x, nb_all[ri][:, None, None], li[:, None], ri[:, None])
        i, head, _ = (int(j[0]) for j in np.nonzero(bad | not_resident))
        layer, row = int(li[i]), int(ri[i])
        ids = x[i, head][x[i, head] != -1].tolist()
        rule = (f"must hold logical block ids in [0, {int(nb_all[row])}) sorted strictly ascending, "
                "then -1 padding" if bad[i, head].any() else
                "is not resident in the layer's block table (internal: the plan must load every selected block)")
        rows = self._planning_rows
        rid = rows[row] if row < len(rows) else "?"
        raise ValueError(
            f"policy {self.policy.name!r}: layer {layer} row {row} ({rid}) head {head} selection "
            f"{ids[:16]}{' ...' if len(ids) > 16 else ''} {rule}"
        )

    # ================================================================== sampling / finishing
    def _sample(self, logits: torch.Tensor, req: _Request) -> int:
        p = req.params
        x = logits.float().cpu()
        if p.temperature == 0:
            return int(torch.argmax(x))
        probs = torch.softmax(x / p.temperature, dim=-1)
        if p.top_p < 1.0:
            srt, idx = torch.sort(probs, descending=True)
            keep = (torch.cumsum(srt, 0) - srt) < p.top_p
            keep[0] = True
            probs = torch.zeros_like(probs).scatter_(0, idx[keep], srt[keep])
            probs = probs / probs.sum()
        return int(torch.multinomial(probs, 1, generator=req.generator))

    def _emit(self, req: _Request, token: int) -> None:
        req.out.append(token)
        if req.callback is not None:
            req.callback(req.rid, token)
        if token in req.params.stop_token_ids:
            req.finish_reason = "stop"
        elif self._ends_by_length(req, 0):
            req.finish_reason = "length"
        if req.finish_reason is not None:
            self._finish(req.rid)

    def _ends_by_length(self, req: _Request, more: int) -> bool:
        """Whether ``req`` reaches a length limit once ``more`` further tokens are emitted."""
        n = len(req.out) + more
        return n >= req.params.max_new_tokens or len(req.prompt) + n >= self.config.max_seq_len

    def _finish(self, rid: str) -> None:
        """A request finished: it leaves the running rows; its blocks and policy state are freed now,
        or — when the plan made ahead for the next step holds it (it stopped on a stop token) —
        after that step, which reads them."""
        if rid in self._running:
            self._running.remove(rid)
        if self._ahead is not None and rid in self._ahead.rows:
            self._unreleased.add(rid)
            return
        self._release(rid)

    def _release(self, rid: str) -> None:
        self._unreleased.discard(rid)
        self._needed_cache.pop(rid, None)
        self._prefetch_cache.pop(rid, None)
        try:
            self.policy.on_request_end(rid)
        finally:
            self.kv.free_request(rid)

    def result(self, rid: str) -> GenerationResult:
        req = self._requests[rid]
        if req.finish_reason is None:
            raise ValueError(f"request {rid!r} has not finished")
        return GenerationResult(request_id=rid, prompt_tokens=len(req.prompt), token_ids=list(req.out),
                                finish_reason=req.finish_reason, ttft_seconds=req.ttft)

    def abort_all(self) -> None:
        """Drop every request and return all its blocks (used after an error)."""
        self._ahead = None
        self._after = None
        for rid in list(self._requests):
            req = self._requests[rid]
            if (req.finish_reason is None or rid in self._unreleased) and rid in self.kv.seqs:
                try:
                    self.policy.on_request_end(rid)
                except Exception:  # noqa: BLE001 - the original error is being raised already
                    pass
                self.kv.free_request(rid)
            if req.finish_reason is None:
                req.finish_reason = "aborted"
        self._unreleased.clear()
        self._waiting.clear()
        self._running.clear()
        self._prefilling = None
        self._needed_cache.clear()
        self._prefetch_cache.clear()
        self._attended = None
        self.kv.synchronize()  # an error may have left copies in flight or loads not issued

    def generate(
        self,
        prompts: Sequence[Sequence[int]] | Sequence[int],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        on_token: TokenCallback | None = None,
    ) -> list[GenerationResult]:
        """Generate for one prompt (a list of ids) or several (a list of lists); blocks until done."""
        if len(prompts) and isinstance(prompts[0], int):
            prompts = [prompts]  # type: ignore[list-item]
        if params is None or isinstance(params, SamplingParams):
            params = [params] * len(prompts)  # type: ignore[list-item]
        if len(params) != len(prompts):
            raise ValueError(f"params has {len(params)} entries for {len(prompts)} prompts")
        rids = [self.add_request(p, sp, on_token=on_token) for p, sp in zip(prompts, params, strict=True)]
        try:
            while any(self._requests[r].finish_reason is None for r in rids):
                self.step()
        except BaseException:
            self.abort_all()
            raise
        return [self.result(r) for r in rids]

    # ================================================================== stats / teardown
    def stats(self) -> dict:
        out = {
            "algorithm": self.policy.name,
            "attention": self.backend.attention_name(),
            "device": str(self.backend.device),
            "block_size": self.sparse.block_size,
            "block_bytes_per_layer": self.kv.block_bytes,
            "offload": self.policy.offload,
            "load_method": self.kv.load_method,
        }
        out.update(self.metrics.summary())
        out.update(self.worker.stats())
        out["cuda_graph"] = self._graphs is not None
        if self._graphs is not None:
            out.update(self._graphs.stats())
        out["eager_decode_steps"] = self._eager_decode_steps
        out["policy"] = self.policy.stats()
        return out

    def close(self) -> None:
        self.abort_all()
        self.worker.shutdown()
        self._closed = True

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
