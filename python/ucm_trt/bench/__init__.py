"""CPU speed figures (issue 7, "Speed", CPU side): ``ucm-trt bench``.

- :mod:`ucm_trt.bench.cpu`      the measurements: CPU retrieval cost per decode step (ESA scoring +
  top-k with forced windows, per layer as the runtime does it and batched over layers) and offload
  bytes moved / cache hit rate through the runtime ``Engine`` on a tiny random Llama.
- :mod:`ucm_trt.bench.command`  the ``ucm-trt bench`` options and driver (argparse only at import).
- :mod:`ucm_trt.bench.retrieval` retrieval cost per sequence as the batch grows, through the
  runtime's worker threads, host vs GPU-resident representations (``benchmarks/bench_retrieval.py``).
"""

from __future__ import annotations

__all__ = ["cpu", "command", "retrieval"]
