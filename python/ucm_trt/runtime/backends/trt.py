"""TensorRT backend: runs an engine built by ``ucm-trt build`` over the runtime's pools, tables
and selections (torch CUDA buffers, torch's current stream).

Per step (``forward``):

1. inputs bound by address, no copies: ``input_ids``/``position_ids`` ``[B, T]``, ``seq_lens``
   ``[B]``, ``block_table`` ``[B, max_blocks]``, per layer ``kv_pool.{i}`` (the runtime's pool, which
   the engine only reads) and ``selection.{i}`` (the plan's selection, or a preallocated
   "every block" selection when the plan says ``None``), and ``attn_split_counters`` (the split-K
   attention's counters: zeroed once, never re-zeroed; engines built before it have no such input);
2. the execution context of profile 0 (prefill, T > 1) or 1 (decode, T == 1) runs on the current
   stream;
3. the engine's ``new_key.{i}``/``new_value.{i}`` ``[B, Hkv, T, D]`` are appended into the pools at
   the slots the plan reserved (the policy's ``on_append`` hook sees them), ``last_query.{i}`` goes to
   the capture buffer for CPU retrieval, and the last position's logits are returned.

Output buffers are allocated once, at the engine's maximum shapes. The engine's plugins must be
importable in this process for JIT engines (``trt_plugins.register_plugins()`` is called here);
AOT engines need no Python plugin code, but registering is harmless.

The rewritten graph takes ONE block table for all layers: when the runtime's per-layer tables
agree, pools and table are bound as they are; otherwise each layer's blocks of the step's rows are
gathered into a staging pool first (one copy of the working set per layer).

Limits, with clear errors: selections computed inside a layer (``Policy.layer_selection``, e.g. GSA
On-Device) cannot reach an engine (the registry, ``ucm_trt.algorithms``, refuses them when the
``Engine`` is built); the engine returns the last ``ucm.query_window`` queries of a chunk per layer
(``query_window.{i}``; only ``last_query.{i}`` from models rewritten before that output), and a policy
that needs more is refused when the ``Engine`` is built.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ucm_trt.config import ReRoPEConfig
from ucm_trt.graph.schemas import SPLIT_COUNTERS_INPUT
from ucm_trt.runtime.backends._queries import copy_queries, query_window_of
from ucm_trt.runtime.backends.base import (
    Backend,
    gather_working_sets,
    gathered_table,
    layer_selection_feed,
    tables_agree,
)
from ucm_trt.sparse.policies.base import ModelShape

__all__ = ["TrtBackend"]


class TrtBackend(Backend):
    """Backend over a ``ucm-trt build`` engine and its ``ENGINE.json`` sidecar."""

    kind = "tensorrt"
    supports_layer_hooks = False  # selections are engine inputs; nothing runs between layers
    max_query_window = 1  # the engine's own: its ucm.query_window (read at __init__)

    def __init__(self, engine_path: str | Path, *, device: str | torch.device = "cuda") -> None:
        from trt_plugins.runner import load_engine  # TensorRT is imported here, when a backend is built

        self.device = torch.device(device)
        if self.device.type != "cuda":
            raise ValueError(f"device must be a CUDA device for the TensorRT backend, got {self.device}")
        meta_path = Path(str(engine_path) + ".json")
        if not meta_path.is_file():
            raise FileNotFoundError(f"{meta_path} (written by 'ucm-trt build' next to the engine) does not exist")
        self.meta = json.loads(meta_path.read_text())
        ucm = self.meta.get("ucm", {})
        if "ucm.layers" not in ucm:
            raise ValueError(f"{meta_path} has no ucm.layers metadata: was the engine built from a rewritten model?")
        layers = {int(k): v for k, v in json.loads(ucm["ucm.layers"]).items()}
        self.num_layers = len(layers)
        if sorted(layers) != list(range(self.num_layers)):
            raise ValueError(f"engine layers {sorted(layers)} are not 0..{self.num_layers - 1} (partial rewrite?)")
        l0 = layers[0]
        self.block_size = int(ucm["ucm.block_size"])
        self.algorithm = ucm.get("ucm.algorithm", "?")
        if ucm.get("ucm.partial", "false") == "true":
            raise ValueError("the engine was built from a partially rewritten model; every attention layer must be paged")
        self.rerope = ReRoPEConfig(**json.loads(ucm["ucm.rerope"])) if "ucm.rerope" in ucm else None
        self.max_query_window = query_window_of(ucm)
        loaded = load_engine(engine_path)
        self._runtime, self.engine = loaded.runtime, loaded.engine
        self.inputs, self.outputs, self._dtype = list(loaded.inputs), list(loaded.outputs), dict(loaded.dtypes)
        self.kv_dtype = self._dtype["kv_pool.0"]
        max_blocks = self.meta["build_config"]["max_blocks"]
        self.shape = ModelShape(
            num_layers=self.num_layers, num_q_heads=int(l0["num_q_heads"]), num_kv_heads=int(l0["num_kv_heads"]),
            head_dim=int(l0["head_dim"]), rope_theta=float(l0.get("rope_theta") or 10000.0),
            max_positions=max_blocks * self.block_size,
        )  # fmt: skip
        self.attention = None  # attention runs inside the engine (the plugins), not in StepContext.attend
        if self.engine.num_optimization_profiles < 2:
            raise ValueError("engine must have the prefill and decode optimization profiles of 'ucm-trt build'")
        self._contexts = []
        for p in range(2):
            ctx = self.engine.create_execution_context()
            ctx.set_optimization_profile_async(p, torch.cuda.current_stream(self.device).cuda_stream)
            self._contexts.append(ctx)
        self._buffers = self._allocate_outputs()
        hkv = self.shape.num_kv_heads
        mb = self.meta["build_config"]["max_batch"]
        self._all_blocks = torch.arange(max_blocks, dtype=torch.int32, device=self.device).expand(mb, hkv, max_blocks).contiguous()
        self._max_blocks = max_blocks
        self._staging: list[torch.Tensor] | None = None  # per-layer gathered pools, allocated on first need
        self._split_counters = self._counters_buffer()

    def attention_name(self) -> str:
        return f"tensorrt ({self.meta.get('plugin_mode', '?')} plugins)"

    def _counters_buffer(self) -> torch.Tensor | None:
        """The split-K attention kernel's counters (``attn_split_counters``, engines of models rewritten
        since issue 14; None for older engines, whose attention runs unsplit and has no such input).

        Allocated and zeroed ONCE, at the length ``ucm-trt build`` fixed in both profiles, and bound to
        every step as it is: never re-zeroed, because every launch of the kernel leaves its counters zero
        (the program that merges a tile resets the tile's counter), and one buffer serves every layer
        because the engine runs its layers in order on one stream. Both execution contexts share it: the
        backend runs one step at a time on one stream."""
        if SPLIT_COUNTERS_INPUT not in self.inputs:
            return None
        lengths = {tuple(int(d) for d in self.engine.get_tensor_profile_shape(SPLIT_COUNTERS_INPUT, p)[2])
                   for p in range(2)}  # fmt: skip
        if len(lengths) != 1:
            raise ValueError(f"engine input {SPLIT_COUNTERS_INPUT} has different lengths per profile ({sorted(lengths)}); "
                             "rebuild it with 'ucm-trt build'")
        return torch.zeros(lengths.pop(), dtype=torch.int32, device=self.device)

    # -- buffers ---------------------------------------------------------------------------------
    def _allocate_outputs(self) -> dict[str, torch.Tensor]:
        """One flat buffer per output, sized for the largest shape of either profile."""
        need: dict[str, int] = {}
        for p, ctx in enumerate(self._contexts):
            for n in self.inputs:
                ctx.set_input_shape(n, tuple(self.engine.get_tensor_profile_shape(n, p)[2]))
            for n in self.outputs:
                numel = 1
                for d in ctx.get_tensor_shape(n):
                    numel *= max(int(d), 0)
                need[n] = max(need.get(n, 0), numel)
        return {n: torch.empty(need[n], dtype=self._dtype[n], device=self.device) for n in self.outputs}

    # -- one step ----------------------------------------------------------------------------------
    def _pools_and_table(self, step, b: int):
        """``(pools, block_table)`` for the engine, whose graph takes ONE table for all layers.

        When the runtime's per-layer tables agree for the step's rows (host mirrors compared), the
        runtime's pools and table are bound as they are (no copy). Otherwise every layer's blocks of
        the step's rows are gathered, in logical order, into a staging pool and the table becomes
        ``b * nb + j`` -- one copy of the working set per layer, as the ONNX Runtime backend does.
        """
        if tables_agree(step, self.num_layers):
            return [step.kv.pools[i] for i in range(self.num_layers)], step.tables(0)
        if self._staging is None:
            nmax = self.meta["build_config"]["max_batch"] * self._max_blocks
            self._staging = [torch.empty((nmax, *p.shape[1:]), dtype=p.dtype, device=p.device)
                             for p in step.kv.pools[: self.num_layers]]  # fmt: skip
        return gather_working_sets(step, self.num_layers, out=self._staging), gathered_table(step, self.device)

    def _bind_inputs(self, input_ids, positions, step) -> dict[str, torch.Tensor]:
        b, t = input_ids.shape
        pools, table = self._pools_and_table(step, b)
        feeds = {"input_ids": input_ids, "position_ids": positions, "seq_lens": step.seq_lens, "block_table": table}
        if self._split_counters is not None:
            feeds[SPLIT_COUNTERS_INPUT] = self._split_counters  # zero, and left zero by every launch
        width = table.shape[1]
        for i in range(self.num_layers):
            feeds[f"kv_pool.{i}"] = pools[i]
            sel = layer_selection_feed(step, i, has_input=f"selection.{i}" in self.inputs,
                                       every_block=lambda: self._all_blocks[:b, :, :width],
                                       model=f"the engine (built for {self.algorithm!r})")
            if sel is not None:
                feeds[f"selection.{i}"] = sel
        missing = [n for n in self.inputs if n not in feeds]
        if missing:
            raise ValueError(f"engine inputs {missing} are not provided by the runtime step")
        return {n: feeds[n] for n in self.inputs}

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, step) -> torch.Tensor:
        b, t = input_ids.shape
        profile = 0 if t > 1 else 1
        ctx = self._contexts[profile]
        step.wait_for_loads()  # the engine reads the pools: every layer's block copies first
        stream = torch.cuda.current_stream(self.device).cuda_stream
        feeds = self._bind_inputs(input_ids, positions, step)
        for n, x in feeds.items():
            if x.dtype != self._dtype[n]:
                if n not in ("input_ids", "position_ids"):
                    raise TypeError(f"engine input {n} is {self._dtype[n]}, the runtime gives {x.dtype}")
                x = x.to(self._dtype[n])  # token ids / positions only (int64 <-> int32)
            if not x.is_contiguous():
                if n.startswith("kv_pool."):
                    raise ValueError(f"{n} must be contiguous: the engine reads the runtime's pool in place")
                x = x.contiguous()
            feeds[n] = x  # keep alive until the step ends
            lo, _, hi = self.engine.get_tensor_profile_shape(n, profile)
            if any(not int(a) <= s <= int(c) for a, s, c in zip(lo, x.shape, hi, strict=True)):
                raise ValueError(
                    f"engine input {n} has shape {tuple(x.shape)} outside the engine's "
                    f"{('prefill', 'decode')[profile]} profile [{tuple(lo)} .. {tuple(hi)}]; rebuild with larger "
                    "--max-batch / --max-prefill-tokens / --max-blocks / --num-blocks"
                )
            ctx.set_input_shape(n, tuple(x.shape))
            ctx.set_tensor_address(n, x.data_ptr())
        outs = {}
        for n in self.outputs:
            shape = tuple(int(d) for d in ctx.get_tensor_shape(n))
            numel = 1
            for d in shape:
                numel *= d
            view = self._buffers[n][:numel].view(shape)
            ctx.set_tensor_address(n, view.data_ptr())
            outs[n] = view
        if not ctx.execute_async_v3(stream):
            raise RuntimeError("TensorRT execute_async_v3 failed (see the TensorRT log)")
        self._append(outs, step, b, t)
        logits = outs["logits"]
        return logits[:, -1].float()

    def _append(self, outs: dict[str, torch.Tensor], step, b: int, t: int) -> None:
        for i in range(self.num_layers):
            step.append_kv(i, outs[f"new_key.{i}"], outs[f"new_value.{i}"])
            copy_queries(step, i, b, t, outs)
            step.layers_run += 1
