"""Export a Hugging Face decoder (directory or in-memory model) to ONNX with a contiguous KV cache.

The exported graph has the layout the rewriter expects (see docs/graph.md):

inputs   input_ids [batch, seq] int64, attention_mask [batch, total] int64,
         position_ids [batch, seq] int64, past_key_values.{i}.key/value [batch, kv_heads, past, head_dim]
outputs  logits [batch, seq, vocab], present.{i}.key/value [batch, kv_heads, total, head_dim]

Two exporters are supported, as tested with torch 2.13 (shared/reference/models.md §4):
``legacy`` (TorchScript, opsets up to 20; always decomposed attention) and ``dynamo``
(torch.export + onnxscript; opset 20 decomposed, opset 23 ``Attention``/``RotaryEmbedding``).
"""

from __future__ import annotations

import contextlib
import io
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

__all__ = ["ExportConfig", "export_hf_model", "load_hf_model", "kv_io_names"]

Exporter = Literal["legacy", "dynamo"]
EXPORTERS: tuple[str, ...] = ("legacy", "dynamo")


@dataclass(frozen=True, kw_only=True)
class ExportConfig:
    """How to export.

    exporter:  ``legacy`` (TorchScript) or ``dynamo`` (torch.export + onnxscript).
    opset:     ONNX opset; ``None`` = 17 for legacy, 20 for dynamo. Dynamo at 23 emits ``Attention``.
    external_data: save weights next to the model (needed above 2 GB; default only when large).
    """

    exporter: Exporter = "legacy"
    opset: int | None = None
    external_data: bool | None = None

    def __post_init__(self) -> None:
        if self.exporter not in EXPORTERS:
            raise ValueError(f"ExportConfig.exporter must be one of {', '.join(EXPORTERS)}; got {self.exporter!r}")
        if self.opset is not None:
            if isinstance(self.opset, bool) or not isinstance(self.opset, int):
                raise TypeError(f"ExportConfig.opset must be an int or None, got {self.opset!r}")
            lo, hi = (14, 20) if self.exporter == "legacy" else (18, 23)
            if not lo <= self.opset <= hi:
                raise ValueError(
                    f"ExportConfig.opset must be in [{lo}, {hi}] for the {self.exporter} exporter, got {self.opset}"
                )

    @property
    def resolved_opset(self) -> int:
        if self.opset is not None:
            return self.opset
        return 17 if self.exporter == "legacy" else 20


def kv_io_names(num_layers: int) -> tuple[list[str], list[str]]:
    """(input names, output names) of an exported model with ``num_layers`` layers."""
    ins = ["input_ids", "attention_mask", "position_ids"] + [
        f"past_key_values.{i}.{kv}" for i in range(num_layers) for kv in ("key", "value")
    ]
    outs = ["logits"] + [f"present.{i}.{kv}" for i in range(num_layers) for kv in ("key", "value")]
    return ins, outs


def load_hf_model(model_dir: str | Path, *, attn_implementation: str = "sdpa"):
    """Load a causal LM from a local Hugging Face directory in fp32, eval mode."""
    import torch
    from transformers import AutoModelForCausalLM

    path = Path(model_dir)
    if not path.is_dir():
        raise ValueError(f"model_dir must be an existing directory, got {str(model_dir)!r}")
    if not (path / "config.json").exists():
        raise ValueError(f"model_dir {str(path)!r} has no config.json: not a Hugging Face model directory")
    return AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, attn_implementation=attn_implementation
    ).eval()


def _wrapper(model):
    import torch
    from transformers import DynamicCache

    num_layers = model.config.num_hidden_layers

    class WithCache(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, input_ids, attention_mask, position_ids, *past):
            cache = DynamicCache(ddp_cache_data=[(past[2 * i], past[2 * i + 1]) for i in range(num_layers)])
            out = self.m(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                cache=cache,
                use_cache=True,
            )
            flat = []
            for layer in out.cache.layers:
                flat += [layer.keys, layer.values]
            return (out.logits, *flat)

    return WithCache(model)


class _Heartbeat:
    """Calls ``say`` every ``every`` seconds while a long step runs (exports take minutes on big models)."""

    def __init__(self, say: Callable[[str], None], what: str, every: float = 10.0) -> None:
        self.say, self.what, self.every = say, what, every
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        t0 = time.perf_counter()
        while not self._stop.wait(self.every):
            self.say(f"... still {self.what} ({time.perf_counter() - t0:.0f}s)")

    def __enter__(self) -> _Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def active_sliding_window(cfg) -> int | None:
    """The sliding window a transformers config really applies, or ``None`` for full attention.

    ``None`` when the config has no window, disables it (``use_sliding_window=False``), marks every
    layer ``full_attention``, or the window covers ``max_position_embeddings``.
    """
    window = getattr(cfg, "sliding_window", None)
    if window is None or getattr(cfg, "use_sliding_window", True) is False:
        return None
    layer_types = getattr(cfg, "layer_types", None)
    if layer_types and all(t == "full_attention" for t in layer_types):
        return None
    max_pos = getattr(cfg, "max_position_embeddings", None)
    if max_pos is not None and window >= max_pos:
        return None
    return int(window)


