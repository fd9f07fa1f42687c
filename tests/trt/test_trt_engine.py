"""TensorRT tier (marker ``trt``): plugin registration, engines built from UCM ONNX models, engine
outputs vs ONNX Runtime on the same inputs, AOT and JIT plugin paths, reload in a fresh process,
and the runtime's TensorRT backend against its PyTorch backend.

Runs wherever ``import tensorrt`` (>= 10.9, with ``tensorrt.plugin``) works and a CUDA GPU exists:
``make test-trt`` or ``pytest -m trt``. It has NOT been executed in this project's own environment
(TensorRT's builder libraries are not installable there); see docs/verification.md.

Comparison rule (Polygraphy's default ``simple`` comparator): an element fails only if its error
exceeds both ``atol`` and ``rtol * |reference|``; NaN always fails.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from tests.trt._cases import CASES, make_inputs
from ucm_trt.graph.functions import make_single_op_model
from ucm_trt.testing.tolerances import tolerances_for

pytestmark = [pytest.mark.trt, pytest.mark.gpu]

_ONNX_DTYPE = {torch.float32: "float", torch.float16: "float16"}


def assert_polygraphy_close(out: torch.Tensor, ref: torch.Tensor, *, atol: float, rtol: float, what: str = "") -> None:
    out, ref = out.detach().float().cpu(), ref.detach().float().cpu()
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    err = (out - ref).abs()
    bad = torch.isnan(out) | ((err > atol) & (err > rtol * ref.abs()))
    assert not bool(bad.any()), (
        f"{what}: {int(bad.sum())} of {bad.numel()} elements differ (max abs err {float(err.max()):.3g}, "
        f"atol {atol}, rtol {rtol})"
    )


def _ort(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def _single_op_config(case, mode):
    from trt_plugins.build import EngineBuildConfig

    return EngineBuildConfig(
        max_batch=case.batch, max_prefill_tokens=32, opt_prefill_tokens=8, max_blocks=case.max_blocks,
        num_blocks=case.num_blocks, max_selected=case.max_blocks, plugin_mode=mode,
        fixed_dims={"Hq": case.hq, "Hkv": case.hkv, "D": case.d, "block_size": case.bs, "2": 2},
    )  # fmt: skip


def _build_single(tmp_path, case, mode, dtype):
    from trt_plugins.build import build_engine

    model = make_single_op_model(case.op_name, dtype=_ONNX_DTYPE[dtype], **case.attrs())
    path = tmp_path / f"{case.op_name}-{_ONNX_DTYPE[dtype]}.onnx"
    onnx.save(model, path)
    res = build_engine(path, tmp_path / f"{case.op_name}-{mode}.engine", config=_single_op_config(case, mode))
    assert res.plugin_layers == 1
    return res


def test_plugins_are_registered_with_tensorrt():
    import tensorrt as trt

    from trt_plugins import register_plugins
    from trt_plugins.spec import all_plugin_specs

    ids = register_plugins()
    assert set(ids) == {s.plugin_id for s in all_plugin_specs().values()}
    registry = trt.get_plugin_registry()
    for spec in all_plugin_specs().values():
        creator = registry.get_creator(spec.name, spec.version, spec.namespace)
        assert creator is not None, spec.plugin_id
        fields = {f.name for f in creator.field_names}
        assert fields == set(spec.attr_names)
    assert register_plugins() == ids  # idempotent


@pytest.mark.parametrize("mode", ["aot", "jit"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("name", ["decode", "prefill", "select_all", "gqa8_d64", "rerope", "rerope_logn_prefill"])
def test_single_op_engine_matches_onnxruntime(tmp_path, name, dtype, mode):
    from trt_plugins.runner import EngineRunner

    case = CASES[name]
    res = _build_single(tmp_path, case, mode, dtype)
    inputs, _ = make_inputs(case, dtype)
    # ONNX Runtime runs the op's model-local function body in fp32 on the same (rounded) values.
    fp32_model = make_single_op_model(case.op_name, dtype="float", **case.attrs())
    feeds = {k: (v.float() if v.is_floating_point() else v).numpy() for k, v in inputs.items()}
    (ref,) = _ort(fp32_model, feeds)
    out = EngineRunner(res.engine_path).run({k: v.cuda() for k, v in inputs.items()})
    assert_polygraphy_close(out["output"], torch.from_numpy(ref), **tolerances_for(dtype), what=f"{name} {mode}")


@pytest.mark.parametrize("mode", ["aot", "jit"])
def test_select_all_blocks_engine(tmp_path, mode):
    from trt_plugins.build import EngineBuildConfig, build_engine
    from trt_plugins.runner import EngineRunner

    model = make_single_op_model("UcmSelectAllBlocks", num_kv_heads=2)
    onnx.save(model, tmp_path / "sel.onnx")
    res = build_engine(tmp_path / "sel.onnx", tmp_path / "sel.engine",
                       config=EngineBuildConfig(max_batch=3, max_blocks=300, plugin_mode=mode))  # fmt: skip
    bt = torch.randint(0, 50, (3, 300), dtype=torch.int32)
    (ref,) = _ort(model, {"block_table": bt.numpy()})
    out = EngineRunner(res.engine_path).run({"block_table": bt.cuda()})
    assert np.array_equal(out["selection"].cpu().numpy(), ref)


# ------------------------------------------------------------------ rewritten small model


def _tiny_llama(head_dim=32, layers=2):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=256, hidden_size=4 * head_dim, num_hidden_layers=layers, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=head_dim, intermediate_size=16 * head_dim,
                      max_position_embeddings=1024, rope_parameters={"rope_type": "default", "rope_theta": 10000.0})  # fmt: skip
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def rewritten(tmp_path_factory):
    from ucm_trt.graph import ExportConfig, RewriteConfig, export_hf_model, rewrite_model
    from ucm_trt.graph.driver import save_model

    d = tmp_path_factory.mktemp("tiny")
    model = _tiny_llama()
    path = export_hf_model(model, d / "tiny.onnx", config=ExportConfig(exporter="legacy"))
    out = {}
    for algo in ("esa", "dense"):
        rw, _ = rewrite_model(path, config=RewriteConfig(algorithm=algo, block_size=16))
        save_model(rw, d / f"tiny-{algo}.onnx")
        out[algo] = d / f"tiny-{algo}.onnx"
        # the v1 ops (no split-K scratch), as models rewritten before issue 14: their engines run unsplit
        rw, _ = rewrite_model(path, config=RewriteConfig(algorithm=algo, block_size=16, split_scratch=False))
        save_model(rw, d / f"tiny-{algo}-v1.onnx")
        out[f"{algo}-v1"] = d / f"tiny-{algo}-v1.onnx"
    return model, out


def _paged_feeds(rng, t, lengths, bt, pools, with_sel, names, hkv=2):
    b = len(lengths)
    feeds = {
        "input_ids": rng.integers(0, 256, (b, t)).astype(np.int64),
        "position_ids": (np.array(lengths)[:, None] + np.arange(t)[None]).astype(np.int64),
        "seq_lens": (np.array(lengths) + t).astype(np.int32),
        "block_table": bt,
    }
    for i, p in enumerate(pools):
        feeds[f"kv_pool.{i}"] = p
        if with_sel:
            nb = -(-(max(lengths) + t) // 16)
            sel = np.full((b, hkv, 4), -1, np.int32)
            ids = sorted({0, max(0, nb - 1), nb // 2})
            sel[:, :, : len(ids)] = ids
            feeds[f"selection.{i}"] = sel
    return {k: v for k, v in feeds.items() if k in names}


@pytest.mark.parametrize("graph", ["esa", "esa-v1"])
@pytest.mark.parametrize("mode", ["aot", "jit"])
def test_rewritten_model_engine_matches_onnxruntime(rewritten, tmp_path, mode, graph):
    """Prefill 20 tokens then 3 decode steps; every output of the engine (logits, new K/V, last
    queries) against ONNX Runtime on the same rewritten model and the same inputs. ``esa``: the split-K
    attention nodes, fed ONE zeroed counters buffer for all steps (zero after each); ``esa-v1``: the v1
    ops of models rewritten before (no counters input), still built and run."""
    from trt_plugins.build import EngineBuildConfig, build_engine, split_counters_length
    from trt_plugins.runner import EngineRunner
    from ucm_trt.kernels._common import num_sms

    _, paths = rewritten
    model = onnx.load(paths[graph])
    config = EngineBuildConfig(max_batch=2, max_prefill_tokens=64, max_blocks=8, num_blocks=19, max_selected=8,
                               plugin_mode=mode)  # fmt: skip
    res = build_engine(paths[graph], tmp_path / f"tiny-{graph}-{mode}.engine", config=config)
    assert res.plugin_layers == 2
    meta = json.loads(res.metadata_path.read_text())
    split = graph == "esa"
    assert meta["sms"] == (num_sms(torch.device("cuda")) if split else None)
    assert meta["split_attention_nodes"] == (2 if split else 0)
    runner = EngineRunner(res.engine_path)
    assert ("attn_split_counters" in runner.inputs) == split
    counters = torch.zeros(split_counters_length(model, config), dtype=torch.int32, device="cuda")
    sess_names = [o.name for o in model.graph.output]
    rng = np.random.default_rng(0)
    bt = rng.permutation(19)[:16].reshape(2, 8).astype(np.int32)
    pools = [np.zeros((19, 2, 2, 16, 32), np.float32) for _ in range(2)]
    lengths = [0, 0]
    for t in (20, 1, 1, 1):
        feeds = _paged_feeds(rng, t, lengths, bt, pools, with_sel=True, names={i.name for i in model.graph.input})
        if split:
            feeds["attn_split_counters"] = counters.cpu().numpy()
        ref = dict(zip(sess_names, _ort(model, feeds), strict=True))
        got = runner.run({k: (counters if k == "attn_split_counters" else torch.from_numpy(v).cuda())
                          for k, v in feeds.items()})  # fmt: skip
        assert int(counters.abs().sum()) == 0  # every layer's launch left the shared counters zero
        for n in sess_names:
            assert_polygraphy_close(got[n], torch.from_numpy(ref[n]), atol=1e-4, rtol=1e-4, what=f"T={t} {n}")
        for i in range(2):  # append the chunk's K/V (from ONNX Runtime) into the pools
            for bi in range(2):
                for ti in range(t):
                    p = lengths[bi] + ti
                    phys = bt[bi, p // 16]
                    pools[i][phys, 0, :, p % 16] = ref[f"new_key.{i}"][bi, :, ti]
                    pools[i][phys, 1, :, p % 16] = ref[f"new_value.{i}"][bi, :, ti]
        lengths = [n + t for n in lengths]


_RELOAD = textwrap.dedent("""
    import sys, torch
    engine, data, mode = sys.argv[1], sys.argv[2], sys.argv[3]
    import tensorrt as trt
    if mode == "jit":  # JIT engines call back into Python: the plugin definitions must be imported
        import trt_plugins
        trt_plugins.register_plugins()
    assert mode == "jit" or "trt_plugins" not in sys.modules  # AOT: no Python plugin code at all
    rt = trt.Runtime(trt.Logger(trt.Logger.WARNING))
    eng = rt.deserialize_cuda_engine(open(engine, "rb").read())
    assert eng is not None, "deserialization failed"
    saved = torch.load(data)
    ctx = eng.create_execution_context()
    ctx.set_optimization_profile_async(0, torch.cuda.current_stream().cuda_stream)
    keep = {}
    for name, x in saved["inputs"].items():
        keep[name] = x.cuda().contiguous()
        ctx.set_input_shape(name, tuple(x.shape))
        ctx.set_tensor_address(name, keep[name].data_ptr())
    out = torch.empty(tuple(ctx.get_tensor_shape("output")), dtype=saved["output"].dtype, device="cuda")
    ctx.set_tensor_address("output", out.data_ptr())
    assert ctx.execute_async_v3(torch.cuda.current_stream().cuda_stream)
    torch.cuda.synchronize()
    torch.save(out.cpu(), data + ".out")
