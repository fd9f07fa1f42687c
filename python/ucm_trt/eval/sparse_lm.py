"""Real sparse-attention inference of a Hugging Face decoder on the CPU, for accuracy studies.

The model runs its ordinary forward; only its attention is swapped, through transformers'
``AttentionInterface`` registry (no monkey-patching). The registered function,
``ucm_trt_eval_sparse``, receives the post-RoPE ``query [B, Hq, Tq, D]`` and the grouped
``key``/``value [B, Hkv, Tk, D]`` of the cache after the update. For a call with cached context
(``Tk > Tq``) in a non-rollback layer it

1. lays the keys and values out as a paged KV pool ``[nb, 2, Hkv, block_size, D]`` (identity block
   table, ``nb = ceil(Tk / block_size)``),
2. asks the per-call *selector* for a block selection ``[B, Hkv, S]`` (DESIGN §3: logical block ids,
   ascending, ``-1`` padded, sink and local windows included) computed from the chunk's queries, and
3. returns :func:`ucm_trt.reference.paged_sparse_attention` on that selection: the queries see the
   selected blocks plus, causally, their own chunk.

Calls without cached context (dense prefill) and rollback layers run transformers' SDPA, exactly
as the unmodified model. The per-call state (selector, rollback layers, statistics) travels as a
forward keyword argument, so the registry entry itself is stateless.

:class:`PrefixCache` holds a dense prefill's K/V so that many sparse configurations can continue
from the same prefix; :func:`continuation_nll` scores a continuation chunk by chunk (perplexity),
and :func:`greedy_generate` decodes greedily (passkey retrieval).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

from ucm_trt._validation import check_positive_int, check_tensor

__all__ = [
    "SPARSE_EVAL_ATTN_IMPLEMENTATION",
    "Selector",
    "SparseRun",
    "PrefixCache",
    "prefill",
    "sparse_forward",
    "continuation_nll",
    "greedy_generate",
]

SPARSE_EVAL_ATTN_IMPLEMENTATION = "ucm_trt_eval_sparse"
_CTX_KWARG = "ucm_trt_sparse_eval_run"
_BASE_IMPLEMENTATIONS = ("sdpa", SPARSE_EVAL_ATTN_IMPLEMENTATION)

# selector(layer, query [B, Hq, Tq, D], key [B, Hkv, Tk, D], block_size) -> selection int32 [B, Hkv, S]
Selector = Callable[[int, torch.Tensor, torch.Tensor, int], torch.Tensor]


@dataclass
class SparseRun:
    """Per-call state of a sparse forward.

    Attributes
    ----------
    selector:
        Computes the selection of a layer from the chunk's queries and all keys; see :data:`Selector`.
        ``None`` runs every layer dense (the reference for "dense" rows).
    block_size:
        KV block size in tokens.
    rollback_layers:
        Layers that run dense (diffuse layers, DESIGN §5).
    observe_window:
        In a dense prefill call (no cached context), record per layer the attention mass that the
        last ``observe_window`` queries give each key (:func:`ucm_trt.sparse.representations.attention_token_weights`)
        into ``observed[layer]`` (``[B, Hkv, T]``); 0 records nothing. Used by ``weighted_mean``.
    kept_blocks, total_blocks:
        Filled in during the forward: selected and valid blocks summed over calls, batch rows and KV
        heads of the sparse layers (the measured density of the run).
    """

    selector: Selector | None
    block_size: int
    rollback_layers: frozenset[int] = frozenset()
    observe_window: int = 0
    observed: dict[int, torch.Tensor] = field(default_factory=dict)
    kept_blocks: int = 0
    total_blocks: int = 0
    sparse_calls: int = 0

    def __post_init__(self) -> None:
        check_positive_int("block_size", self.block_size)
        if isinstance(self.observe_window, bool) or not isinstance(self.observe_window, int) or self.observe_window < 0:
            raise ValueError(f"observe_window must be an int >= 0, got {self.observe_window!r}")
        if self.selector is not None and not callable(self.selector):
            raise TypeError(f"selector must be callable or None, got {type(self.selector).__name__}")
        self.rollback_layers = frozenset(self.rollback_layers)
        for layer in self.rollback_layers:
            if isinstance(layer, bool) or not isinstance(layer, int) or layer < 0:
                raise ValueError(f"rollback_layers must hold ints >= 0, got {layer!r}")

    @property
    def density(self) -> float | None:
        """Fraction of valid blocks that were selected in the sparse layers (``None``: no sparse call)."""
        return None if self.total_blocks == 0 else self.kept_blocks / self.total_blocks


def _paged_layout(key: torch.Tensor, value: torch.Tensor, block_size: int):
    """``key``/``value [B, Hkv, Tk, D]`` -> pool ``[B*nb, 2, Hkv, bs, D]``, block table, seq lens."""
    b, hkv, tk, d = key.shape
    nb = (tk + block_size - 1) // block_size
    pad = nb * block_size - tk
    kv = torch.stack([key, value], dim=1)  # [B, 2, Hkv, Tk, D]
    if pad:
        kv = torch.cat([kv, kv.new_zeros((b, 2, hkv, pad, d))], dim=3)
    pool = kv.reshape(b, 2, hkv, nb, block_size, d).permute(0, 3, 1, 2, 4, 5).reshape(b * nb, 2, hkv, block_size, d)
    table = torch.arange(b * nb, dtype=torch.int32, device=key.device).reshape(b, nb)
    seq_lens = torch.full((b,), tk, dtype=torch.int32, device=key.device)
    return pool, table, seq_lens, nb


def _sparse_eval_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from ucm_trt.reference import paged_sparse_attention

    run: SparseRun | None = kwargs.pop(_CTX_KWARG, None)
    layer = getattr(module, "layer_idx", None)
    tq, tk = query.shape[2], key.shape[2]
    if run is not None and run.observe_window and tq == tk:
        from ucm_trt.sparse.representations import attention_token_weights

        w = min(run.observe_window, tq)
        run.observed[layer] = attention_token_weights(query[:, :, -w:], key, scale=kwargs.get("scaling"))
    if run is None or run.selector is None or tq >= tk or layer in run.rollback_layers:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    if layer is None:
        raise ValueError(f"attention module {type(module).__name__} has no layer_idx; sparse eval needs it")
    if kwargs.get("sliding_window") is not None:
        raise ValueError(
            f"layer {layer} uses sliding-window attention (window {kwargs['sliding_window']}); the sparse "
            "evaluation supports full-attention layers only"
        )
    if tq > run.block_size:
        raise ValueError(
            f"a sparse chunk of {tq} queries is longer than block_size {run.block_size}; the chunk must lie "
            "inside the local window, so use chunk <= block_size"
        )
    pool, table, seq_lens, nb = _paged_layout(key, value, run.block_size)
    selection = run.selector(layer, query, key, run.block_size)
    check_tensor("selection", selection, ndim=3, dtypes=(torch.int32,), shape=(key.shape[0], key.shape[1], None))
    out = paged_sparse_attention(query, pool, table, seq_lens, selection, scale=kwargs.get("scaling"))
    run.kept_blocks += int((selection >= 0).sum())
    run.total_blocks += nb * selection.shape[0] * selection.shape[1]
    run.sparse_calls += 1
    return out.to(query.dtype).transpose(1, 2).contiguous(), None


def _ensure_registered() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    if AttentionInterface._global_mapping.get(SPARSE_EVAL_ATTN_IMPLEMENTATION) is not _sparse_eval_attention:
        AttentionInterface.register(SPARSE_EVAL_ATTN_IMPLEMENTATION, _sparse_eval_attention)
    if AttentionMaskInterface._global_mapping.get(SPARSE_EVAL_ATTN_IMPLEMENTATION) is not sdpa_mask:
        AttentionMaskInterface.register(SPARSE_EVAL_ATTN_IMPLEMENTATION, sdpa_mask)


def _check_model(model: Any) -> None:
    config = getattr(model, "config", None)
    impl = getattr(config, "_attn_implementation", None)
    if impl not in _BASE_IMPLEMENTATIONS:
        raise ValueError(
            f"model must be loaded with attn_implementation='sdpa' for sparse evaluation (dense layers "
            f"delegate to SDPA), got {impl!r}"
        )


@dataclass(frozen=True)
class PrefixCache:
    """K/V of a dense prefill: ``layers[i] = (k, v)`` each ``[B, Hkv, T, D]``; never mutated."""

    layers: tuple[tuple[torch.Tensor, torch.Tensor], ...]
    length: int
    last_logits: torch.Tensor  # [B, vocab] logits at the last prefix position
    token_weights: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> [B, Hkv, T]

    def fresh_cache(self) -> Any:
        """A new ``DynamicCache`` holding the prefix (appends go to new tensors; the prefix is shared)."""
        from transformers import DynamicCache

        return DynamicCache(ddp_cache_data=list(self.layers))


def prefill(model: Any, input_ids: torch.Tensor, *, observe_window: int = 0) -> PrefixCache:
    """Dense forward over ``input_ids [B, T]`` (no padding); returns its K/V and last logits.

    With ``observe_window > 0`` the prefix also records, per layer, the attention mass that its
    last ``observe_window`` queries give each token (``PrefixCache.token_weights[layer]`` ``[B, Hkv, T]``).
    """
    check_tensor("input_ids", input_ids, ndim=2, dtypes=(torch.int64, torch.int32))
    if input_ids.shape[1] == 0:
        raise ValueError("input_ids must hold at least one token, got shape " f"{tuple(input_ids.shape)}")
    from transformers import DynamicCache

    run = SparseRun(selector=None, block_size=1, observe_window=observe_window)
    cache = DynamicCache()
    out = sparse_forward(model, input_ids.to(torch.int64), cache, run)
    layers = tuple((layer.keys, layer.values) for layer in out.cache.layers)
    return PrefixCache(
        layers=layers, length=int(input_ids.shape[1]), last_logits=out.logits[:, -1].float(),
        token_weights=dict(run.observed),
    )


def sparse_forward(model: Any, input_ids: torch.Tensor, cache: Any, run: SparseRun) -> Any:
    """One forward of ``input_ids [B, Tq]`` continuing ``cache`` with sparse attention per ``run``."""
    if not isinstance(run, SparseRun):
        raise TypeError(f"run must be a SparseRun, got {type(run).__name__}")
    _check_model(model)
    _ensure_registered()
    past = cache.get_seq_length()
    tq = input_ids.shape[1]
    position_ids = torch.arange(past, past + tq, dtype=torch.int64)[None].expand(input_ids.shape[0], tq)
    original = model.config._attn_implementation
    model.set_attn_implementation(SPARSE_EVAL_ATTN_IMPLEMENTATION)
    try:
        with torch.no_grad():
            out = model(
                input_ids=input_ids, cache=cache, use_cache=True, position_ids=position_ids,
                **{_CTX_KWARG: run},
            )
    finally:
        model.set_attn_implementation(original)
    return out


def _chunks(total: int, chunk: int) -> Iterable[tuple[int, int]]:
    for start in range(0, total, chunk):
        yield start, min(total, start + chunk)


def continuation_nll(
    model: Any, prefix: PrefixCache, continuation: torch.Tensor, run: SparseRun, *, chunk: int
) -> tuple[float, int]:
    """Summed negative log-likelihood (nats) of ``continuation [1, N]`` after ``prefix``.

    The continuation is fed in chunks of ``chunk`` tokens with sparse attention: each chunk's
    selection is computed from the chunk's own queries (retrieval once per chunk, like a decode
    retrieval stride of ``chunk``). Token ``j`` of the continuation is predicted from the logits
    before it (the first one from the prefix's last logits, which are dense). Returns ``(nll, N)``.
    """
    if not isinstance(prefix, PrefixCache):
        raise TypeError(f"prefix must be a PrefixCache, got {type(prefix).__name__}")
    check_tensor("continuation", continuation, ndim=2, dtypes=(torch.int64, torch.int32), shape=(1, None))
    check_positive_int("chunk", chunk)
    n = continuation.shape[1]
    if n == 0:
        raise ValueError("continuation must hold at least one token")
    cache = prefix.fresh_cache()
    logits = [prefix.last_logits[:, None]]
    for start, end in _chunks(n - 1, chunk):
        out = sparse_forward(model, continuation[:, start:end], cache, run)
        logits.append(out.logits.float())
    pred = torch.cat(logits, dim=1)[0, :n]  # [N, vocab]; position j predicts continuation[j]
    nll = torch.nn.functional.cross_entropy(pred, continuation[0].to(torch.int64), reduction="sum")
    value = float(nll)
    if not math.isfinite(value):
        raise RuntimeError(f"non-finite NLL {value} in a sparse run; the selection left a query with no key")
    return value, n


def greedy_generate(
    model: Any, prefix: PrefixCache, suffix: torch.Tensor, run: SparseRun, *, max_new_tokens: int, chunk: int
) -> list[int]:
    """Greedy decoding after ``prefix``: feed ``suffix [1, S]`` (``S >= 1``) with sparse attention in
    chunks of ``chunk`` tokens (each chunk's selection comes from its own queries), then decode
    ``max_new_tokens`` tokens one at a time, each step with sparse attention. Returns the new ids."""
    if not isinstance(prefix, PrefixCache):
        raise TypeError(f"prefix must be a PrefixCache, got {type(prefix).__name__}")
    check_tensor("suffix", suffix, ndim=2, dtypes=(torch.int64, torch.int32), shape=(1, None))
    if suffix.shape[1] == 0:
        raise ValueError("suffix must hold at least one token (it is decoded sparsely)")
    check_positive_int("max_new_tokens", max_new_tokens)
    check_positive_int("chunk", chunk)
    cache = prefix.fresh_cache()
    ids = suffix.to(torch.int64)
    for start, end in _chunks(ids.shape[1], chunk):
        out = sparse_forward(model, ids[:, start:end], cache, run)
    generated: list[int] = []
    for step in range(max_new_tokens):
        nxt = int(out.logits[0, -1].argmax())
        generated.append(nxt)
        if step + 1 < max_new_tokens:
            out = sparse_forward(model, torch.tensor([[nxt]], dtype=torch.int64), cache, run)
    return generated