def export_hf_model(
    model,
    out_path: str | Path,
    *,
    config: ExportConfig = ExportConfig(),
    progress: Callable[[str], None] | None = None,
) -> Path:
    """Export ``model`` (a transformers causal LM, or a path to its directory) to ``out_path``.

    ``progress`` receives one-line status messages (loading, tracing, saving, timings).
    Returns the written path.
    """
    import torch

    say = progress or (lambda _msg: None)
    if not isinstance(config, ExportConfig):
        raise TypeError(f"config must be an ExportConfig, got {type(config).__name__}")
    out = Path(out_path)
    if out.suffix != ".onnx":
        raise ValueError(f"out_path must end in .onnx, got {str(out_path)!r}")
    t0 = time.perf_counter()
    if isinstance(model, (str, Path)):
        say(f"loading {model} ...")
        model = load_hf_model(model)
        say(f"loaded in {time.perf_counter() - t0:.1f}s")
    if not hasattr(model, "config") or not hasattr(model.config, "num_hidden_layers"):
        raise TypeError(f"model must be a transformers causal LM or a model directory, got {type(model).__name__}")
    cfg = model.config
    window = active_sliding_window(cfg)
    if window is not None:
        raise ValueError(
            f"model uses sliding-window attention (sliding_window={window} < max_position_embeddings="
            f"{getattr(cfg, 'max_position_embeddings', '?')}); the paged UCM attention ops model plain causal "
            "attention, so the rewritten graph would attend past the window. Export a full-attention config "
            "(e.g. sliding_window=None) instead"
        )
    num_layers = cfg.num_hidden_layers
    kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    in_names, out_names = kv_io_names(num_layers)
    # sample: B=2, S=3, past P=5 (avoid 0/1-sized dims when tracing)
    b, s, p = 2, 3, 5
    gen = torch.Generator().manual_seed(0)
    args = (
        torch.randint(0, cfg.vocab_size, (b, s), generator=gen),
        torch.ones(b, p + s, dtype=torch.int64),
        torch.arange(p, p + s).unsqueeze(0).expand(b, s).contiguous(),
        *[torch.randn(b, kv_heads, p, head_dim, generator=gen) for _ in range(2 * num_layers)],
    )
    wrapper = _wrapper(model).eval()
    out.parent.mkdir(parents=True, exist_ok=True)
    opset = config.resolved_opset
    say(f"exporting with the {config.exporter} exporter, opset {opset}, {num_layers} layers ...")
    t1 = time.perf_counter()
    sink = io.StringIO()
    with _Heartbeat(say, "exporting"), torch.no_grad(), warnings.catch_warnings(), contextlib.redirect_stdout(sink):
        warnings.simplefilter("ignore")
        if config.exporter == "legacy":
            torch.onnx.export(
                wrapper,
                args,
                str(out),
                dynamo=False,
                opset_version=opset,
                input_names=in_names,
                output_names=out_names,
                dynamic_axes={
                    "input_ids": {0: "batch", 1: "seq"},
                    "attention_mask": {0: "batch", 1: "total"},
                    "position_ids": {0: "batch", 1: "seq"},
                    "logits": {0: "batch", 1: "seq"},
                    **{n: {0: "batch", 2: "past"} for n in in_names[3:]},
                    **{n: {0: "batch", 2: "total"} for n in out_names[1:]},
                },
            )
        else:
            ds = [{0: "batch", 1: "seq"}, {0: "batch", 1: "total"}, {0: "batch", 1: "seq"}]
            past_ds = tuple({0: "batch", 2: "past"} for _ in range(2 * num_layers))
            prog = torch.onnx.export(
                wrapper,
                args,
                dynamo=True,
                opset_version=opset,
                dynamic_shapes=(ds[0], ds[1], ds[2], past_ds),
                input_names=in_names,
                output_names=out_names,
                verbose=False,
            )
            external = config.external_data
            if external is None:
                external = sum(t.numel() for t in model.parameters()) * 4 > 1_800_000_000
            prog.save(str(out), external_data=external)
    say(f"exported in {time.perf_counter() - t1:.1f}s -> {out}")
    return out