""")


@pytest.mark.parametrize("mode", ["aot", "jit"])
def test_engine_reload_in_fresh_process(tmp_path, mode):
    from trt_plugins.runner import EngineRunner

    case = CASES["prefill"]
    res = _build_single(tmp_path, case, mode, torch.float16)
    inputs, _ = make_inputs(case, torch.float16)
    out = EngineRunner(res.engine_path).run({k: v.cuda() for k, v in inputs.items()}, profile=0)["output"].cpu()
    data = tmp_path / "io.pt"
    torch.save({"inputs": inputs, "output": out}, data)
    proc = subprocess.run([sys.executable, "-c", _RELOAD, str(res.engine_path), str(data), mode],
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    again = torch.load(str(data) + ".out")
    assert torch.equal(again, out)
    meta = json.loads(res.metadata_path.read_text())
    assert meta["plugin_mode"] == mode and set(meta["profiles"]) == {"prefill", "decode"}


def test_node_without_plugin_is_a_clear_build_error(tmp_path):
    from trt_plugins.build import EngineBuildError, build_engine

    model = make_single_op_model("UcmSelectAllBlocks", num_kv_heads=2)
    model.graph.node[0].op_type = "UcmNotAnOp"
    onnx.save(model, tmp_path / "bad.onnx")
    with pytest.raises(EngineBuildError, match="UcmNotAnOp"):
        build_engine(tmp_path / "bad.onnx", tmp_path / "bad.engine")


@pytest.mark.parametrize("graph", ["dense", "dense-v1"])
def test_trt_backend_generates_like_torch_backend(rewritten, tmp_path, graph):
    """The runtime on the TensorRT engine produces the same greedy tokens as on PyTorch (dense); with the
    split-K nodes the backend binds its once-zeroed counters (still zero after generating), with the v1
    ops of an older graph it binds none."""
    from trt_plugins.build import EngineBuildConfig, build_engine
    from ucm_trt.config import SparseConfig
    from ucm_trt.runtime import Engine, RuntimeConfig, SamplingParams, TorchBackend
    from ucm_trt.runtime.algorithms import make_policy, sparse_config_for
    from ucm_trt.runtime.backends.trt import TrtBackend

    model, paths = rewritten
    rt = RuntimeConfig(max_batch=1, max_seq_len=512, prefill_chunk=64, cache_blocks=0, num_device_blocks=40)
    sparse = sparse_config_for("dense", SparseConfig(block_size=16))
    res = build_engine(paths[graph], tmp_path / f"tiny-{graph}.engine",
                       config=EngineBuildConfig(max_batch=1, max_prefill_tokens=64, max_blocks=64, num_blocks=40))  # fmt: skip
    prompt = torch.randint(0, 256, (100,), generator=torch.Generator().manual_seed(3)).tolist()
    backend = TrtBackend(res.engine_path)
    assert (backend._split_counters is None) == graph.endswith("-v1")
    with Engine(backend, make_policy("dense"), sparse=sparse, config=rt) as eng:
        [a] = eng.generate(prompt, SamplingParams(max_new_tokens=16))
    if backend._split_counters is not None:
        assert int(backend._split_counters.abs().sum()) == 0
    with Engine(TorchBackend(model.to("cuda"), attention="reference"), make_policy("dense"), sparse=sparse,
                config=rt) as eng:  # fmt: skip
        [b] = eng.generate(prompt, SamplingParams(max_new_tokens=16))
    assert a.token_ids == b.token_ids


def test_trt_backend_returns_the_prefill_window_queries(rewritten, tmp_path):
    """ESA with a prefill window of 16 queries on the TensorRT engine (rewritten with the default
    query_window, 64): its first retrieval receives the same last-16 prompt queries per layer as on the
    PyTorch backend (engine output ``query_window.{i}``, ``[B, Hq, min(64, T), D]``)."""
    from trt_plugins.build import EngineBuildConfig, build_engine
    from ucm_trt.config import Budget, DenseLayers, PrefillWindow, SparseConfig
    from ucm_trt.runtime import Engine, RuntimeConfig, SamplingParams, TorchBackend
    from ucm_trt.runtime.algorithms import sparse_config_for
    from ucm_trt.runtime.backends.trt import TrtBackend
    from ucm_trt.sparse.policies import ESAPolicy

    class Recording(ESAPolicy):
        def __init__(self):
            super().__init__(vote=True, prefill_window=PrefillWindow(tokens=16), dense_layers=DenseLayers())
            self.seen = []

        def on_prefill_end(self, req, queries):
            self.seen.append(torch.stack(queries).clone())
            super().on_prefill_end(req, queries)

    model, paths = rewritten
    rt = RuntimeConfig(max_batch=1, max_seq_len=512, prefill_chunk=64, cache_blocks=0, num_device_blocks=40)
    sparse = sparse_config_for("esa", SparseConfig(block_size=16, budget=Budget.ratio(0.25)))
    res = build_engine(paths["esa"], tmp_path / "tiny-esa.engine",
                       config=EngineBuildConfig(max_batch=1, max_prefill_tokens=64, max_blocks=64, num_blocks=40))  # fmt: skip
    backend = TrtBackend(res.engine_path)
    assert backend.max_query_window == 64
    prompt = torch.randint(0, 256, (100,), generator=torch.Generator().manual_seed(3)).tolist()
    seen = {}
    for name, be in (("trt", backend), ("torch", TorchBackend(model.to("cuda"), attention="reference"))):
        policy = Recording()
        with Engine(be, policy, sparse=sparse, config=rt) as eng:
            eng.generate(prompt, SamplingParams(max_new_tokens=4))
        assert len(policy.seen) == 1 and policy.seen[0].shape[2] == 16
        seen[name] = policy.seen[0]
    torch.testing.assert_close(seen["trt"], seen["torch"], rtol=2e-3, atol=2e-3)
