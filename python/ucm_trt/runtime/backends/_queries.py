"""The graph backends' query outputs (ONNX Runtime, TensorRT) into the runtime's capture buffer.

A model rewritten by :mod:`ucm_trt.graph` returns ``last_query.{i}`` ``[B, Hq, D]`` (the chunk's last
token) and, rewritten with ``RewriteConfig.query_window = W > 1``, ``query_window.{i}``
``[B, Hq, min(W, T), D]`` (the chunk's last tokens, oldest first). The capture buffer
(:class:`ucm_trt.runtime.step.StepContext`) holds the last ``min(T, capture_width)`` queries per layer
in slots ``[0, w)``, oldest first, as the PyTorch backend writes them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

__all__ = ["copy_queries", "query_window_of"]


def query_window_of(meta: Mapping[str, str]) -> int:
    """The prompt queries per layer a rewritten model returns: its ``ucm.query_window`` metadata (1 for a
    model rewritten before that output)."""
    raw = meta.get("ucm.query_window", "1")
    try:
        window = int(raw)
    except ValueError:
        raise ValueError(f"model metadata ucm.query_window must be an int >= 1, got {raw!r}") from None
    if window < 1:
        raise ValueError(f"model metadata ucm.query_window must be an int >= 1, got {raw!r}")
    return window


def copy_queries(step: Any, layer: int, b: int, t: int, outs: Mapping[str, Any],
                 as_tensor: Callable[[Any], torch.Tensor] = lambda x: x) -> None:
    """Layer ``layer``'s queries of a ``b``-row, ``t``-token step from the graph outputs ``outs`` into
    ``step.capture``: the last ``min(t, step.capture_width)`` of them, oldest first. A width above 1 needs
    the ``query_window.{layer}`` output with at least that many queries (a RuntimeError otherwise; the
    engine refuses such a policy up front, ``check_query_window``)."""
    w = min(t, step.capture_width)
    if w == 1:
        step.capture[layer, :b, :, 0] = as_tensor(outs[f"last_query.{layer}"]).float()
        return
    name = f"query_window.{layer}"
    if name not in outs:
        raise RuntimeError(f"the policy needs the queries of the last {w} tokens, but the model returns only the "
                           "last token's query (last_query.{i}); rewrite it with RewriteConfig.query_window >= "
                           f"{w}")
    q = as_tensor(outs[name])
    have = q.shape[2]
    if have < w:
        raise RuntimeError(f"{name} holds {have} queries of a {t}-token chunk; the policy needs the last {w} "
                           f"(the model was rewritten with a smaller query_window)")
    step.capture[layer, :b, :, :w] = q[:, :, have - w:].float()
