"""Fixtures shared by the tests of tests/sparse."""

from __future__ import annotations

import pytest
import torch

from ucm_trt.sparse.policies.base import ModelShape, PolicyRuntime


def _bind(policy, layers, hq, hkv, d, sparse):
    """Bind ``policy`` to a CPU runtime without KV manager or worker (host-side scoring tests)."""
    shape = ModelShape(num_layers=layers, num_q_heads=hq, num_kv_heads=hkv, head_dim=d, rope_theta=1e4,
                       max_positions=1 << 16)
    policy.bind(PolicyRuntime(shape=shape, sparse=sparse, kv=None, worker=None, device=torch.device("cpu")))
    return policy


@pytest.fixture
def bind_policy():
    """``bind_policy(policy, layers, hq, hkv, d, sparse)`` -> the policy, bound to a bare CPU runtime."""
    return _bind
