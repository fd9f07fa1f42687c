"""Model backends behind one step interface (:class:`~ucm_trt.runtime.backends.base.Backend`)."""

from ucm_trt.runtime.backends.base import Backend

__all__ = ["Backend"]
