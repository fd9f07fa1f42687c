"""Kernel tests run on the GPU when CUDA is there, else on the CPU through Triton's interpreter.

The root conftest sets ``TRITON_INTERPRET=1`` when no CUDA device is present (before any test
module imports ``triton.jit`` code) and skips ``gpu``-marked tests there.
"""

from __future__ import annotations

import os

import pytest
import torch

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
DEVICE = torch.device("cpu") if INTERPRET or not torch.cuda.is_available() else torch.device("cuda")


@pytest.fixture
def device() -> torch.device:
    return DEVICE
