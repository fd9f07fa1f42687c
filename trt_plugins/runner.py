"""The one TensorRT engine loader, and a runner for verification and tests.

:func:`load_engine` deserializes an engine (registering the UCM plugins first, needed by JIT
engines; AOT engines run without) and names its inputs and outputs with their torch dtypes; the
generation runtime's ``ucm_trt.runtime.backends.trt.TrtBackend`` and :class:`EngineRunner` both
load through it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from trt_plugins._tensorrt import require_tensorrt, torch_dtype

__all__ = ["EngineRunner", "LoadedEngine", "load_engine"]


@dataclass(frozen=True)
class LoadedEngine:
    """A deserialized engine: the runtime that owns it, the engine, its I/O names and torch dtypes."""

    runtime: object
    engine: object
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    dtypes: Mapping[str, torch.dtype]


def load_engine(engine_path: str | Path, *, register: bool = True) -> LoadedEngine:
    """Deserialize the engine at ``engine_path`` (registering the UCM plugins first unless
    ``register=False``). Raises FileNotFoundError for a missing file, RuntimeError when TensorRT
    cannot deserialize it, :class:`~trt_plugins.TensorRTUnavailableError` without TensorRT."""
    trt, _ = require_tensorrt()
    path = Path(engine_path)
    if not path.is_file():
        raise FileNotFoundError(f"engine {str(path)!r} does not exist")
    if register:
        from trt_plugins import register_plugins

        register_plugins()
    runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
    engine = runtime.deserialize_cuda_engine(path.read_bytes())
    if engine is None:
        raise RuntimeError(f"TensorRT could not deserialize {path} (built by another TensorRT version or GPU?)")
    names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
    mode = trt.TensorIOMode
    return LoadedEngine(
        runtime=runtime, engine=engine,
        inputs=tuple(n for n in names if engine.get_tensor_mode(n) == mode.INPUT),
        outputs=tuple(n for n in names if engine.get_tensor_mode(n) == mode.OUTPUT),
        dtypes={n: torch_dtype(engine.get_tensor_dtype(n), what=f"engine tensor {n!r}") for n in names},
    )  # fmt: skip


class EngineRunner:
    """``EngineRunner(path).run({name: cuda tensor}) -> {output name: cuda tensor}``.

    ``register=True`` registers the UCM plugins first (needed for JIT engines; AOT engines run
    without). The profile is picked from the ``tokens`` dim: decode (1) when every input that has a
    token axis has 1 token, else prefill (0); pass ``profile=`` to force one.
    """

    def __init__(self, engine_path: str | Path, *, register: bool = True) -> None:
        loaded = load_engine(engine_path, register=register)
        self.runtime, self.engine = loaded.runtime, loaded.engine
        self.inputs, self.outputs = list(loaded.inputs), list(loaded.outputs)
        self._dtypes = loaded.dtypes
        self._contexts: dict[int, object] = {}

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
            if x.dtype != self._dtypes[n]:
                raise TypeError(f"input {n} must be {self._dtypes[n]}, got {x.dtype}")
            x = x.contiguous()
            keep.append(x)
            ctx.set_input_shape(n, tuple(x.shape))
            ctx.set_tensor_address(n, x.data_ptr())
        outs = {}
        for n in self.outputs:
            shape = tuple(int(d) for d in ctx.get_tensor_shape(n))
            outs[n] = torch.empty(shape, dtype=self._dtypes[n], device="cuda")
            ctx.set_tensor_address(n, outs[n].data_ptr())
        if not ctx.execute_async_v3(torch.cuda.current_stream().cuda_stream):
            raise RuntimeError("TensorRT execute_async_v3 failed (see the TensorRT log)")
        torch.cuda.current_stream().synchronize()
        return outs
