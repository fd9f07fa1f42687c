"""The step interface every backend implements (PyTorch, ONNX Runtime, TensorRT).

A backend runs the model for one step: token ids ``[B, T]`` at true positions ``[B, T]``; the
attention of every layer goes through :meth:`ucm_trt.runtime.step.StepContext.attend` (or, for
graph backends, takes the same pools / tables / seq_lens / selections as inputs and hands back the
new K/V to append); it returns the logits of each row's last token.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from ucm_trt.sparse.policies.base import ModelShape

__all__ = ["Backend"]


class Backend(ABC):
    #: model shape (layers, heads, head dim, RoPE theta, max positions)
    shape: ModelShape
    #: device of the KV pools and step buffers
    device: torch.device
    #: dtype of the KV pools
    kv_dtype: torch.dtype
    #: block size the backend was built for (``None``: any)
    block_size: int | None = None
    #: ReRoPE config baked into the backend (graph backends); ``None`` = not fixed by the backend
    rerope = None
    #: policies may select blocks per layer inside the forward (``Policy.layer_selection``)
    supports_layer_hooks: bool = True
    #: most trailing prompt queries the backend can hand back per step (``None``: any)
    max_query_window: int | None = None
    #: the decode forward can be captured in a CUDA graph and replayed (``ucm_trt.runtime.cuda_graph``)
    supports_cuda_graph: bool = False

    @abstractmethod
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, step) -> torch.Tensor:
        """Run one step; returns float logits ``[B, vocab]`` of each row's last token."""

    def attention_name(self) -> str:
        return "unknown"
