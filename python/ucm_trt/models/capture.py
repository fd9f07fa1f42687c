"""Capture post-RoPE queries and keys of chosen layers in one ordinary forward pass.

This uses transformers' attention-function registry, not monkey-patching. One function,
``ucm_trt_capture_qk``, is registered in ``transformers.AttentionInterface``, with the SDPA mask
builder registered under the same name in ``AttentionMaskInterface``. It receives exactly what
the model's attention would: ``query [B, Hq, T, D]`` after RoPE, and ``key``/``value
[B, Hkv, Tk, D]`` after RoPE and the cache update, still grouped (not repeated to Hq heads). It
records the query and key of the requested layers into a per-call sink passed as a forward
keyword argument, then calls transformers' SDPA attention. The forward is therefore exactly the
model's SDPA forward.

The registry entry is stateless. All per-call state lives in the sink object that
:func:`forward_with_capture` creates, so concurrent captures on different models do not interact.
While it runs, :func:`forward_with_capture` switches the model to the capture implementation, and it
restores the previous one afterwards, also when the forward raises.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

from .._validation import check_tensor

__all__ = ["CAPTURE_ATTN_IMPLEMENTATION", "capture_qk", "forward_with_capture"]

CAPTURE_ATTN_IMPLEMENTATION = "ucm_trt_capture_qk"
_SINK_KWARG = "ucm_trt_qk_sink"
# The base implementation the capture delegates to. Models must run with it, so that the mask
# builder and the attention math during capture are the same as without capture.
_BASE_IMPLEMENTATION = "sdpa"


@dataclass
class _QKSink:
    layers: frozenset[int]
    records: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)


def _capture_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    sink = kwargs.pop(_SINK_KWARG, None)
    if sink is not None:
        layer = getattr(module, "layer_idx", None)
        if layer is None:
            raise ValueError(
                f"attention module {type(module).__name__} has no layer_idx; capture_qk needs it to "
                "tell layers apart"
            )
        if layer in sink.layers:
            if layer in sink.records:
                raise ValueError(
                    f"layer {layer} ran its attention twice in one captured forward; capture_qk "
                    "supports one forward pass per call"
                )
            sink.records[layer] = (query.detach().clone(), key.detach().clone())
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def _ensure_registered() -> None:
    """Register the capture function and its mask builder (idempotent, stateless)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    if AttentionInterface._global_mapping.get(CAPTURE_ATTN_IMPLEMENTATION) is not _capture_attention:
        AttentionInterface.register(CAPTURE_ATTN_IMPLEMENTATION, _capture_attention)
    if AttentionMaskInterface._global_mapping.get(CAPTURE_ATTN_IMPLEMENTATION) is not sdpa_mask:
        AttentionMaskInterface.register(CAPTURE_ATTN_IMPLEMENTATION, sdpa_mask)


def _num_layers(model: torch.nn.Module) -> int:
    config = getattr(model, "config", None)
    n = getattr(config, "num_hidden_layers", None)
    if not isinstance(n, int) or n <= 0:
        raise TypeError(
            f"model must be a transformers decoder model whose config has num_hidden_layers, got "
            f"{type(model).__name__}"
        )
    return n


def _check_layers(layers: Iterable[int] | int | None, num_layers: int) -> tuple[int, ...]:
    if layers is None:
        return tuple(range(num_layers))
    if isinstance(layers, bool) or isinstance(layers, int):
        raise TypeError(
            f"layers must be an iterable of ints or None, got the int {layers!r}; wrap it: [{layers}]"
        )
    try:
        items = list(layers)
    except TypeError:
        raise TypeError(
            f"layers must be an iterable of ints or None, got {layers!r} ({type(layers).__name__})"
        ) from None
    if not items:
        raise ValueError("layers must name at least one layer (or be None for all), got an empty sequence")
    out: list[int] = []
    for layer in items:
        if isinstance(layer, bool) or not isinstance(layer, int):
            raise TypeError(f"layers must hold ints, got {layer!r} ({type(layer).__name__}) in {items!r}")
        if not 0 <= layer < num_layers:
            raise ValueError(f"layers must lie in [0, {num_layers}) for this model, got {layer} in {items!r}")
        if layer in out:
            raise ValueError(f"layers must not repeat a layer, got {layer} twice in {items!r}")
        out.append(layer)
    return tuple(out)


