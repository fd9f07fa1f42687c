"""Attention rewrite rules, in the order the driver tries them (first match per anchor wins)."""

from ucm_trt.graph.rules.base import AttentionMatch, Failure, Rule
from ucm_trt.graph.rules.contrib import GroupQueryAttentionRule, MultiHeadAttentionRule
from ucm_trt.graph.rules.decomposed import DecomposedAttentionRule
from ucm_trt.graph.rules.onnx_attention import OnnxAttentionRule

# Anchors that look like attention but no rule handles: reported as unsupported.
UNSUPPORTED_ANCHORS: dict[tuple[str, str], str] = {
    ("com.microsoft", "Attention"): "com.microsoft.Attention (packed QKV weights inside the op) is not supported",
    ("com.microsoft", "PackedAttention"): "com.microsoft.PackedAttention is not supported",
    ("com.microsoft", "PackedMultiHeadAttention"): "com.microsoft.PackedMultiHeadAttention is not supported",
    ("com.microsoft", "SparseAttention"): "com.microsoft.SparseAttention is not supported",
    ("com.microsoft", "PagedAttention"): "com.microsoft.PagedAttention is not supported",
    ("com.microsoft", "DecoderMaskedMultiHeadAttention"): "com.microsoft.DecoderMaskedMultiHeadAttention is not supported",
}


def default_rules() -> tuple[Rule, ...]:
    return (OnnxAttentionRule(), DecomposedAttentionRule(), GroupQueryAttentionRule(), MultiHeadAttentionRule())


__all__ = [
    "AttentionMatch",
    "Failure",
    "Rule",
    "DecomposedAttentionRule",
    "OnnxAttentionRule",
    "GroupQueryAttentionRule",
    "MultiHeadAttentionRule",
    "UNSUPPORTED_ANCHORS",
    "default_rules",
]
