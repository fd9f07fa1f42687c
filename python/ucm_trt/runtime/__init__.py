"""Generation runtime: paged KV pools + allocator, host block store, working sets with delta
prefetch, asynchronous CPU retrieval, policies, backends and the generation API.

Quick start (CPU, PyTorch backend)::

    from ucm_trt.config import SparseConfig, Budget
    from ucm_trt.runtime import Engine, RuntimeConfig, SamplingParams, TorchBackend, make_policy
    engine = Engine(TorchBackend(model), make_policy("esa"), sparse=SparseConfig(block_size=32,
                    budget=Budget.ratio(0.25), retrieval_stride=4), config=RuntimeConfig(max_seq_len=4096))
    [res] = engine.generate(prompt_ids, SamplingParams(max_new_tokens=64))
    print(engine.stats())
"""

from __future__ import annotations

from ucm_trt._lazy import lazy_exports

# module -> the public names it defines. Imported on first use (PEP 562), so that importing a light
# submodule (``ucm_trt.runtime.cli_run``, whose options ``ucm-trt --help`` reads) loads no torch.
_names, __getattr__, __dir__ = lazy_exports(
    __name__,
    {
        "ucm_trt.runtime.kv": (
            "BlockAllocator",
            "KVLayout",
            "KVManager",
            "PoolExhaustedError",
            "StepTransfer",
        ),
        "ucm_trt.runtime.engine": ("Engine", "GenerationResult", "SamplingParams"),
        "ucm_trt.runtime.worker": ("RetrievalError", "RetrievalWorker"),
        "ucm_trt.runtime.config": ("RuntimeConfig",),
        "ucm_trt.runtime.backends.torch_backend": ("TorchBackend",),
        "ucm_trt.runtime.algorithms": ("make_policy",),
    },
    globals(),
)
__all__ = sorted(_names)
