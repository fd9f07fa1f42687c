"""Run a TensorRT engine on torch CUDA tensors (verification and tests; the generation runtime uses
``ucm_trt.runtime.backends.trt.TrtBackend``)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch

from trt_plugins._tensorrt import require_tensorrt

__all__ = ["EngineRunner"]


class EngineRunner:
    """``EngineRunner(path).run({name: cuda tensor}) -> {output name: cuda tensor}``.

    ``register=True`` registers the UCM plugins first (needed for JIT engines; AOT engines run
    without). The profile is picked from the ``tokens`` dim: decode (1) when every input that has a
    token axis has 1 token, else prefill (0); pass ``profile=`` to force one.
    """

    def __init__(self, engine_path: str | Path, *, register: bool = True) -> None:
        trt, _ = require_tensorrt()
        self._trt = trt
        if register:
            from trt_plugins import register_plugins

            register_plugins()
        self.runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = self.runtime.deserialize_cuda_engine(Path(engine_path).read_bytes())
        if self.engine is None:
            raise RuntimeError(f"TensorRT could not deserialize {engine_path}")
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        self._contexts: dict[int, object] = {}

    def _dtype(self, name: str) -> torch.dtype:
        trt = self._trt
        table = {trt.float32: torch.float32, trt.float16: torch.float16, trt.bfloat16: torch.bfloat16,
                 trt.int32: torch.int32, trt.int64: torch.int64, trt.bool: torch.bool}  # fmt: skip
        return table[self.engine.get_tensor_dtype(name)]

    def context(self, profile: int):
        if profile not in self._contexts:
            ctx = self.engine.create_execution_context()
            ctx.set_optimization_profile_async(profile, torch.cuda.current_stream().cuda_stream)
            self._contexts[profile] = ctx
        return self._contexts[profile]

    def run(self, feeds: Mapping[str, torch.Tensor], *, profile: int | None = None) -> dict[str, torch.Tensor]:
        missing = [n for n in self.inputs if n not in feeds]
        if missing:
            raise ValueError(f"engine inputs {missing} were not given")
        if profile is None:
            profile = 0
            if self.engine.num_optimization_profiles > 1:
                t_dims = [int(feeds[n].shape[1]) for n in ("input_ids",) if n in feeds]
                t_dims += [int(feeds[n].shape[2]) for n in ("q",) if n in feeds]
                profile = 1 if t_dims and all(t == 1 for t in t_dims) else 0
        ctx = self.context(profile)
        keep = []
        for n in self.inputs:
            x = feeds[n]
            if x.dtype != self._dtype(n):
                raise TypeError(f"input {n} must be {self._dtype(n)}, got {x.dtype}")
            x = x.contiguous()
            keep.append(x)
            ctx.set_input_shape(n, tuple(x.shape))
            ctx.set_tensor_address(n, x.data_ptr())
        outs = {}
        for n in self.outputs:
            shape = tuple(int(d) for d in ctx.get_tensor_shape(n))
            outs[n] = torch.empty(shape, dtype=self._dtype(n), device="cuda")
            ctx.set_tensor_address(n, outs[n].data_ptr())
        if not ctx.execute_async_v3(torch.cuda.current_stream().cuda_stream):
            raise RuntimeError("TensorRT execute_async_v3 failed (see the TensorRT log)")
        torch.cuda.current_stream().synchronize()
        return outs
