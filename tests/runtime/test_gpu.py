"""GPU tier of the runtime (marker ``gpu``; skipped without CUDA): the Triton attention path (head_dim >= 32, a kernel requirement), pinned
host store and side-stream delta prefetch against the CPU reference path, and a decode-throughput
measurement (``perf``) on a Llama-3.2-1B-shaped random model."""

from __future__ import annotations

import pytest
import torch

from ucm_trt.config import Budget, DenseLayers, GSAOnDeviceConfig, KVStarConfig, ReRoPEConfig, SparseConfig
from ucm_trt.runtime import Engine, RuntimeConfig, SamplingParams, TorchBackend
from ucm_trt.runtime.algorithms import make_policy, sparse_config_for

from .conftest import tiny_llama


def _tokens(model, algorithm, attention, *, budget=None, steps=32, **kw):
    budget = Budget.ratio(1.0) if budget is None else budget
    sparse = sparse_config_for(algorithm, SparseConfig(block_size=16, budget=budget, retrieval_stride=3))
    if algorithm not in ("dense", "rerope"):
        kw.setdefault("dense_layers", DenseLayers())  # every layer sparse (the random model is diffuse)
    with Engine(TorchBackend(model, attention=attention), make_policy(algorithm, **kw), sparse=sparse,
                config=RuntimeConfig(max_batch=2, max_seq_len=1024, prefill_chunk=128, cache_blocks=0)) as eng:
        g = torch.Generator().manual_seed(0)
        prompts = [torch.randint(0, 256, (300,), generator=g).tolist(), torch.randint(0, 256, (170,), generator=g).tolist()]
        res = eng.generate(prompts, SamplingParams(max_new_tokens=steps))
        assert eng.kv.device_blocks_held() == 0
        return [r.token_ids for r in res], eng.stats()


@pytest.mark.gpu
def test_triton_path_on_cuda_matches_cpu_reference():
    cpu = tiny_llama(head_dim=32)
    ref, _ = _tokens(cpu, "dense", "reference")
    gpu = tiny_llama(head_dim=32).cuda()
    got, stats = _tokens(gpu, "dense", "triton")
    assert stats["attention"] == "triton" and stats["device"].startswith("cuda")
    assert got == ref


@pytest.mark.gpu
@pytest.mark.parametrize("algorithm", ["esa", "gsa", "gsa-on-device"])
def test_select_all_on_cuda_with_pinned_offload_equals_dense(algorithm):
    gpu = tiny_llama(head_dim=32).cuda()
    dense, _ = _tokens(gpu, "dense", "triton")
    kw = {"gsa_on_device": GSAOnDeviceConfig(top_k_tokens=4096, seq_len_threshold=0)} if algorithm == "gsa-on-device" else {}
    got, stats = _tokens(gpu, algorithm, "triton", **kw)
    assert got == dense
    if algorithm != "gsa-on-device":
        assert stats["bytes_d2h_total"] > 0  # write-back through the side stream into pinned memory


