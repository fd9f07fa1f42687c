"""Generation engine on a tiny random Llama: exactness vs Hugging Face, select-all == dense for every
policy, batching, sampling, stop tokens, streaming, failure surfacing and config validation."""

from __future__ import annotations

import pytest
import torch

from ucm_trt.config import Budget, DenseLayers, GSAOnDeviceConfig, KVStarConfig, ReRoPEConfig, SparseConfig
from ucm_trt.runtime import Engine, RetrievalError, RuntimeConfig, SamplingParams, TorchBackend
from ucm_trt.runtime.algorithms import ALGORITHMS, make_policy, sparse_config_for
from ucm_trt.sparse.policies import ESAPolicy
from ucm_trt.sparse.policies.dense import DensePolicy

PROMPT_LEN = 300
STEPS = 64


def _prompt(n=PROMPT_LEN, seed=1, vocab=256):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n,), generator=g).tolist()


def _engine(model, algorithm="dense", *, block_size=16, budget=None, stride=2, rt=None, **policy_kw):
    base = SparseConfig(block_size=block_size, budget=budget or Budget.ratio(0.25), retrieval_stride=stride,
                        min_blocks=4, local_blocks=2, sink_blocks=1)
    sparse = sparse_config_for(algorithm, base)
    rt = rt or RuntimeConfig(max_batch=3, max_seq_len=1024, prefill_chunk=128, cache_blocks=0)
    if algorithm not in ("dense", "rerope"):
        # mechanics tests: every layer sparse (the random model's diffuse layers would all be detected
        # and run dense by default; automatic dense layers: tests/sparse/test_dense_layers.py)
        policy_kw.setdefault("dense_layers", DenseLayers())
    return Engine(TorchBackend(model, attention="reference"), make_policy(algorithm, **policy_kw), sparse=sparse,
                  config=rt)


@pytest.fixture(scope="module")
def hf_greedy(tiny_model):
    prompt = _prompt()
    with torch.no_grad():
        out = tiny_model.generate(torch.tensor([prompt]), max_new_tokens=STEPS, do_sample=False,
                                  attention_mask=torch.ones(1, PROMPT_LEN, dtype=torch.long))
    return prompt, out[0, PROMPT_LEN:].tolist()


@pytest.fixture(scope="module")
def dense_run(tiny_model, hf_greedy):
    from tests.runtime.conftest import tiny_llama

    model = tiny_llama()  # own copy: the runtime switches its attention implementation
    prompt, _ = hf_greedy
    with _engine(model) as eng:
        [res] = eng.generate(prompt, SamplingParams(max_new_tokens=STEPS))
        stats = eng.stats()
    return model, res, stats


def test_dense_runtime_matches_hf_generate(hf_greedy, dense_run):
    _, want = hf_greedy
    _, res, stats = dense_run
    assert res.token_ids == want
    assert res.finish_reason == "length" and len(res.token_ids) == STEPS
    assert stats["prefill_steps"] == 3  # 300 tokens in chunks of 128
    assert stats["bytes_h2d_total"] == 0 and stats["offload"] is False


@pytest.mark.parametrize("algorithm", ["esa", "gsa", "kvstar", "gsa-on-device"])
def test_select_all_sparse_equals_dense_greedy(algorithm, hf_greedy, dense_run):
    model, dense_res, _ = dense_run
    prompt, _ = hf_greedy
    kw = {}
    if algorithm == "kvstar":
        kw["kvstar"] = KVStarConfig(retrieval_stride=4, token_merge=2, channel_ratio=0.5)
    if algorithm == "gsa-on-device":
        kw["gsa_on_device"] = GSAOnDeviceConfig(top_k_tokens=4096, seq_len_threshold=0)
    stride = 4 if algorithm == "kvstar" else 3
    steps = STEPS if algorithm == "esa" else STEPS // 2
    with _engine(model, algorithm, budget=Budget.ratio(1.0), stride=stride, **kw) as eng:
        [res] = eng.generate(prompt, SamplingParams(max_new_tokens=steps))
        stats = eng.stats()
        assert eng.kv.device_blocks_held() == 0 and eng.kv.host_bytes_held() == 0
    assert res.token_ids == dense_res.token_ids[:steps]
    if algorithm != "gsa-on-device":
        assert stats["offload"] and stats["retrieval_tasks"] > 0
        assert stats["bytes_d2h_total"] > 0  # the host store was written


