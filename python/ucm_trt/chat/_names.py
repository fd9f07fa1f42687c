"""Names the chat needs before torch is imported (so ``--help`` stays instant), read from the
algorithm registry (:mod:`ucm_trt.algorithms`, which imports no torch)."""

from ucm_trt import algorithms as registry

# Every algorithm of the runtime (the registry's names).
ALGORITHMS: tuple[str, ...] = registry.names()

# What a chat turn can run: the per-step policies. The prefill methods (blend) are left out: blend reuses
# the KV of document chunks cached by earlier requests, and a chat turn has no such chunks;
# `ucm-trt run --algorithm blend` runs it.
CHAT_ALGORITHMS: tuple[str, ...] = registry.names("policy")


def not_in_chat(name: object) -> str:
    """``""``, or for a runtime algorithm outside :data:`CHAT_ALGORITHMS` the reason the chat cannot
    run it, as a ``"; ..."`` tail for a one-line error."""
    if name in ALGORITHMS and name not in CHAT_ALGORITHMS:
        spec = registry.get(name)
        return (f"; {name} is not a chat algorithm: it is a prefill method ({spec.summary}), and a chat turn "
                f"has no cached document chunks (run it with `ucm-trt run --algorithm {name} --chunk TEXT ... "
                "--prompt QUESTION`)")
    return ""