@pytest.mark.gpu
@pytest.mark.perf
def test_decode_throughput_dense_vs_sparse_llama1b_shape(tmp_path):
    """Prints decode tokens/s at 32K for dense, ESA (offload) and GSA On-Device; the numbers (not a
    threshold) are the result. benchmarks/bench_runtime.py runs the full matrix."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    out = tmp_path / "runtime.json"
    script = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_runtime.py"
    subprocess.run([sys.executable, str(script), "--contexts", "32768", "--algorithms", "dense", "esa",
                    "gsa-on-device", "--decode-steps", "32", "--out", str(out)], check=True)
    runs = json.loads(out.read_text())["runs"]
    assert all("error" not in r and r["decode_tokens_per_s"] > 0 for r in runs), runs


def _graph_tokens(model, algorithm, *, cuda_graph, budget, steps=40, selection="shared", **kw):
    """Greedy tokens of two requests of different lengths and lengths of output (the batch drops
    from 2 rows to 1 mid-way: a second graph key) with the decode step captured or eager."""
    sparse = sparse_config_for(algorithm, SparseConfig(block_size=16, budget=budget, retrieval_stride=3,
                                                       selection=selection))
    rt = RuntimeConfig(max_batch=2, max_seq_len=1024, prefill_chunk=128, cache_blocks=1, cuda_graph=cuda_graph)
    if algorithm not in ("dense", "rerope"):
        kw.setdefault("dense_layers", DenseLayers())  # every layer sparse (the random model is diffuse)
    with Engine(TorchBackend(model, attention="triton", validate=False), make_policy(algorithm, **kw),
                sparse=sparse, config=rt) as eng:
        g = torch.Generator().manual_seed(1)
        prompts = [torch.randint(0, 256, (400,), generator=g).tolist(), torch.randint(0, 256, (230,), generator=g).tolist()]
        res = eng.generate(prompts, [SamplingParams(max_new_tokens=steps), SamplingParams(max_new_tokens=steps // 2)])
        assert eng.kv.device_blocks_held() == 0
        return [r.token_ids for r in res], eng.stats()


_GRAPH_CASES = {
    "dense": {},
    "esa": {},
    "gsa": {},
    "kvstar": {"kvstar": KVStarConfig(retrieval_stride=3)},
    "gsa-on-device": {"gsa_on_device": GSAOnDeviceConfig(top_k_tokens=128, seq_len_threshold=0)},
    "rerope": {"rerope": ReRoPEConfig(window=64, training_length=4096)},
}


@pytest.mark.gpu
@pytest.mark.parametrize("algorithm", list(_GRAPH_CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_graph_decode_equals_eager_decode(algorithm, dtype):
    """Replaying captured decode steps gives the tokens of the eager steps, for every policy, with
    sparse selections that change between steps (ratio 0.25, CPU retrieval every 3 steps, or
    on-device top-k of 8 blocks) and a batch that shrinks mid-way."""
    model = tiny_llama(head_dim=32).to("cuda", dtype)
    kw = _GRAPH_CASES[algorithm]
    budget = Budget.ratio(0.25)
    eager, st_e = _graph_tokens(model, algorithm, cuda_graph=False, budget=budget, **kw)
    graph, st_g = _graph_tokens(model, algorithm, cuda_graph=True, budget=budget, **kw)
    assert st_e["cuda_graph"] is False and st_e["eager_decode_steps"] > 0
    assert st_g["cuda_graph"] is True and st_g["eager_decode_steps"] == 0
    assert st_g["cuda_graph_captures"] >= 2 and st_g["cuda_graph_replays"] > st_g["cuda_graph_captures"]
    assert graph == eager
    if algorithm in ("esa", "gsa", "kvstar", "gsa-on-device"):
        assert st_g["policy"]["selected_block_fraction"] < 0.9  # the selections were sparse
        assert st_g["policy"]["selected_block_fraction"] == pytest.approx(st_e["policy"]["selected_block_fraction"])


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["own", "union"])
def test_cuda_graph_gsa_on_device_per_head_selections(mode):
    """GSA On-Device with a per-head selection, each head's own blocks or the layer's union built on the
    device (``union_kv_heads_fixed``, no host sync): captured decode steps give the eager steps' tokens,
    and the union reads more blocks than the heads' own selections."""
    from ucm_trt.config import HeadMerge

    model = tiny_llama(head_dim=32).to("cuda", torch.bfloat16)
    kw = dict(_GRAPH_CASES["gsa-on-device"], selection="per_head", head_merge=HeadMerge(mode=mode))
    eager, st_e = _graph_tokens(model, "gsa-on-device", cuda_graph=False, budget=Budget.ratio(0.25), **kw)
    graph, st_g = _graph_tokens(model, "gsa-on-device", cuda_graph=True, budget=Budget.ratio(0.25), **kw)
    assert st_g["cuda_graph"] is True and st_g["eager_decode_steps"] == 0 and graph == eager
    frac = st_g["policy"]["selected_block_fraction"]
    assert frac == pytest.approx(st_e["policy"]["selected_block_fraction"]) and frac < 0.9
    if mode == "union":
        _, st_own = _graph_tokens(model, "gsa-on-device", cuda_graph=True, budget=Budget.ratio(0.25),
                                  **dict(kw, head_merge=HeadMerge()))  # fmt: skip
        assert frac > st_own["policy"]["selected_block_fraction"]


@pytest.mark.gpu
def test_cuda_graph_required_but_backend_validates_is_an_error():
    model = tiny_llama(head_dim=32).cuda()
    with pytest.raises(ValueError, match="validate=False"):
        Engine(TorchBackend(model, attention="triton", validate=True),
               config=RuntimeConfig(cuda_graph=True, max_seq_len=512))


@pytest.mark.gpu
def test_default_backend_runs_decode_as_cuda_graphs():
    """The fast path is the default: no per-launch index checks, so decode steps are replayed."""
    model = tiny_llama(head_dim=32).cuda()
    from ucm_trt.sparse.policies import ESAPolicy

    with Engine(TorchBackend(model), ESAPolicy(),
                sparse=sparse_config_for("esa", SparseConfig(block_size=16, budget=Budget.ratio(0.25))),
                config=RuntimeConfig(max_batch=1, max_seq_len=1024, prefill_chunk=128)) as eng:
        eng.generate(torch.randint(0, 256, (300,)).tolist(), SamplingParams(max_new_tokens=12))
        st = eng.stats()
    assert st["cuda_graph"] is True and st["eager_decode_steps"] == 0 and st["cuda_graph_replays"] > 0
    assert st["load_gpu_ms_total"] > 0 and st["load_hidden_fraction"] is not None  # loads were timed


