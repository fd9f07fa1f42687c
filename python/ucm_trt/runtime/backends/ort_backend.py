"""ONNX Runtime backend: runs a model rewritten by :mod:`ucm_trt.graph` (the embedded CPU default).

The rewritten model (docs/graph.md) takes ``input_ids``, ``position_ids``, ``seq_lens`` (lengths
including the chunk), ONE ``block_table`` shared by all layers, per layer ``kv_pool.{i}`` (past
tokens only) and, for sparse algorithms, ``selection.{i}``; it returns ``logits``,
``new_key.{i}`` / ``new_value.{i}`` (the chunk's K/V, which the runtime appends) and
``last_query.{i}`` (the last token's query, for CPU retrieval) and, in a model rewritten with
``RewriteConfig.query_window = W > 1`` (the default, 64), ``query_window.{i}`` (the chunk's last
``min(W, T)`` queries: the prompt queries a policy's first retrieval reads, ``Policy.query_window``).

The runtime keeps one block table per layer (per-layer working sets), the graph takes one. When
every layer's table rows are identical (no offload) the pools are passed as they are, with that
table. Otherwise this backend gathers every layer's blocks of the step's rows, in logical order,
into a contiguous per-layer pool and passes ``block_table[b, j] = b * nb + j``; the gathered pool
holds exactly the blocks the layer's table maps (non-resident blocks read as the null block, and
they are never selected). That costs one copy of the working set per layer per step.

Limits: a policy that needs more prompt queries than the model returns (``ucm.query_window``; 1 for
models rewritten before that output) is rejected when the engine is built; per-layer on-device
selection hooks (GSA On-Device) cannot run inside the graph and are rejected too.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from ucm_trt.config import ReRoPEConfig
from ucm_trt.graph.schemas import SPLIT_COUNTERS_INPUT
from ucm_trt.runtime.backends._queries import copy_queries, query_window_of
from ucm_trt.runtime.backends.base import (
    Backend,
    gather_working_sets,
    gathered_table,
    layer_selection_feed,
    step_blocks,
    tables_agree,
)
from ucm_trt.sparse.policies.base import ModelShape

__all__ = ["OrtBackend"]

_ORT_DTYPES = {"tensor(float)": torch.float32, "tensor(float16)": torch.float16}


class OrtBackend(Backend):
    """Run a ``ucm_trt.graph``-rewritten ONNX model with ONNX Runtime.

    Parameters
    ----------
    model_path:
        Path of the rewritten ``.onnx`` model.
    max_positions:
        The model's trained context (ONNX does not record it); ``None`` = no limit checked.
    providers:
        ONNX Runtime execution providers (default CPU).
    """

    kind = "onnxruntime"
    supports_layer_hooks = False
    max_query_window = 1  # a model's own: its ucm.query_window (read at __init__)

    def __init__(self, model_path: str | Path, *, max_positions: int | None = None,
                 providers: tuple[str, ...] = ("CPUExecutionProvider",)) -> None:
        import onnxruntime as ort

        path = Path(model_path)
        if not path.is_file():
            raise ValueError(f"model_path {str(path)!r} is not a file")
        if max_positions is not None and (isinstance(max_positions, bool) or not isinstance(max_positions, int)
                                          or max_positions < 1):
            raise ValueError(f"max_positions must be an int >= 1 or None, got {max_positions!r}")
        self.session = ort.InferenceSession(str(path), providers=list(providers))
        meta = self.session.get_modelmeta().custom_metadata_map
        if "ucm.layers" not in meta:
            raise ValueError(f"{str(path)!r} is not a ucm_trt-rewritten model (no 'ucm.layers' metadata); "
                             "run `ucm-trt rewrite` first")
        if meta.get("ucm.partial", "false") == "true":
            raise ValueError(f"{str(path)!r} was rewritten partially; the runtime needs every attention layer paged")
        layers = {int(k): v for k, v in json.loads(meta["ucm.layers"]).items()}
        n = len(layers)
        if sorted(layers) != list(range(n)):
            raise ValueError(f"rewritten model layers must be 0..{n - 1}, got {sorted(layers)}")
        first = layers[0]
        for i, lay in layers.items():
            for key in ("num_q_heads", "num_kv_heads", "head_dim"):
                if lay[key] != first[key]:
                    raise ValueError(f"layer {i} has {key}={lay[key]}, layer 0 has {first[key]}; "
                                     "the runtime needs one shape for every layer")
        self.algorithm = meta.get("ucm.algorithm", "dense")
        self.block_size = int(meta["ucm.block_size"])
        self.rerope = ReRoPEConfig(**json.loads(meta["ucm.rerope"])) if "ucm.rerope" in meta else None
        self.has_selection = [bool(layers[i].get("selection")) for i in range(n)]
        self.max_query_window = query_window_of(meta)
        theta = first.get("rope_theta")
        self.shape = ModelShape(num_layers=n, num_q_heads=first["num_q_heads"], num_kv_heads=first["num_kv_heads"],
                                head_dim=first["head_dim"], rope_theta=float(theta) if theta else 0.0,
                                max_positions=max_positions or (1 << 31))
        inputs = {i.name: i for i in self.session.get_inputs()}
        ptype = inputs["kv_pool.0"].type
        if ptype not in _ORT_DTYPES:
            raise ValueError(f"kv_pool.0 has type {ptype}; supported: {', '.join(_ORT_DTYPES)}")
        self.kv_dtype = _ORT_DTYPES[ptype]
        self.device = torch.device("cpu")
        self.attention = None
        self._outputs = [o.name for o in self.session.get_outputs()]
        # the split-K scratch input of models rewritten since issue 14 (absent before): the function bodies
        # never read it, so one zero serves every step
        self._split_counters = SPLIT_COUNTERS_INPUT in inputs

    def attention_name(self) -> str:
        return f"onnxruntime ({self.algorithm} graph)"

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, step) -> torch.Tensor:
        b, t = input_ids.shape
        nb = step_blocks(step)
        gathered = None if tables_agree(step, self.shape.num_layers) else gather_working_sets(step, self.shape.num_layers)
        feeds: dict[str, np.ndarray] = {
            "input_ids": input_ids.cpu().numpy(),
            "position_ids": positions.cpu().numpy(),
            "seq_lens": step.seq_lens.cpu().numpy(),
            "block_table": np.ascontiguousarray((step.kv.tables_host[0, :b, :nb] if gathered is None
                                                 else gathered_table(step)).numpy()),
        }
        if self._split_counters:
            feeds[SPLIT_COUNTERS_INPUT] = np.zeros(1, dtype=np.int32)
        for layer in range(self.shape.num_layers):
            # the pools themselves (no copy) when every layer maps blocks identically (e.g. no offload)
            feeds[f"kv_pool.{layer}"] = (step.kv.pools[layer] if gathered is None else gathered[layer]).numpy()
            sel = layer_selection_feed(
                step, layer, has_input=self.has_selection[layer],
                every_block=lambda: torch.arange(nb, dtype=torch.int32).expand(b, self.shape.num_kv_heads, nb),
                model=f"the ONNX model (rewritten for {self.algorithm!r})",
            )  # fmt: skip
            if sel is not None:
                feeds[f"selection.{layer}"] = np.ascontiguousarray(sel.cpu().numpy())
        outs = dict(zip(self._outputs, self.session.run(None, feeds), strict=True))
        hkv, d = self.shape.num_kv_heads, self.shape.head_dim
        for layer in range(self.shape.num_layers):
            k = torch.from_numpy(outs[f"new_key.{layer}"])
            v = torch.from_numpy(outs[f"new_value.{layer}"])
            if tuple(k.shape) != (b, hkv, t, d):
                raise RuntimeError(f"new_key.{layer} has shape {tuple(k.shape)}, expected {(b, hkv, t, d)}")
            step.append_kv(layer, k, v)
            copy_queries(step, layer, b, t, outs, torch.from_numpy)
            step.layers_run += 1
        return torch.from_numpy(outs["logits"])[:, -1].float()
