"""ReRoPE (upstream ``ucm/sparse/rerope``; ucm-upstream.md §8) as a policy.

The pool holds UN-rotated K (the backend un-rotates the model's post-RoPE K before appending)
and attention runs the ReRoPE path: inside ``window`` the real relative position, beyond it the
position clamped to ``window``, with optional log-n query scaling (``ReRoPEConfig``). Every
block is attended (dense); KV memory is 1.0x (no second K plane, unlike upstream's 1.5x).
"""

from __future__ import annotations

from ucm_trt.config import ReRoPEConfig
from ucm_trt.sparse.policies.base import Policy

__all__ = ["ReRoPEPolicy"]


class ReRoPEPolicy(Policy):
    name = "rerope"

    def __init__(self, config: ReRoPEConfig) -> None:
        super().__init__()
        if not isinstance(config, ReRoPEConfig):
            raise TypeError(f"config must be a ReRoPEConfig, got {type(config).__name__}")
        self.rerope = config

    def stats(self) -> dict:
        return {"rerope_window": self.rerope.window, "rerope_training_length": self.rerope.training_length,
                "rerope_logn": self.rerope.logn}
