"""PyTorch backend: a Hugging Face causal LM whose attention runs over the runtime's paged KV.

The attention is routed through transformers' public ``AttentionInterface`` registry under the
name ``"ucm_paged"`` (and an ``AttentionMaskInterface`` entry that builds no mask: the paged
attention applies causality and the block selection itself). The model is switched to it with
``model.set_attn_implementation("ucm_paged")`` — the documented transformers API; nothing is
monkey-patched. Each forward passes the step's :class:`~ucm_trt.runtime.step.StepContext` as the
``ucm_step`` keyword, which transformers forwards to every attention call, and runs with
``use_cache=False`` (the runtime owns the cache).

Attention implementation: ``"torch"`` (``runtime.torch_attention``, the CPU default), ``"triton"``
(``ucm_trt.kernels``; the CUDA default), or ``"auto"``.
"""

from __future__ import annotations

import torch

from ucm_trt.runtime.backends.base import Backend
from ucm_trt.runtime.step import StepContext, torch_attention_impl, triton_attention
from ucm_trt.sparse.policies.base import ModelShape

__all__ = ["UCM_ATTENTION", "TorchBackend", "register_ucm_attention"]

UCM_ATTENTION = "ucm_paged"


def _ucm_paged_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    step = kwargs.get("ucm_step")
    if not isinstance(step, StepContext):
        raise ValueError(
            f"attn_implementation {UCM_ATTENTION!r} needs the keyword ucm_step=<StepContext> in the model "
            f"forward, got {type(step).__name__}; run the model through ucm_trt.runtime (TorchBackend)"
        )
    if dropout:
        raise ValueError(f"{UCM_ATTENTION!r} attention is inference-only; got dropout={dropout}")
    for name in ("sliding_window", "softcap"):
        if kwargs.get(name) is not None:
            raise ValueError(
                f"layer {getattr(module, 'layer_idx', '?')} passes {name}={kwargs[name]!r}; the paged UCM "
                f"attention implements plain causal softmax attention only (no {name})"
            )
    out = step.attend(int(module.layer_idx), query, key, value, scaling)
    return out.transpose(1, 2).contiguous(), None


def _no_mask(*args, **kwargs):
    return None


def register_ucm_attention() -> None:
    """Register ``"ucm_paged"`` in transformers' attention and mask registries (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(UCM_ATTENTION, _ucm_paged_attention)
    AttentionMaskInterface.register(UCM_ATTENTION, _no_mask)


def _rope_theta(cfg) -> float:
    params = getattr(cfg, "rope_parameters", None)
    if isinstance(params, dict) and "rope_theta" in params:
        rope_type = params.get("rope_type", "default")
        if rope_type not in ("default", None):
            raise ValueError(
                f"the model uses rope_type={rope_type!r}; the paged KV runtime supports default RoPE only"
            )
        return float(params["rope_theta"])
    theta = getattr(cfg, "rope_theta", None)
    if theta is None:
        raise ValueError("model config has neither rope_parameters['rope_theta'] nor rope_theta")
    return float(theta)


def model_shape(cfg) -> ModelShape:
    heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    return ModelShape(
        num_layers=cfg.num_hidden_layers,
        num_q_heads=heads,
        num_kv_heads=getattr(cfg, "num_key_value_heads", None) or heads,
        head_dim=head_dim,
        rope_theta=_rope_theta(cfg),
        max_positions=getattr(cfg, "max_position_embeddings", 1 << 30),
    )


class TorchBackend(Backend):
    """Run a Hugging Face decoder LM (Llama/Qwen2-style attention) on the paged runtime.

    Parameters
    ----------
    model:
        A ``PreTrainedModel`` for causal LM, in eval mode. It is switched to the ``"ucm_paged"``
        attention implementation.
    attention:
        ``"auto"`` (Triton kernels on CUDA, the PyTorch attention on CPU), ``"torch"``
        (:mod:`ucm_trt.runtime.torch_attention`) or ``"triton"``. ``"reference"``, its former name
        (when it ran the test oracle), still selects ``"torch"``.
    validate:
        Debug switch: the Triton launchers also check the contents of their index tensors (block
        tables, selections, lengths) at every launch, which reads them back to the host (2*B+2
        syncs per layer per step) and rules out CUDA graphs. Off by default: the engine checks the
        tables and selections on the host where it builds them (once per plan, see
        ``Engine._check_step_indices``), so the launch path stays sync-free.
    """

    def __init__(self, model, *, attention: str = "auto", validate: bool = False) -> None:
        try:
            from transformers import PreTrainedModel
        except ImportError as exc:  # pragma: no cover - transformers is a dependency
            raise ImportError("TorchBackend needs transformers: pip install transformers") from exc
        if not isinstance(model, PreTrainedModel):
            raise TypeError(f"model must be a transformers PreTrainedModel, got {type(model).__name__}")
        if attention not in ("auto", "torch", "reference", "triton"):
            raise ValueError(f"attention must be 'auto', 'torch' or 'triton', got {attention!r}")
        if model.training:
            raise ValueError("model must be in eval mode (call model.eval()); the runtime is inference-only")
        self.model = model
        self.shape = model_shape(model.config)
        param = next(model.parameters())
        self.device = param.device
        self.kv_dtype = param.dtype
        if attention == "auto":
            attention = "triton" if self.device.type == "cuda" else "torch"
        self.attention = triton_attention(validate=validate) if attention == "triton" else torch_attention_impl()
        # capturable when the attention launches only device work: Triton kernels without index checks
        self.supports_cuda_graph = self.device.type == "cuda" and attention == "triton" and not validate
        register_ucm_attention()
        if model.config._attn_implementation != UCM_ATTENTION:
            model.set_attn_implementation(UCM_ATTENTION)

    def attention_name(self) -> str:
        return self.attention.name

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, step: StepContext) -> torch.Tensor:
        out = self.model(input_ids=input_ids, position_ids=positions, use_cache=False, logits_to_keep=1,
                         ucm_step=step)
        if step.layers_run != self.shape.num_layers:
            raise RuntimeError(
                f"the model ran {step.layers_run} attention layers through {UCM_ATTENTION!r}, expected "
                f"{self.shape.num_layers}; its attention does not use the transformers AttentionInterface"
            )
        return out.logits[:, -1].float()