def test_sparse_policies_actually_select_fewer_blocks(dense_run, hf_greedy):
    model, _, _ = dense_run
    prompt, _ = hf_greedy
    fractions = {}
    for alg in ("esa", "gsa", "kvstar", "gsa-on-device"):
        kw = {"kvstar": KVStarConfig(retrieval_stride=4)} if alg == "kvstar" else {}
        if alg == "gsa-on-device":
            kw["gsa_on_device"] = GSAOnDeviceConfig(top_k_tokens=96, seq_len_threshold=0)
        with _engine(model, alg, stride=4 if alg == "kvstar" else 3, **kw) as eng:
            eng.generate(prompt, SamplingParams(max_new_tokens=12))
            fractions[alg] = eng.stats()["policy"]["selected_block_fraction"]
    for alg, frac in fractions.items():
        assert 0 < frac < 0.6, (alg, frac)


class _RecordingESA(ESAPolicy):
    def __init__(self):
        super().__init__()
        self.plans = []

    def plan(self, reqs):
        out = super().plan(reqs)
        self.plans.append([set(s[0][s[0] >= 0].tolist()) for s in [layer[0] for layer in out]])
        return out


def test_engine_offload_bytes_equal_changed_blocks(dense_run, hf_greedy):
    """With no LRU cache, the blocks loaded each decode step are exactly the selected blocks that the
    previous step did not hold; bytes moved = that count x block bytes."""
    model, _, _ = dense_run
    prompt, _ = hf_greedy
    # shared selection: the expected loads below read the selection's first (= every) head's row
    sparse = sparse_config_for("esa", SparseConfig(block_size=16, budget=Budget.ratio(0.25), retrieval_stride=3,
                                                   selection="shared"))
    policy = _RecordingESA()
    eng = Engine(TorchBackend(model, attention="reference"), policy, sparse=sparse,
                 config=RuntimeConfig(max_batch=1, max_seq_len=1024, prefill_chunk=128, cache_blocks=0,
                                      early_prefetch=False, overlap_loads=False))
    eng.generate(prompt, SamplingParams(max_new_tokens=30))
    decode = [s for s in eng.metrics.steps if s.kind == "decode"]
    assert len(decode) == len(policy.plans) == 29
    bs = 16
    prev = [set(range(-(-PROMPT_LEN // bs))) for _ in policy.plans[0]]  # after prefill: all resident
    total = 0
    for t, (rec, sels) in enumerate(zip(decode, policy.plans, strict=True)):
        n = PROMPT_LEN + t  # tokens before this step
        existing = -(-n // bs)
        expect = sum(len({b for b in sel if b < existing} - p) for sel, p in zip(sels, prev, strict=True))
        assert rec.blocks_loaded == expect, t
        assert rec.bytes_h2d == expect * eng.kv.block_bytes
        total += expect
        prev = [sel | {n // bs} for sel in sels]
    assert total > 0  # the selection did change
    eng.close()


@pytest.mark.parametrize("algorithm", ["esa", "kvstar"])
def test_early_prefetch_loads_ahead_without_changing_tokens(algorithm, dense_run, hf_greedy):
    """A finished retrieval's blocks are loaded in the steps before it is due: the same tokens as
    without early prefetch, blocks are prefetched, and the steps that switch to a new selection
    load fewer blocks themselves (the prefetched ones are already resident). Synchronous schedule:
    with overlapped loads, blocks that arrived early let a selection become visible on schedule
    instead of one step late, which may change tokens."""
    model, _, _ = dense_run
    prompt, _ = hf_greedy
    # ESA submits after step s % R == 2 and is due after s % R == 0: with R = 4 the plan of the
    # step in between finds the retrieval finished (the step before gave it a whole forward)
    stride = 3 if algorithm == "kvstar" else 4
    kw = {"kvstar": KVStarConfig(retrieval_stride=stride)} if algorithm == "kvstar" else {}
    runs = {}
    for early in (False, True):
        sparse = sparse_config_for(algorithm, SparseConfig(block_size=16, budget=Budget.ratio(0.25),
                                                           retrieval_stride=stride))
        with Engine(TorchBackend(model, attention="reference"),
                    make_policy(algorithm, dense_layers=DenseLayers(), **kw), sparse=sparse,
                    # the serial order: planned ahead, a retrieval is submitted beside the next step's
                    # forward and the plans between submission and collection are made before it can finish
                    config=RuntimeConfig(max_batch=1, max_seq_len=1024, prefill_chunk=128, cache_blocks=0,
                                         early_prefetch=early, overlap_loads=False, plan_ahead=False)) as eng:
            [res] = eng.generate(prompt, SamplingParams(max_new_tokens=30))
            dec = [st for st in eng.metrics.steps if st.kind == "decode"]
            runs[early] = (res.token_ids, dec, eng.stats())
            assert eng.kv.device_blocks_held() == 0  # every block returned, prefetched ones included
    (tok_off, dec_off, st_off), (tok_on, dec_on, st_on) = runs[False], runs[True]
    assert tok_on == tok_off
    assert st_off["decode_blocks_prefetched"] == 0 and st_on["decode_blocks_prefetched"] > 0
    # loads the step itself waits for (total minus early prefetch) drop
    waited_on = sum(r.blocks_loaded - r.blocks_prefetched for r in dec_on)
    waited_off = sum(r.blocks_loaded for r in dec_off)
    assert waited_on < waited_off
    assert st_on["policy"]["retrievals"] == st_off["policy"]["retrievals"]


def test_batched_requests_match_single_runs(dense_run):
    model, _, _ = dense_run
    prompts = [_prompt(n, seed=s) for n, s in ((150, 3), (200, 4), (90, 5))]
    singles = []
    for p in prompts:
        with _engine(model) as eng:
            singles.append(eng.generate(p, SamplingParams(max_new_tokens=10))[0].token_ids)
    with _engine(model) as eng:
        streamed: dict[str, list[int]] = {}
        res = eng.generate(prompts, SamplingParams(max_new_tokens=10),
                           on_token=lambda rid, tok: streamed.setdefault(rid, []).append(tok))
        assert max(s.rows for s in eng.metrics.steps) == 3  # really decoded together
        assert eng.kv.device_blocks_held() == 0
    assert [r.token_ids for r in res] == singles
    assert [streamed[r.request_id] for r in res] == singles


def test_sampling_seeded_top_p_and_stop_tokens(dense_run, hf_greedy):
    model, dense_res, _ = dense_run
    prompt, _ = hf_greedy
    with _engine(model) as eng:
        a = eng.generate(prompt, SamplingParams(max_new_tokens=12, temperature=1.0, seed=5))[0].token_ids
        b = eng.generate(prompt, SamplingParams(max_new_tokens=12, temperature=1.0, seed=5))[0].token_ids
        c = eng.generate(prompt, SamplingParams(max_new_tokens=12, temperature=1.0, seed=6))[0].token_ids
        # top_p tiny keeps only the most likely token: sampling degenerates to greedy
        g = eng.generate(prompt, SamplingParams(max_new_tokens=12, temperature=0.7, top_p=1e-6, seed=1))[0]
        stop = dense_res.token_ids[4]
        first = dense_res.token_ids.index(stop)
        s = eng.generate(prompt, SamplingParams(max_new_tokens=40, stop_token_ids=(stop,)))[0]
    assert a == b and a != c
    assert g.token_ids == dense_res.token_ids[:12]
    assert s.finish_reason == "stop" and s.token_ids == dense_res.token_ids[: first + 1]


class _FailingESA(ESAPolicy):
    def __init__(self, fail_after: int):
        super().__init__()
        self.calls = 0
        self.fail_after = fail_after

    def _select(self, reps, nbp, qs, layer, **options):
        self.calls += 1
        if self.calls > self.fail_after:
            raise OSError("injected retrieval failure")
        return super()._select(reps, nbp, qs, layer, **options)


def test_injected_retrieval_failure_stops_generation_with_clear_error(dense_run, hf_greedy):
    model, _, _ = dense_run
    prompt, _ = hf_greedy
    policy = _FailingESA(fail_after=2 * 2)  # prefill retrieval + one decode retrieval succeed (2 layers)
    eng = Engine(TorchBackend(model, attention="reference"), policy,
                 sparse=sparse_config_for("esa", SparseConfig(block_size=16, retrieval_stride=3)),
                 config=RuntimeConfig(max_batch=1, max_seq_len=1024, prefill_chunk=128))
    tokens = []
    with pytest.raises(RetrievalError, match=r"esa request 'req-0' layers .* step 5.*OSError: injected retrieval failure"):
        eng.generate(prompt, SamplingParams(max_new_tokens=40), on_token=lambda r, t: tokens.append(t))
    # stride 3: submitted after step 5 (5 % 3 == 2), collected after step 6, before step 6 samples:
    # the prefill token + decode steps 1..5, and nothing produced on the failed selection
    assert len(tokens) == 6
    assert eng.kv.device_blocks_held() == 0 and eng.kv.host_bytes_held() == 0
    eng.close()


def test_invalid_configs_are_rejected(dense_run):
    model, _, _ = dense_run
    backend = TorchBackend(model, attention="reference")
    with pytest.raises(ValueError, match="RuntimeConfig.max_batch must be >= 1, got 0"):
        RuntimeConfig(max_batch=0)
    with pytest.raises(ValueError, match="seed is required when temperature > 0"):
        SamplingParams(temperature=0.8)
    with pytest.raises(ValueError, match="top_p must be in"):
        SamplingParams(temperature=0.8, top_p=0.0, seed=1)
    with pytest.raises(ValueError, match="algorithm must be one of"):
        make_policy("quest")
    with pytest.raises(ValueError, match="scoring='dot' and representation='mean'"):
        Engine(backend, make_policy("esa"), sparse=SparseConfig(block_size=16, scoring="hamming", representation="hash"),
               config=RuntimeConfig(max_seq_len=512))
    with pytest.raises(ValueError, match=r"top_k_tokens \(32\) must exceed the forced windows"):
        Engine(backend, make_policy("gsa-on-device", gsa_on_device=GSAOnDeviceConfig(top_k_tokens=32)),
               sparse=sparse_config_for("gsa-on-device", SparseConfig(block_size=16)),
               config=RuntimeConfig(max_seq_len=512))
    with pytest.raises(ValueError, match=r"token_merge \(3\) must divide block_size \(16\)"):
        Engine(backend, make_policy("kvstar", kvstar=KVStarConfig(token_merge=3, retrieval_stride=4)),
               sparse=sparse_config_for("kvstar", SparseConfig(block_size=16)), config=RuntimeConfig(max_seq_len=512))
    with pytest.raises(ValueError, match=r"max_seq_len \(8192\) exceeds the model's max positions \(4096\)"):
        Engine(backend, sparse=SparseConfig(block_size=16), config=RuntimeConfig(max_seq_len=8192))
    with pytest.raises(ValueError, match="needs rerope=ReRoPEConfig"):
        make_policy("rerope")
    with pytest.raises(ValueError, match="algorithm 'esa' cannot be combined with kvstar=: a KVStarConfig"):
        make_policy("esa", kvstar=KVStarConfig())
    eng = Engine(backend, sparse=SparseConfig(block_size=16), config=RuntimeConfig(max_seq_len=256))
    with pytest.raises(ValueError, match="prompt of 300 tokens leaves no room"):
        eng.add_request(_prompt())
    with pytest.raises(ValueError, match=r"prompt\[1\] must be an int token id >= 0"):
        eng.add_request([1, -2])
    eng.add_request([1, 2], request_id="x")
    with pytest.raises(ValueError, match="request_id 'x' is already in use"):
        eng.add_request([1, 2], request_id="x")
    eng.close()
    assert "rerope" in ALGORITHMS and ReRoPEConfig(window=64, training_length=128).window == 64


def test_rerope_with_wide_window_equals_dense(dense_run, hf_greedy):
    """ReRoPE with a window covering every distance and log-n off is ordinary RoPE."""
    model, dense_res, _ = dense_run
    prompt, _ = hf_greedy
    eng = Engine(TorchBackend(model, attention="reference"),
                 make_policy("rerope", rerope=ReRoPEConfig(window=2048, training_length=4096, logn=False)),
                 sparse=SparseConfig(block_size=16), config=RuntimeConfig(max_batch=1, max_seq_len=1024, prefill_chunk=128))
    [res] = eng.generate(prompt, SamplingParams(max_new_tokens=16))
    eng.close()
    assert res.token_ids == dense_res.token_ids[:16]


def test_gsa_on_device_triton_retrieval_matches_pytorch_path(dense_run, hf_greedy):
    """The fused kernel (ucm_trt.kernels.hash_retrieve; Triton interpreter on the CPU) and the PyTorch
    scoring/selection path pick the same blocks, so greedy decoding agrees token for token."""
    from ucm_trt.sparse.policies import GSAOnDevicePolicy
    from ucm_trt.sparse.representations import unpack_bits

    model, _, _ = dense_run
    prompt, _ = hf_greedy
    runs, codes = {}, {}
    for use_kernel in (False, True):
        policy = GSAOnDevicePolicy(GSAOnDeviceConfig(top_k_tokens=96, seq_len_threshold=0), use_kernel=use_kernel)
        sparse = sparse_config_for("gsa-on-device", SparseConfig(block_size=16))
        with Engine(TorchBackend(model, attention="reference"), policy, sparse=sparse,
                    config=RuntimeConfig(max_batch=1, max_seq_len=512, prefill_chunk=128)) as eng:
            [res] = eng.generate(prompt, SamplingParams(max_new_tokens=6))
            runs[use_kernel] = (res.token_ids, eng.stats()["policy"]["selected_block_fraction"])
            codes[use_kernel] = {layer: c.clone() for layer, c in policy.codes.items()}
    assert runs[True] == runs[False]
    assert runs[True][1] < 0.5
    # the code caches: the kernel's one-launch encoding (ucm_trt.kernels.hash_encode) wrote the bits the
    # PyTorch path's encode wrote, up to projections within float32 rounding of 0 (at most 1 in 1000 bits)
    assert codes[True].keys() == codes[False].keys() and codes[True]
    for layer, c in codes[True].items():
        assert c.shape == codes[False][layer].shape
        differ = unpack_bits(c ^ codes[False][layer]).float().mean().item()
        assert differ <= 1e-3, f"layer {layer}: {differ:.2%} of the code bits differ"


@pytest.mark.parametrize("gate", [dict(seq_len_threshold=10_000), dict(seq_len_threshold=0, concurrency_threshold=2)])
def test_gsa_on_device_gate_closed_runs_dense(gate, dense_run, hf_greedy):
    """Sequence-length / concurrency gate: with it closed every step is dense (no selection)."""
    model, dense_res, _ = dense_run
    prompt, _ = hf_greedy
    with _engine(model, "gsa-on-device", gsa_on_device=GSAOnDeviceConfig(top_k_tokens=96, **gate)) as eng:
        [res] = eng.generate(prompt, SamplingParams(max_new_tokens=6))
        pol = eng.stats()["policy"]
    assert pol["sparse_steps"] == 0 and pol["dense_steps"] == 5 and pol["selected_block_fraction"] is None
    assert res.token_ids == dense_res.token_ids[:6]


def test_gsa_on_device_rollback_and_reuse_layers(dense_run, hf_greedy):
    model, _, _ = dense_run
    prompt, _ = hf_greedy
    cfg = GSAOnDeviceConfig(top_k_tokens=96, seq_len_threshold=0, layer_reuse={1: 0})
    with _engine(model, "gsa-on-device", gsa_on_device=cfg) as eng:
        eng.generate(prompt, SamplingParams(max_new_tokens=4))
        assert set(eng.policy.codes) == {0}  # the reusing layer keeps no hash cache
        assert eng.policy._step_sel[1] is eng.policy._step_sel[0]  # last step: layer 1 reused layer 0's selection
    cfg = GSAOnDeviceConfig(top_k_tokens=96, seq_len_threshold=0, rollback_layers=(0, 1))
    with _engine(model, "gsa-on-device", gsa_on_device=cfg) as eng:
        eng.generate(prompt, SamplingParams(max_new_tokens=4))
        assert eng.policy.codes == {} and eng.policy.stats()["selected_block_fraction"] is None


def test_sliding_window_model_is_refused_not_silently_run():
    from transformers import MistralConfig, MistralForCausalLM

    cfg = MistralConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                        sliding_window=32)
    model = MistralForCausalLM(cfg).eval()
    engine = _engine(model, "dense", rt=RuntimeConfig(max_batch=1, max_seq_len=128, prefill_chunk=64, cache_blocks=0))
    with pytest.raises(ValueError, match="sliding_window=32"):
        engine.generate(_prompt(40), SamplingParams(max_new_tokens=2))


@pytest.mark.parametrize("algorithm", ["esa", "gsa", "kvstar"])
def test_offload_policies_never_write_a_selection_they_handed_out(algorithm, dense_run, hf_greedy):
    """The engine recognises an unchanged selection by its identity (Policy.plan's contract, no torch
    version counter): every tensor plan() and prefetch() returned still holds, after the generation,
    what it held when it was returned."""
    model, _, _ = dense_run
    prompt, _ = hf_greedy
    handed = []
    rt = RuntimeConfig(max_batch=1, max_seq_len=1024, prefill_chunk=128, cache_blocks=0, early_prefetch=True)
    kw = {"kvstar": KVStarConfig(retrieval_stride=2)} if algorithm == "kvstar" else {}
    with _engine(model, algorithm, stride=2, rt=rt, **kw) as eng:
        def recording(hook):
            def recorded(reqs):
                out = hook(reqs)
                handed.extend((s, s.clone()) for per_row in out or [] for s in per_row if s is not None)
                return out

            return recorded

        eng.policy.plan = recording(eng.policy.plan)
        eng.policy.prefetch = recording(eng.policy.prefetch)
        eng.generate(prompt, SamplingParams(max_new_tokens=24))
        assert eng.policy.stats()["retrievals"] > 2  # the selection changed during the run
    assert handed and all(torch.equal(s, kept) for s, kept in handed)


class _ScriptedPolicy(DensePolicy):
    """Hands the engine selections that change between steps in every way the engine's caches must
    notice: a new tensor, a new tensor equal to the last but for one id, the same tensor again, and
    None (every block). Records what each layer's attention saw in the device selection buffer."""

    name = "scripted"

    def __init__(self):
        super().__init__()
        self.kept = None
        self.planned = []  # per step: per layer the selection rows as lists (None = all blocks)
        self.seen = []

    def plan(self, reqs):
        step = reqs[0].step
        h = self.shape.num_kv_heads
        self.kept = self.kept or {}
        for r in reqs:
            nb = -(-r.new_len // self.sparse.block_size)
            if r.rid not in self.kept or step % 5 == 0:
                t = torch.full((h, nb), -1, dtype=torch.int32)  # a new tensor
                t[:, :3] = torch.tensor([0, 1, nb - 1], dtype=torch.int32)
                self.kept[r.rid] = t
            elif step % 5 == 2:
                t = self.kept[r.rid].clone()  # a changed selection is a new tensor (Policy.plan)
                t[:, 1] = 2
                self.kept[r.rid] = t
        kept = [self.kept[r.rid] for r in reqs]
        sels = [kept, [None if step % 3 == 0 else t for t in kept]]
        self.planned.append([[None if s is None else s.clone() for s in layer] for layer in sels])
        self.seen.append({})
        return sels

    def layer_selection(self, layer, q, step):
        if step.num_tokens == 1:  # decode steps (the prefill chunks attend to every block)
            sel = step.selections[layer]
            self.seen[-1][layer] = None if sel is None else sel.detach().cpu().clone()
        return NotImplemented


def test_selection_buffers_follow_every_change_of_the_policys_selections(tiny_model):
    policy = _ScriptedPolicy()
    sparse = SparseConfig(block_size=16, min_blocks=1, local_blocks=1, sink_blocks=1)
    rt = RuntimeConfig(max_batch=2, max_seq_len=512, prefill_chunk=128)
    with Engine(TorchBackend(tiny_model, attention="reference"), policy, sparse=sparse, config=rt) as eng:
        eng.generate([_prompt(100), _prompt(60, seed=2)], SamplingParams(max_new_tokens=24))
    assert len(policy.planned) == 23
    for planned, seen in zip(policy.planned, policy.seen, strict=True):
        for layer in (0, 1):
            rows = planned[layer]
            got = seen[layer]
            if got is None:  # the engine passes None only when every row attends to every block
                assert all(w is None for w in rows)
                continue
            for row, want in enumerate(rows):
                if want is None:  # every block: ids 0..nb-1
                    nb = int((got[row, 0] >= 0).sum())
                    assert got[row, 0, :nb].tolist() == list(range(nb))
                else:
                    assert got[row, :, : want.shape[1]].tolist() == want.tolist()
                    assert (got[row, :, want.shape[1]:] == -1).all()
