"""Runtime sizing: everything the runtime allocates once, at construction (plan/run style)."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["RuntimeConfig"]


def _pos_int(name: str, value: object, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"RuntimeConfig.{name} must be an int, got {value!r} ({type(value).__name__})")
    if value < minimum:
        raise ValueError(f"RuntimeConfig.{name} must be >= {minimum}, got {value}")


@dataclass(frozen=True, kw_only=True)
class RuntimeConfig:
    """Maximum sizes of the generation runtime; buffers are allocated at these sizes once.

    Attributes
    ----------
    max_batch:
        Requests decoded together in one step (rows of every per-step buffer).
    max_seq_len:
        Longest sequence (prompt + generated tokens); sets the block-table width.
    prefill_chunk:
        Prompt tokens per prefill step (chunked prefill); longer prompts take several steps.
    num_device_blocks:
        Blocks per layer in the device KV pool, including the null block. ``None``: enough for
        ``max_batch`` sequences of ``max_seq_len`` (no offload needed). With an offload policy a
        smaller pool holds only the working sets (plus one prompt being prefilled).
    num_host_blocks:
        Blocks in the host block store (offload policies). ``None``: ``max_batch`` full sequences.
    cache_blocks:
        Unneeded blocks each (request, layer) working set keeps as LRU cache (offload policies).
    retrieval_threads:
        Threads of the CPU retrieval worker.
    retrieval_intra_op_threads:
        torch intra-op threads of each retrieval worker thread; ``None`` (default): the creating
        thread's count / ``retrieval_threads``, at least 1 (:class:`~ucm_trt.runtime.worker.RetrievalWorker`).
        Use 1 on a machine whose cores other processes share: OpenMP waits on threads pushed off
        their cores (on a loaded 2-core box 2 threads made KVStar's vote 1.9x slower than 1).
    cuda_graph:
        Capture decode steps in CUDA graphs and replay them (:mod:`ucm_trt.runtime.cuda_graph`).
        ``None`` (default): on backends that support it (PyTorch on CUDA), for every step whose
        policy allows it (``Policy.graph_key() is not None``); ``True``: required (an error when the
        backend or a step's policy does not allow it); ``False``: never. ``Engine.stats()`` reports the steps replayed.
    early_prefetch:
        Offload policies: load the blocks of a retrieval that has finished but is not due yet
        (``Policy.prefetch``) during the steps before it is due, on the side stream, into free
        pool blocks, so the step that switches to it finds them resident. Attention and the
        retrieval schedule are unchanged. Counted in the loads of the step that issues them.
        Off by default: on an H200 it left ESA's mean step unchanged and made its typical step
        slower (the copy kernel shares the SMs with the step it overlaps), GSA 5 % faster. With
        ``overlap_loads``, blocks that arrived early let a new selection become visible at its
        scheduled step instead of one step late; whether they arrived depends on when the
        retrieval thread finished, so with both on the tokens are not reproducible run to run.
    overlap_loads:
        Offload policies: the overlapped (stale-by-one) schedule. When a new selection needs
        blocks that are not resident, the step attends with the layer's previous selection
        (extended with the blocks opened since; the new token's block and the local window are
        always in it) while the new blocks load on the side stream beside it; the new selection
        is visible from the next step, whose compute waits for exactly those copies' events. A
        retrieval thus takes effect one step later than its schedule says (upstream UCM's stride
        allows that). ``False``: the step that needs new blocks waits for them (the synchronous
        schedule). See :mod:`ucm_trt.runtime.kv` for the event discipline.
    load_method:
        How loads move host -> device on CUDA: ``"kernel"`` (one ``copy_blocks`` launch per layer
        reading the pinned store over the bus: SMs), ``"staged"`` (CPU gather into pinned
        staging, one DMA copy per chunk on a copy engine, one device scatter) or ``"batch_dma"``
        (every block of a layer in one ``cuMemcpyBatchAsync`` driver call: copy engines, also for
        write-backs; needs a CUDA 12.8+ driver); ``"auto"`` (default): ``"batch_dma"`` where the
        driver has it, else ``"kernel"`` (``Engine.stats()["load_method"]`` says which ran); see
        :func:`ucm_trt.runtime.kv.resolve_load_method`. ``benchmarks/bench_block_copy.py`` measures
        them (H100: batched DMA 44.9 GB/s slowing the attention beside it 1.08x; the kernel 29.4 GB/s, 1.73x).
    plan_ahead:
        Make the next decode step's plan (policy plan, working sets, evictions, loads, uploads) while
        this step's forward runs on the device, before waiting for its tokens (vLLM's / SGLang's
        "overlap scheduling"), instead of after. The tokens are those of the serial order: the plan
        needs nothing of the step's output but its stop decisions and the retrievals due after it,
        which the policy collects first (``Policy.collect``). It is made only when the next step is
        surely a decode step of the same rows minus those that reach a length limit (no request
        waits for a free row, ``Policy.collects_ahead()``); a row that stops on a stop token rides
        along in that step, its output dropped, and is freed after it. ``StepRecord.plan_ahead_seconds``
        times it. ``False``: the serial order (plan, forward, wait, retrieval hand-off).
    defer_after_step:
        With ``plan_ahead``: a step planned ahead runs its ``Policy.after_step`` (retrieval
        submissions) once the next step's forward is enqueued, beside it, instead of right after its
        own tokens. It hides the submission behind the GPU but gives each retrieval about one step
        less to finish before it is collected. On by default: on the H100 (8B shape, 34 GiB budget,
        2026-12-07) ESA decoded 751.9 tok/s with it vs 532.3 without at 32K batch 27, and 257.8 vs
        224.3 at 128K batch 6 (``benchmarks/results/runtime/capacity_*_s10_ab_*.json``); it lost
        only while the benchmark's synthetic query draws still ran on the main thread.
    time_loads:
        Time the loads and the compute stream's waits for them with CUDA events (a few event
        records per step that loads): ``Engine.stats()`` then reports ``load_gpu_ms_total``,
        ``load_wait_ms_total`` and ``load_hidden_fraction``.
    max_cuda_graphs:
        Captured decode graphs kept per engine (one per batch size x selection-width bucket x
        policy key; least recently used dropped first).
    """

    max_batch: int = 4
    max_seq_len: int = 8192
    prefill_chunk: int = 512
    num_device_blocks: int | None = None
    num_host_blocks: int | None = None
    cache_blocks: int = 2
    retrieval_threads: int = 2
    retrieval_intra_op_threads: int | None = None
    cuda_graph: bool | None = None
    max_cuda_graphs: int = 32
    early_prefetch: bool = False
    overlap_loads: bool = True
    load_method: str = "auto"
    plan_ahead: bool = True
    defer_after_step: bool = True
    time_loads: bool = True

    def __post_init__(self) -> None:
        _pos_int("max_batch", self.max_batch)
        _pos_int("max_seq_len", self.max_seq_len)
        _pos_int("prefill_chunk", self.prefill_chunk)
        if self.num_device_blocks is not None:
            _pos_int("num_device_blocks", self.num_device_blocks, 2)
        if self.num_host_blocks is not None:
            _pos_int("num_host_blocks", self.num_host_blocks)
        _pos_int("cache_blocks", self.cache_blocks, 0)
        _pos_int("retrieval_threads", self.retrieval_threads)
        if self.retrieval_intra_op_threads is not None:
            _pos_int("retrieval_intra_op_threads", self.retrieval_intra_op_threads)
        if self.cuda_graph is not None and not isinstance(self.cuda_graph, bool):
            raise TypeError(f"RuntimeConfig.cuda_graph must be True, False or None (auto), got {self.cuda_graph!r}")
        _pos_int("max_cuda_graphs", self.max_cuda_graphs)
        for name in ("early_prefetch", "overlap_loads", "plan_ahead", "defer_after_step", "time_loads"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"RuntimeConfig.{name} must be a bool, got {getattr(self, name)!r}")
        if self.load_method not in ("auto", "kernel", "staged", "batch_dma"):
            raise ValueError(
                f"RuntimeConfig.load_method must be 'auto', 'kernel', 'staged' or 'batch_dma', got {self.load_method!r}"
            )

    def max_blocks(self, block_size: int) -> int:
        return -(-self.max_seq_len // block_size)
