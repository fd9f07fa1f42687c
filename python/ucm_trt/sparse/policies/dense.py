"""Dense attention: every block, every step (the baseline every sparse policy is measured against)."""

from __future__ import annotations

from ucm_trt.sparse.policies.base import Policy

__all__ = ["DensePolicy"]


class DensePolicy(Policy):
    """All blocks resident and attended; no retrieval."""

    name = "dense"
