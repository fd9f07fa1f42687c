"""Triton kernels (the only place with ``@triton.jit`` code) and their validating launchers.

Run on a CUDA GPU, or on the CPU through Triton's interpreter (``TRITON_INTERPRET=1`` set by
the caller before the first import of this package; the library never sets it).
"""

from ucm_trt.kernels.attention import (
    AttentionLaunch,
    AttentionWorkspace,
    paged_rerope_attention,
    paged_sparse_attention,
)
from ucm_trt.kernels.block_copy import copy_blocks
from ucm_trt.kernels.fused_retrieval import (
    RetrievalLaunch,
    RetrievalWorkspace,
    dot_retrieve,
    hash_retrieve,
    quest_retrieve,
)
from ucm_trt.kernels.hash_encode import encode_keys_into
from ucm_trt.kernels.kv_append import append_kv
from ucm_trt.kernels.retrieval import (
    block_topk,
    dot_block_scores,
    hamming_block_scores,
    quest_block_scores,
)
from ucm_trt.kernels.rope import delta_rope_blocks_

__all__ = [
    "AttentionLaunch",
    "AttentionWorkspace",
    "RetrievalLaunch",
    "RetrievalWorkspace",
    "append_kv",
    "block_topk",
    "copy_blocks",
    "delta_rope_blocks_",
    "dot_block_scores",
    "dot_retrieve",
    "encode_keys_into",
    "hamming_block_scores",
    "hash_retrieve",
    "paged_rerope_attention",
    "paged_sparse_attention",
    "quest_block_scores",
    "quest_retrieve",
]
