"""Quality evaluation of sparse attention on a real model (DESIGN §5, issue 7).

- :mod:`ucm_trt.eval.sparse_lm`  real sparse-attention inference through transformers'
  ``AttentionInterface`` (perplexity, greedy decoding for passkey retrieval)
- :mod:`ucm_trt.eval.methods`    the compared selection methods and their selectors
- :mod:`ucm_trt.eval.suite`      the recall sweep and the accuracy table, resumable
- :mod:`ucm_trt.eval.results`    resumable JSON result files
- :mod:`ucm_trt.eval.report`     aggregation into tables (docs/quality.md)

Importing this package does not import transformers; the functions that need a model do.
"""

from __future__ import annotations
