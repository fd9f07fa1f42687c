"""CPU speed figures (issue 7, "Speed", CPU side): ``ucm-trt bench``.

- :mod:`ucm_trt.bench.cpu`      the measurements: CPU retrieval cost per decode step (ESA scoring +
  top-k with forced windows, per layer as the runtime does it and batched over layers) and offload
  bytes moved / cache hit rate through the runtime ``Engine`` on a tiny random Llama.
- :mod:`ucm_trt.bench.command`  the ``ucm-trt bench`` options and driver (argparse only at import).
"""

from __future__ import annotations

__all__ = ["cpu", "command"]
