"""The algorithm registry (ucm_trt.algorithms): every consumer sees the same names, the declared
capabilities are the policies' real ones, and every incompatible combination is refused with the
one message ``algorithm 'X' cannot be combined with OPTION: RULE``."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from ucm_trt import algorithms as registry
from ucm_trt.config import GSAOnDeviceConfig, KVStarConfig, ReRoPEConfig

ONE_MESSAGE = re.compile(r"^algorithm '[a-z-]+' cannot be combined with .+: .+")


def test_every_consumer_reads_the_registry_names():
    from ucm_trt import cli
    from ucm_trt.chat import _names
    from ucm_trt.graph import driver
    from ucm_trt.runtime import algorithms, cli_run

    names = registry.names()
    assert names == ("dense", "esa", "gsa", "gsa-on-device", "kvstar", "blend", "rerope")
    assert cli.ALGORITHMS == driver.ALGORITHMS == algorithms.ALGORITHMS == cli_run.RUN_ALGORITHMS == names
    assert _names.ALGORITHMS == names
    assert _names.CHAT_ALGORITHMS == algorithms.POLICY_ALGORITHMS == registry.names("policy")
    assert algorithms.PREFILL_ALGORITHMS == registry.names("prefill") == ("blend",)
    rewrite = next(a for a in cli.build_parser()._subparsers._group_actions[0].choices["rewrite"]._actions
                   if a.dest == "algorithm")  # fmt: skip
    assert tuple(rewrite.choices) == names


def test_the_registry_imports_no_torch():
    code = "import sys, ucm_trt.algorithms as r; r.names(); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def _overrides(cls, name: str) -> bool:
    from ucm_trt.sparse.policies.base import Policy

    return getattr(cls, name) is not getattr(Policy, name)


@pytest.mark.parametrize("name", registry.names("policy"))
def test_declared_capabilities_are_the_policy_classes(name):
    """What a spec declares is what its class does: offload, where blocks are chosen, queries read,
    the SparseConfig it scores with, the graph the rewrite emits."""
    from ucm_trt.runtime.algorithms import make_policy, sparse_config_for

    spec = registry.get(name)
    kw = {"rerope": ReRoPEConfig(window=8, training_length=64)} if "rerope=" in spec.required else {}
    policy = make_policy(name, **kw)
    assert type(policy) is spec.load() and policy.name == name
    assert policy.offload is spec.offload
    assert _overrides(type(policy), "layer_selection") is (spec.retrieval == "gpu")
    assert _overrides(type(policy), "after_step") is spec.needs_queries
    assert (spec.retrieval == "cpu") is spec.needs_queries
    cfg = sparse_config_for(name)
    assert (cfg.representation, cfg.scoring) == (spec.representation, spec.scoring)
    assert (spec.graph_op == "rerope") is (policy.rerope is not None)


def test_the_rewrite_reads_graph_op_and_selection_inputs():
    from ucm_trt.graph.driver import RewriteConfig

    rr = ReRoPEConfig(window=8, training_length=64)
    for name in registry.names():
        spec = registry.get(name)
        cfg = RewriteConfig(algorithm=name, block_size=16, rerope=rr if spec.graph_op == "rerope" else None)
        assert cfg.graph_op == spec.graph_op
        assert cfg.with_selection is (spec.graph_op == "sparse")


def test_blend_runner_is_the_prefill_entry():
    from ucm_trt.runtime.blend import BlendRunner

    assert registry.get("blend").load() is BlendRunner


# ------------------------------------------------------------------------------- refusals


def _refused(excinfo, algorithm: str, option: str):
    msg = str(excinfo.value)
    assert isinstance(excinfo.value, registry.IncompatibleAlgorithmError), msg
    assert ONE_MESSAGE.match(msg), msg
    assert msg.startswith(f"algorithm {algorithm!r} cannot be combined with {option}: ")
    assert excinfo.value.rule and excinfo.value.rule in msg


# every make_policy option an algorithm does not take
OPTION_VALUES = {
    "kvstar=": KVStarConfig(),
    "gsa_on_device=": GSAOnDeviceConfig(),
    "rerope=": ReRoPEConfig(window=8, training_length=64),
    "retrieval=": None,  # built below (needs torch-side import)
    "dense_layers=": None,
    "adaptive=": None,
}


def _option_value(option: str):
    from ucm_trt.config import AdaptiveBudget, DenseLayers, HeadMerge, PrefillWindow
    from ucm_trt.sparse.policies import RetrievalConfig

    return {**OPTION_VALUES, "retrieval=": RetrievalConfig(), "dense_layers=": DenseLayers(),
            "adaptive=": AdaptiveBudget(), "prefill_window=": PrefillWindow(tokens=4),
            "head_merge=": HeadMerge(mode="union")}[option]  # fmt: skip


@pytest.mark.parametrize(("name", "option"), [(n, o) for n in registry.names("policy") for o in registry.OPTIONS
                                              if o not in registry.get(n).options])
def test_make_policy_refuses_each_option_an_algorithm_does_not_take(name, option):
    from ucm_trt.runtime.algorithms import make_policy

    spec = registry.get(name)
    kw = {"rerope": ReRoPEConfig(window=8, training_length=64)} if "rerope=" in spec.required else {}
    kw[option[:-1]] = _option_value(option)
    with pytest.raises(ValueError) as ei:
        make_policy(name, **kw)
    _refused(ei, name, option)
    assert ei.value.rule == registry.OPTIONS[option]


def test_a_required_option_and_a_prefill_method_are_refused_the_same_way():
    from ucm_trt.runtime.algorithms import make_policy

    with pytest.raises(ValueError) as ei:
        make_policy("rerope")
    _refused(ei, "rerope", "a missing rerope=")
    assert "needs rerope=ReRoPEConfig" in str(ei.value)
    with pytest.raises(ValueError) as ei:
        make_policy("blend")
    _refused(ei, "blend", "make_policy")
    assert "BlendRunner" in str(ei.value)


@pytest.mark.parametrize(("name", "backend"), [(n, b) for n in registry.names() for b in registry.BACKENDS
                                               if b not in registry.get(n).backends])
def test_each_backend_an_algorithm_does_not_run_on_is_refused(name, backend):
    with pytest.raises(ValueError) as ei:
        registry.check_backend(name, backend)
    _refused(ei, name, f"the {backend} backend")
    assert ei.value.rule == registry.get(name).backend_rule


def test_every_algorithm_runs_on_the_backends_it_declares():
    for name in registry.names():
        for backend in registry.get(name).backends:
            assert registry.check_backend(name, backend) is registry.get(name)
    assert set(registry.get("gsa-on-device").backends) == {"torch"}
    assert set(registry.get("blend").backends) == {"torch"}
    assert set(registry.get("esa").backends) == set(registry.BACKENDS)


def test_graph_model_and_query_window_refusals():
    rr = ReRoPEConfig(window=8, training_length=64)
    with pytest.raises(ValueError) as ei:
        registry.check_graph_model("esa", model_algorithm="dense", model_rerope=None, policy_rerope=None)
    _refused(ei, "esa", "a model rewritten for 'dense'")
    with pytest.raises(ValueError) as ei:
        registry.check_graph_model("dense", model_algorithm="rerope", model_rerope=rr, policy_rerope=None)
    _refused(ei, "dense", f"a model rewritten for ReRoPE ({rr})")
    with pytest.raises(ValueError) as ei:
        registry.check_graph_model("rerope", model_algorithm="esa", model_rerope=None, policy_rerope=rr)
    _refused(ei, "rerope", "a model rewritten with rerope=None")
    # accepted: matching models, and a backend whose attention no rewrite fixed
    registry.check_graph_model("esa", model_algorithm="esa", model_rerope=None, policy_rerope=None)
    registry.check_graph_model("rerope", model_algorithm="rerope", model_rerope=rr, policy_rerope=rr)
    registry.check_graph_model("esa", model_algorithm=None, model_rerope=None, policy_rerope=rr)
    with pytest.raises(ValueError) as ei:
        registry.check_query_window("kvstar", 8, backend="onnxruntime", most=1, prefill_chunk=512)
    _refused(ei, "kvstar", "the onnxruntime backend")
    with pytest.raises(ValueError) as ei:
        registry.check_query_window("kvstar", 8, backend="torch", most=None, prefill_chunk=4)
    _refused(ei, "kvstar", "RuntimeConfig.prefill_chunk=4")
    registry.check_query_window("kvstar", 8, backend="torch", most=None, prefill_chunk=8)


def test_rewrite_config_refusals_use_the_one_message():
    from ucm_trt.graph.driver import RewriteConfig

    with pytest.raises(ValueError) as ei:
        RewriteConfig(algorithm="dense", block_size=16, selection_inputs=True)
    _refused(ei, "dense", "RewriteConfig.selection_inputs=True")
    with pytest.raises(ValueError) as ei:
        RewriteConfig(algorithm="esa", block_size=16, rerope=ReRoPEConfig(window=8, training_length=64))
    _refused(ei, "esa", "RewriteConfig.rerope")


def test_unknown_names_list_the_registry():
    with pytest.raises(ValueError, match="algorithm must be one of dense, esa, gsa, gsa-on-device, kvstar, blend, "
                                         "rerope; got 'quest'"):
        registry.get("quest")
    with pytest.raises(ValueError, match="backend must be one of torch, onnxruntime, tensorrt; got 'ort'"):
        registry.check_backend("esa", "ort")


def test_a_spec_must_say_why_it_skips_a_backend():
    with pytest.raises(ValueError, match="gives no backend_rule"):
        registry.AlgorithmSpec(name="x", kind="policy", entry="m:a", representation="mean", scoring="dot",
                               graph_op="sparse", retrieval="cpu", needs_queries=True, cuda_graph=True,
                               offload=False, budgeted=True, backends=("torch",))  # fmt: skip


def test_a_policy_outside_the_registry_is_judged_by_its_class():
    assert registry.check_backend("mine", "onnxruntime", in_layer_selection=False) is None
    with pytest.raises(ValueError) as ei:
        registry.check_backend("mine", "tensorrt", in_layer_selection=True)
    _refused(ei, "mine", "the tensorrt backend")
    with pytest.raises(ValueError, match="algorithm must be one of"):
        registry.check_backend("mine", "torch")


@pytest.mark.parametrize("model, runs", [
    ("esa", {"dense", "esa", "gsa", "kvstar"}),  # a sparse rewrite takes any selection, select-all included
    ("gsa", {"dense", "esa", "gsa", "kvstar"}),
    ("dense", {"dense"}),  # no selection inputs
    ("rerope", {"rerope"}),  # ReRoPE attention only
])
def test_runs_on_rewrite_follows_the_graph_op_and_the_backends(model, runs):
    # gsa-on-device selects inside the layer (PyTorch only), blend is a prefill method: never on a graph
    assert {a for a in registry.names() if registry.runs_on_rewrite(a, model)} == runs
    with pytest.raises(ValueError, match="algorithm must be one of"):
        registry.runs_on_rewrite("nope", model)
