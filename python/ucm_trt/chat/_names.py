"""Names the chat needs before torch is imported (so ``--help`` stays instant)."""

# The runtime's algorithms (ucm_trt.runtime.algorithms.ALGORITHMS; tests/samples checks they match).
ALGORITHMS: tuple[str, ...] = ("dense", "esa", "gsa", "gsa-on-device", "kvstar", "rerope")