def forward_with_capture(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    layers: Iterable[int] | None = None,
    **forward_kwargs: Any,
) -> tuple[Any, dict[int, tuple[torch.Tensor, torch.Tensor]]]:
    """Run ``model(input_ids=input_ids, **forward_kwargs)`` under ``torch.no_grad`` and capture Q/K.

    Parameters
    ----------
    model:
        A transformers decoder model (Llama/Qwen-style attention modules with ``layer_idx``) loaded
        with ``attn_implementation="sdpa"``.
    input_ids:
        Integer tensor ``[B, T]``.
    layers:
        Layer indices to capture, or ``None`` for all layers.
    forward_kwargs:
        Passed to the model's forward unchanged (``attention_mask``, ``position_ids``, ``cache``,
        ``use_cache`` ...).

    Returns
    -------
    (outputs, captures):
        The model's usual output object, and ``{layer: (q, k)}`` with ``q`` ``[B, Hq, T, D]`` and
        ``k`` ``[B, Hkv, Tk, D]``, both after RoPE, in the model's dtype. ``Tk`` counts the cached
        past tokens too when a ``cache`` is passed.
    """
    num_layers = _num_layers(model)
    check_tensor("input_ids", input_ids, ndim=2, dtypes=(torch.int32, torch.int64))
    if input_ids.shape[0] == 0 or input_ids.shape[1] == 0:
        raise ValueError(
            f"input_ids must have at least one row and one token, got shape {tuple(input_ids.shape)}"
        )
    wanted = _check_layers(layers, num_layers)
    if _SINK_KWARG in forward_kwargs:
        raise ValueError(f"forward_kwargs must not contain the reserved key {_SINK_KWARG!r}")
    original = model.config._attn_implementation
    if original not in (_BASE_IMPLEMENTATION, CAPTURE_ATTN_IMPLEMENTATION):
        raise ValueError(
            f"model must use attn_implementation={_BASE_IMPLEMENTATION!r} for Q/K capture (the capture "
            f"delegates to SDPA so that the forward is unchanged), got {original!r}; reload it with "
            f"attn_implementation={_BASE_IMPLEMENTATION!r} or call model.set_attn_implementation("
            f"{_BASE_IMPLEMENTATION!r})"
        )

    _ensure_registered()
    sink = _QKSink(layers=frozenset(wanted))
    model.set_attn_implementation(CAPTURE_ATTN_IMPLEMENTATION)
    try:
        with torch.no_grad():
            outputs = model(input_ids=input_ids, **forward_kwargs, **{_SINK_KWARG: sink})
    finally:
        model.set_attn_implementation(original)

    missing = [layer for layer in wanted if layer not in sink.records]
    if missing:
        raise RuntimeError(
            f"layers {missing} were requested but their attention never reached the capture function; "
            f"{type(model).__name__} does not route attention through transformers' AttentionInterface "
            "for those layers"
        )
    return outputs, {layer: sink.records[layer] for layer in wanted}


def capture_qk(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    layers: Iterable[int] | None = None,
) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Post-RoPE queries and keys of the chosen layers from one forward pass over ``input_ids``.

    Parameters
    ----------
    model:
        A transformers decoder model loaded with ``attn_implementation="sdpa"`` (for example from
        :func:`ucm_trt.models.load_smollm2`).
    input_ids:
        Integer tensor ``[B, T]``. All tokens are attended causally, with no padding and no cache.
    layers:
        Layer indices to capture, or ``None`` for all.

    Returns
    -------
    dict
        ``{layer: (q, k)}`` in the order of ``layers``. ``q`` is ``[B, Hq, T, D]`` and ``k`` is
        ``[B, Hkv, T, D]``, not repeated for GQA. Both are rotated at positions ``0..T-1`` and
        are in the model's dtype.

    Example
    -------
    >>> model, tok = load_smollm2()
    >>> ids = tok("The grass is green.", return_tensors="pt").input_ids
    >>> q, k = capture_qk(model, ids, layers=[10])[10]   # [1, 9, T, 64], [1, 3, T, 64]
    """
    _, captures = forward_with_capture(model, input_ids, layers, use_cache=False)
    return captures