def _slow_copies(base: type, cycles: int):
    """``base`` whose plan first parks the KV's copy stream on a sleep kernel: every copy of the step
    lands ~``cycles`` GPU cycles late, so a step that read a block before waiting for its copy would
    read what the block held before (another block's KV, or zeros)."""

    class Slow(base):
        def plan(self, reqs):
            with torch.cuda.stream(self.rt.kv.copy_stream):
                torch.cuda._sleep(cycles)
            return super().plan(reqs)

    return Slow


def _overlap_tokens(model, policy, *, overlap, load_method="kernel", cache_blocks=0, steps=24, plan_ahead=True):
    sparse = sparse_config_for(policy.name, SparseConfig(block_size=16, budget=Budget.ratio(0.25), retrieval_stride=3,
                                                         min_blocks=4, local_blocks=2, sink_blocks=1))
    rt = RuntimeConfig(max_batch=2, max_seq_len=1024, prefill_chunk=128, cache_blocks=cache_blocks,
                       overlap_loads=overlap, load_method=load_method, plan_ahead=plan_ahead)
    with Engine(TorchBackend(model, attention="triton"), policy, sparse=sparse, config=rt) as eng:
        g = torch.Generator().manual_seed(3)
        prompts = [torch.randint(0, 256, (300,), generator=g).tolist(), torch.randint(0, 256, (230,), generator=g).tolist()]
        res = eng.generate(prompts, SamplingParams(max_new_tokens=steps))
        assert eng.kv.device_blocks_held() == 0
        return [r.token_ids for r in res], eng.stats()


_OVERLAP_CASES = [(alg, method, torch.float32) for alg in ("esa", "gsa", "kvstar")
                  for method in ("kernel", "staged")] + [(alg, "kernel", torch.bfloat16) for alg in ("esa", "gsa", "kvstar")]


@pytest.mark.gpu
@pytest.mark.parametrize(("algorithm", "load_method", "dtype"), _OVERLAP_CASES)
def test_overlapped_loads_on_cuda_equal_the_stale_by_one_model_even_with_slow_copies(algorithm, load_method, dtype):
    """On the GPU, with CUDA graphs: overlapped loads (real policy) == the synchronous engine on the
    stale-by-one model of the policy (tests/runtime/test_overlap.py), token for token; and again
    with every copy delayed ~5-10 ms by a sleep on the copy stream, which only the event waits keep
    from being read early (deferred loads run beside the step; the next step must wait for them)."""
    _check_overlap(algorithm, load_method, dtype)


def _check_overlap(algorithm, load_method, dtype):
    from .test_overlap import _stale_by_one

    kw = {"kvstar": KVStarConfig(retrieval_stride=3)} if algorithm == "kvstar" else {}
    model = tiny_llama(head_dim=32).to("cuda", dtype)
    from ucm_trt.sparse.policies import ESAPolicy, GSAPolicy, KVStarPolicy

    base = {"esa": ESAPolicy, "gsa": GSAPolicy, "kvstar": KVStarPolicy}[algorithm]  # built alike in all runs
    args = {"config": kw["kvstar"]} if kw else {}
    want, st_ref = _overlap_tokens(model, _stale_by_one(base)(**args), overlap=False, load_method=load_method)
    got, st = _overlap_tokens(model, base(**args), overlap=True, load_method=load_method)
    slow, st_slow = _overlap_tokens(model, _slow_copies(base, 10_000_000)(**args), overlap=True,
                                    load_method=load_method)
    assert st["cuda_graph"] is True and st["cuda_graph_replays"] > 0
    assert st["decode_stale_layers"] > 0 and st["decode_blocks_deferred"] > 0
    assert got == want
    assert slow == want
    assert st_slow["load_wait_ms_total"] > 0  # the slow copies were really waited for


