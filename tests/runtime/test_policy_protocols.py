"""The policies see the runtime only through the protocols of ``sparse.policies.base`` (KVAccess,
TaskRunner, RetrievalTicket), so ``sparse`` imports no runtime module; the runtime's KV manager,
worker and tickets must provide every member the protocols declare."""

from __future__ import annotations

import torch

from ucm_trt.config import SparseConfig
from ucm_trt.runtime import Engine, RuntimeConfig, TorchBackend
from ucm_trt.runtime.algorithms import make_policy
from ucm_trt.sparse.policies.base import KVAccess, RetrievalTicket, TaskRunner


def _members(proto) -> set[str]:
    names = set(getattr(proto, "__annotations__", {}))
    names |= {n for n, v in vars(proto).items() if not n.startswith("_") and (callable(v) or isinstance(v, property))}
    return names


def test_the_runtime_objects_provide_every_protocol_member(tiny_model):
    with Engine(TorchBackend(tiny_model, attention="torch"), make_policy("esa"), sparse=SparseConfig(block_size=16),
                config=RuntimeConfig(max_seq_len=128)) as eng:  # fmt: skip
        rt = eng.policy.rt
        ticket = rt.worker.submit(lambda: (torch.zeros(1), 0.0), what="probe")
        ticket.result()
        for proto, obj in ((KVAccess, rt.kv), (TaskRunner, rt.worker), (RetrievalTicket, ticket)):
            members = _members(proto)
            assert members, proto
            missing = sorted(m for m in members if not hasattr(obj, m))
            assert missing == [], f"{type(obj).__name__} lacks {missing} of {proto.__name__}"
