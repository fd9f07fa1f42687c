"""UCM algorithms behind one policy interface (:class:`~ucm_trt.sparse.policies.base.Policy`).

============== ======================= =======================================================
name           class                   retrieval
============== ======================= =======================================================
dense          DensePolicy             none (baseline)
esa            ESAPolicy               CPU, mean-K dot, stride submit/collect, offload
gsa            GSAPolicy               CPU, mean-K dot, one-step lag, prefetch engine, offload
gsa-on-device  GSAOnDevicePolicy       on device, hash + Hamming top-k per layer, gate/rollback
kvstar         KVStarPolicy            CPU, sub-block multi-query voting, one-stride lag, offload
rerope         ReRoPEPolicy            none; ReRoPE attention over un-rotated K
============== ======================= =======================================================
"""

from ucm_trt.sparse.policies._offload import RetrievalConfig
from ucm_trt.sparse.policies.base import ModelShape, Policy, PolicyRuntime, RequestView
from ucm_trt.sparse.policies.dense import DensePolicy
from ucm_trt.sparse.policies.esa import ESAPolicy
from ucm_trt.sparse.policies.gsa import GSAPolicy
from ucm_trt.sparse.policies.gsa_on_device import GSAOnDevicePolicy
from ucm_trt.sparse.policies.kvstar import KVStarPolicy
from ucm_trt.sparse.policies.rerope import ReRoPEPolicy

__all__ = [
    "DensePolicy",
    "ESAPolicy",
    "GSAOnDevicePolicy",
    "GSAPolicy",
    "KVStarPolicy",
    "ModelShape",
    "Policy",
    "PolicyRuntime",
    "ReRoPEPolicy",
    "RequestView",
    "RetrievalConfig",
]
