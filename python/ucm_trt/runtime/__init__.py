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

from ucm_trt.runtime.generation import Engine, GenerationResult, SamplingParams
from ucm_trt.runtime.kv import BlockAllocator, KVLayout, KVManager, PoolExhaustedError, StepTransfer
from ucm_trt.runtime.plan import RuntimeConfig
from ucm_trt.runtime.worker import RetrievalError, RetrievalWorker

__all__ = [
    "BlockAllocator",
    "Engine",
    "GenerationResult",
    "KVLayout",
    "KVManager",
    "PoolExhaustedError",
    "RetrievalError",
    "RetrievalWorker",
    "RuntimeConfig",
    "StepTransfer",
    "SamplingParams",
    "TorchBackend",
    "make_policy",
]


def __getattr__(name):
    # TorchBackend imports transformers lazily; algorithms.make_policy is cheap but kept lazy too.
    if name == "TorchBackend":
        from ucm_trt.runtime.backends.torch_backend import TorchBackend

        return TorchBackend
    if name == "make_policy":
        from ucm_trt.runtime.algorithms import make_policy

        return make_policy
    raise AttributeError(name)
