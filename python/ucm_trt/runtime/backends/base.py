"""The step interface every backend implements (PyTorch, ONNX Runtime, TensorRT).

A backend runs the model for one step: token ids ``[B, T]`` at true positions ``[B, T]``; the
attention of every layer goes through :meth:`ucm_trt.runtime.step.StepContext.attend` (or, for
graph backends, takes the same pools / tables / seq_lens / selections as inputs and hands back the
new K/V to append); it returns the logits of each row's last token.

The graph backends (ONNX Runtime, TensorRT) share :func:`gather_working_sets`: a rewritten graph
takes ONE block table for all layers, the runtime keeps one per layer.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from ucm_trt.sparse.policies.base import ModelShape

__all__ = ["Backend", "gather_working_sets", "gathered_table", "layer_selection_feed", "step_blocks", "tables_agree"]


class Backend(ABC):
    #: model shape (layers, heads, head dim, RoPE theta, max positions)
    shape: ModelShape
    #: device of the KV pools and step buffers
    device: torch.device
    #: dtype of the KV pools
    kv_dtype: torch.dtype
    #: which backend this is (one of ``ucm_trt.algorithms.BACKENDS``; the registry's rules read it)
    kind: str = "torch"
    #: the algorithm the backend's model was rewritten for (graph backends); ``None``: attention not fixed
    algorithm: str | None = None
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


def step_blocks(step) -> int:
    """Blocks per row the step's longest sequence spans (its chunk included)."""
    bs = step.kv.pools[0].shape[3]
    return max(-(-n // bs) for n in step.new_lens)


def tables_agree(step, num_layers: int) -> bool:
    """Every layer's table rows of the step's rows agree over their first :func:`step_blocks` blocks:
    a graph that takes ONE block table can be bound to the runtime's pools and table as they are."""
    th = step.kv.tables_host[:num_layers, : len(step.rows), : step_blocks(step)]
    return th.shape[0] == 1 or bool((th == th[:1]).all())


def gather_working_sets(step, num_layers: int, *, out: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
    """For a graph that takes one block table for all layers, when the layers' tables differ
    (:func:`tables_agree` is False): per layer, that layer's blocks of the step's ``b`` rows gathered in
    logical order into a ``[b * nb, ...]`` pool (``nb = step_blocks(step)``; into ``out[layer]``'s
    leading rows when given), whose block table is ``block_table[r, j] = r * nb + j``
    (:func:`gathered_table`). One copy of the working set per layer; non-resident blocks read as the
    null block and are never selected."""
    b, nb = len(step.rows), step_blocks(step)
    pools = []
    for layer in range(num_layers):
        idx = step.tables(layer)[:, :nb].reshape(-1).long()
        pool = step.kv.pools[layer]
        pools.append(torch.index_select(pool, 0, idx) if out is None
                     else torch.index_select(pool, 0, idx, out=out[layer][: b * nb]))
    return pools


def gathered_table(step, device: torch.device | str = "cpu") -> torch.Tensor:
    """The block table of :func:`gather_working_sets`' pools: ``[b, nb]`` int32, ``r * nb + j``."""
    b, nb = len(step.rows), step_blocks(step)
    return torch.arange(b * nb, dtype=torch.int32, device=device).view(b, nb)


def layer_selection_feed(step, layer: int, *, has_input: bool, every_block, model: str):
    """What a graph layer's ``selection.{layer}`` input gets: the plan's selection, or
    ``every_block()`` when the plan selects every block (``None``). ``None`` for a layer without a
    selection input (a ``dense`` rewrite, a dense layer), which a plan that selected blocks cannot
    reach: ValueError naming ``model`` (e.g. "the engine (built for 'dense')")."""
    sel = step.selections[layer]
    if has_input:
        return every_block() if sel is None else sel
    if sel is not None:
        raise ValueError(f"layer {layer} of {model} has no selection input but the policy {step.policy.name!r} "
                         "selected blocks; rewrite (and build) the model for a block-selecting algorithm")
    return None
