"""Sparse-attention core: block representations, scoring, selection and the recall quality lens.

Batched torch on CPU or GPU tensors, float32 math internally.

- :mod:`ucm_trt.sparse.representations`   block representations of K (mean, min-max, hash codes, first token,
  attention-weighted mean, KVStar sub-blocks) and their incremental update
- :mod:`ucm_trt.sparse.score`  block scores (ESA dot, Quest bound, Hamming, KVStar voting)
- :mod:`ucm_trt.sparse.select` selection with forced sink/local windows and a budget (DESIGN §3 format)
- :mod:`ucm_trt.sparse.recall` attention-mass recall, oracle selection, recall curves
- :mod:`ucm_trt.sparse.batched` all layers of a request at once (the offload policies' CPU
  retrieval): a ``[L, Hkv, D, nb]`` representation store, one matmul, one batched selection
  (on the host, or on the GPU with GPU-resident representations)
- :mod:`ucm_trt.sparse.turnover` how much a selection changes between retrievals, and the
  ``QueryDrift`` query model that reproduces a chosen turnover on random weights
"""

from __future__ import annotations

from ucm_trt.sparse.recall import (
    SCORING_FOR_REPRESENTATION,
    MassRecall,
    RecallCurve,
    attention_mass_recall,
    block_attention_mass,
    oracle_selection,
    recall_curve,
)
from ucm_trt.sparse.representations import (
    BlockReprState,
    HashEncoder,
    SubBlockRepr,
    attention_token_weights,
    block_first,
    block_hash_codes,
    block_lens_from_seq_lens,
    block_mean,
    block_minmax,
    block_subblock,
    block_weighted_mean,
    kvstar_channels,
    kvstar_subblock,
    pack_bits,
    tokens_to_blocks,
    unpack_bits,
)
from ucm_trt.sparse.score import (
    dot_scores,
    group_mean_query,
    hamming_distances,
    hamming_scores,
    kvstar_vote_scores,
    popcount_u8,
    quest_scores,
    reduce_scores,
)
from ucm_trt.sparse.select import (
    budget_counts,
    candidate_mask,
    forced_mask,
    mask_to_selection,
    num_blocks_from_seq_lens,
    select_blocks,
    select_blocks_by_count,
    selection_counts,
    selection_mask,
)

__all__ = [
    # repr
    "tokens_to_blocks", "block_lens_from_seq_lens", "block_mean", "block_minmax", "block_first",
    "block_weighted_mean", "attention_token_weights", "HashEncoder", "pack_bits", "unpack_bits",
    "block_hash_codes", "kvstar_channels", "SubBlockRepr", "block_subblock", "kvstar_subblock",
    "BlockReprState",
    # score
    "group_mean_query", "dot_scores", "quest_scores", "popcount_u8", "hamming_distances",
    "hamming_scores", "kvstar_vote_scores", "reduce_scores",
    # select
    "select_blocks", "select_blocks_by_count", "budget_counts", "forced_mask", "candidate_mask",
    "selection_mask", "mask_to_selection", "selection_counts", "num_blocks_from_seq_lens",
    # recall
    "MassRecall", "block_attention_mass", "attention_mass_recall", "oracle_selection",
    "RecallCurve", "recall_curve", "SCORING_FOR_REPRESENTATION",
]
