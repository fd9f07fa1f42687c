"""Names the chat needs before torch is imported (so ``--help`` stays instant)."""

# Every algorithm of the runtime (ucm_trt.runtime.algorithms.ALGORITHMS; tests/samples checks they match).
ALGORITHMS: tuple[str, ...] = ("dense", "esa", "gsa", "gsa-on-device", "kvstar", "blend", "rerope")

# What a chat turn can run: the per-step policies (ucm_trt.runtime.algorithms.POLICY_ALGORITHMS; tests/cli
# checks they match). Blend is left out: it is a prefill method that reuses the KV of document chunks cached
# by earlier requests, and a chat turn has no such chunks; `ucm-trt run --algorithm blend` runs it.
CHAT_ALGORITHMS: tuple[str, ...] = tuple(a for a in ALGORITHMS if a != "blend")


def not_in_chat(name: object) -> str:
    """``""``, or for a runtime algorithm outside :data:`CHAT_ALGORITHMS` the reason the chat cannot
    run it, as a ``"; ..."`` tail for a one-line error."""
    if name == "blend":
        return ("; blend is not a chat algorithm: it is a prefill method that reuses the KV of document chunks "
                "cached by earlier requests, and a chat turn has none (run it with "
                "`ucm-trt run --algorithm blend --chunk TEXT ... --prompt QUESTION`)")
    return ""