@pytest.mark.gpu
def test_prefill_chunks_do_not_overwrite_pinned_inputs_before_their_upload_ran():
    """A non-final prefill chunk has no host sync: with the compute stream held up in every chunk's
    forward, the host reaches the next chunk while the last chunk's uploads (ids, positions, slots)
    still wait their turn; the upload events keep the host from overwriting those pinned buffers."""
    from ucm_trt.sparse.policies.dense import DensePolicy

    class SlowPrefill(DensePolicy):
        def layer_selection(self, layer, q, step):
            if layer == 0 and step.num_tokens > 1:
                torch.cuda._sleep(20_000_000)
            return NotImplemented

    model = tiny_llama(head_dim=32).cuda()
    out = []
    for policy in (DensePolicy(), SlowPrefill()):
        with Engine(TorchBackend(model, attention="triton"), policy, sparse=SparseConfig(block_size=16),
                    config=RuntimeConfig(max_batch=1, max_seq_len=1024, prefill_chunk=32)) as eng:
            prompt = torch.randint(0, 256, (300,), generator=torch.Generator().manual_seed(5)).tolist()
            out.append(eng.generate(prompt, SamplingParams(max_new_tokens=8))[0].token_ids)
            assert eng.stats()["prefill_steps"] == 10
    assert out[0] == out[1]


@pytest.mark.gpu
def test_a_corrupted_device_block_table_is_flagged_by_the_kernels_not_read():
    """The default fast path has no per-launch checks; the engine's IndexGuard catches what the host
    checks cannot see: a device block-table entry overwritten behind the runtime's back (pointing
    far outside the pool) is skipped by the attention kernel, flagged, and reported at the step's
    token copy as IndexOutOfRangeError naming the block table; every block is returned."""
    from ucm_trt.kernels.guard import IndexOutOfRangeError

    model = tiny_llama(head_dim=32).cuda()
    # dense: the table row changes only when a block opens (positions 300-303 stay in block 18), so
    # nothing re-uploads the corrupted row before the step that reads it
    eng = Engine(TorchBackend(model), make_policy("dense"), sparse=SparseConfig(block_size=16),
                 config=RuntimeConfig(max_batch=1, max_seq_len=1024, prefill_chunk=128))
    assert eng.guard is not None and eng.kv.guard is eng.guard
    eng.add_request(torch.randint(0, 256, (300,)).tolist(), SamplingParams(max_new_tokens=16))
    while eng._prefilling or eng._waiting:
        eng.step()
    for _ in range(3):
        eng.step()
    eng.kv.tables[:, 0, 0] = 1 << 20  # block 0 (the sink, always selected) of every layer
    with pytest.raises(IndexOutOfRangeError, match="block_table entry in use lies outside"):
        eng.step()
    eng.abort_all()
    assert eng.kv.device_blocks_held() == 0
    eng.close()


@pytest.mark.gpu
@pytest.mark.parametrize("algorithm", ["esa", "gsa", "kvstar"])
def test_plans_made_ahead_on_cuda_equal_the_serial_order_even_with_slow_copies(algorithm):
    """RuntimeConfig.plan_ahead on the GPU (CUDA graphs, asynchronous forward): the next step's plan,
    its evictions and loads are made while the forward runs; the tokens equal the serial engine's,
    also with every copy parked ~5-10 ms behind a sleep kernel (a load into a block the running
    forward still reads, or a step reading a block before its load, would change them)."""
    from ucm_trt.sparse.policies import ESAPolicy, GSAPolicy, KVStarPolicy

    base = {"esa": ESAPolicy, "gsa": GSAPolicy, "kvstar": KVStarPolicy}[algorithm]
    args = {"config": KVStarConfig(retrieval_stride=3)} if algorithm == "kvstar" else {}
    model = tiny_llama(head_dim=32).to("cuda", torch.float32)
    want, _ = _overlap_tokens(model, base(**args), overlap=True, plan_ahead=False, cache_blocks=1)
    got, st = _overlap_tokens(model, base(**args), overlap=True, plan_ahead=True, cache_blocks=1)
    slow, st_slow = _overlap_tokens(model, _slow_copies(base, 10_000_000)(**args), overlap=True, plan_ahead=True,
                                    cache_blocks=1)
    assert st["cuda_graph"] is True and st["decode_plan_ahead_ms_mean"] > 0
    assert got == want and slow == want
    assert st_slow["load_wait_ms_total"] > 0


@pytest.mark.gpu
@pytest.mark.parametrize("algorithm", ["esa", "gsa", "kvstar"])
def test_batch_dma_loads_equal_the_stale_by_one_model_even_with_slow_copies(algorithm):
    """load_method='batch_dma' (cuMemcpyBatchAsync through ctypes, loads and write-backs): the same
    checks as the overlap test above. Last in the file: a driver that crashes on the call takes only
    these cases down when they run in their own pytest call (-k batch_dma)."""
    _check_overlap(algorithm, "batch_dma", torch.float32)
