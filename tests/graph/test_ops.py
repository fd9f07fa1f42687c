"""UCM op schemas and their ONNX function bodies, run by ONNX Runtime, against the fp32 references.

Named cases instead of a full product: GQA ratios 1/4/8, head dims 64/128, decode and chunked
prefill, partial last block, a single block, permuted physical blocks, every block selected,
fp16 inputs. The pool passed to the op holds the past only; the reference gets the pool with the
chunk appended (the op's documented contract).
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from tests.graph._graph_harness import session
from ucm_trt import reference as R
from ucm_trt.graph.functions import build_function, make_single_op_model
from ucm_trt.graph.schemas import SCHEMAS, get_schema, node_attributes

CASES = {
    # name: (B, Hq, Hkv, D, block_size, T, seq_lens, selection kind)
    "decode_mha_d64": (2, 4, 4, 64, 16, 1, (37, 50), "sparse"),
    "decode_gqa4_d128": (1, 8, 2, 128, 16, 1, (70,), "sparse"),
    "decode_gqa8_d64": (2, 8, 1, 64, 8, 1, (33, 17), "sparse"),
    "prefill_chunk_gqa4": (2, 8, 2, 64, 16, 5, (40, 21), "sparse"),
    "prefill_from_empty": (2, 4, 2, 64, 16, 9, (9, 9), "all"),
    "one_block": (1, 4, 2, 64, 16, 3, (12,), "all"),
    "all_selected_partial_last": (2, 4, 2, 64, 8, 2, (29, 44), "all"),
}


def _case(name, seed=0, dtype=torch.float32):
    b, hq, hkv, d, bs, t, lens, kind = CASES[name]
    g = torch.Generator().manual_seed(seed)
    lens_t = torch.tensor(lens, dtype=torch.int32)
    max_blocks = max(-(-n // bs) for n in lens) + 1
    num_blocks = b * max_blocks + 2
    bt = torch.randperm(num_blocks, generator=g)[: b * max_blocks].reshape(b, max_blocks).int()
    pool = torch.randn(num_blocks, 2, hkv, bs, d, generator=g)
    q = torch.randn(b, hq, t, d, generator=g)
    k = torch.randn(b, hkv, t, d, generator=g)
    v = torch.randn(b, hkv, t, d, generator=g)
    # past-only pool for the op: zero the chunk slots (they are the op's k/v inputs)
    past_pool, full = pool.clone(), pool.clone()
    for bi, n in enumerate(lens):
        for ti in range(t):
            p = n - t + ti
            past_pool[bt[bi, p // bs], :, :, p % bs] = 0
            full[bt[bi, p // bs], 0, :, p % bs] = k[bi, :, ti]
            full[bt[bi, p // bs], 1, :, p % bs] = v[bi, :, ti]
    if kind == "all":
        sel = None
        sel_np = np.broadcast_to(np.arange(max_blocks, dtype=np.int32), (b, hkv, max_blocks)).copy()
    else:
        width = 3
        sel_t = torch.full((b, hkv, width), -1, dtype=torch.int32)
        for bi, n in enumerate(lens):
            nb = -(-n // bs)
            for h in range(hkv):
                ids = sorted({0, nb - 1} | set(torch.randperm(nb, generator=g)[:1].tolist()))
                sel_t[bi, h, : len(ids)] = torch.tensor(ids, dtype=torch.int32)
        sel, sel_np = sel_t, sel_t.numpy()
    feeds = dict(q=q.to(dtype).numpy(), k=k.to(dtype).numpy(), v=v.to(dtype).numpy(),
                 kv_pool=past_pool.to(dtype).numpy(), block_table=bt.numpy(), seq_lens=lens_t.numpy(),
                 selection=sel_np)  # fmt: skip
    geo = dict(num_q_heads=hq, num_kv_heads=hkv, head_dim=d, block_size=bs)
    return feeds, (q, full, bt, lens_t, sel), geo


def _run(op, feeds, opset=20, dtype="float", **attrs):
    return session(make_single_op_model(op, opset=opset, dtype=dtype, **attrs)).run(None, feeds)[0]


@pytest.mark.parametrize("name", list(CASES))
def test_sparse_op_matches_reference(name):
    feeds, (q, full, bt, lens, sel), geo = _case(name)
    scale = 1.0 / np.sqrt(geo["head_dim"])
    got = _run("UcmPagedSparseAttention", feeds, **geo, scale=scale)
    want = R.paged_sparse_attention(q, full, bt, lens, sel, scale=scale).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_sparse_op_selection_matters_and_padding_is_ignored():
    feeds, (q, full, bt, lens, sel), geo = _case("decode_gqa4_d128")
    dense = _run("UcmPagedSparseAttention", {**feeds, "selection": np.broadcast_to(
        np.arange(bt.shape[1], dtype=np.int32), (1, 2, bt.shape[1])).copy()}, **geo, scale=0.1)  # fmt: skip
    sparse = _run("UcmPagedSparseAttention", feeds, **geo, scale=0.1)
    assert np.abs(dense - sparse).max() > 1e-3
    padded = np.concatenate([feeds["selection"], np.full((1, 2, 4), -1, np.int32)], axis=2)
    np.testing.assert_array_equal(_run("UcmPagedSparseAttention", {**feeds, "selection": padded}, **geo,
                                       scale=0.1), sparse)  # fmt: skip


def test_sparse_op_fp16():
    feeds, (q, full, bt, lens, sel), geo = _case("prefill_chunk_gqa4", dtype=torch.float16)
    got = _run("UcmPagedSparseAttention", feeds, dtype="float16", **geo, scale=0.125)
    assert got.dtype == np.float16
    want = R.paged_sparse_attention(q.half(), full.half(), bt, lens, sel, scale=0.125).numpy()
    np.testing.assert_allclose(got.astype(np.float32), want, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("name", ["decode_gqa4_d128", "prefill_chunk_gqa4", "all_selected_partial_last"])
@pytest.mark.parametrize("window, logn", [(8, None), (24, 32), (1000, None)])
def test_rerope_op_matches_reference(name, window, logn):
    feeds, (q, full, bt, lens, sel), geo = _case(name, seed=1)
    got = _run("UcmPagedReRoPEAttention", feeds, opset=17, **geo, scale=0.1, rope_theta=10000.0,
               rerope_window=window, logn_training_length=logn or 0)  # fmt: skip
    want = R.paged_rerope_attention(q, full, bt, lens, sel, window=window, theta=10000.0,
                                    logn_training_length=logn, scale=0.1).numpy()  # fmt: skip
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)


def test_rerope_op_with_huge_window_is_rope_attention():
    """Metamorphic: window >= every distance and no log-n -> sparse op over rotated q/k."""
    feeds, (q, full, bt, lens, sel), geo = _case("prefill_chunk_gqa4", seed=2)
    rr = _run("UcmPagedReRoPEAttention", feeds, **geo, scale=0.1, rope_theta=500.0, rerope_window=10**6)
    t = q.shape[2]
    pos_q = torch.stack([torch.arange(n - t, n) for n in lens.tolist()])[:, None]  # [B, 1, T]
    rot = dict(feeds)
    rot["q"] = R.apply_rope(torch.from_numpy(feeds["q"]), pos_q, theta=500.0).numpy()
    rot["k"] = R.apply_rope(torch.from_numpy(feeds["k"]), pos_q, theta=500.0).numpy()
    pool = torch.from_numpy(feeds["kv_pool"]).clone()
    bs = geo["block_size"]
    for bi in range(bt.shape[0]):
        for j in range(bt.shape[1] * bs):
            pool[bt[bi, j // bs], 0, :, j % bs] = R.apply_rope(pool[bt[bi, j // bs], 0, :, j % bs], torch.tensor(j),
                                                              theta=500.0)  # fmt: skip
    rot["kv_pool"] = pool.numpy()
    sp = _run("UcmPagedSparseAttention", rot, **geo, scale=0.1)
    np.testing.assert_allclose(rr, sp, rtol=2e-5, atol=2e-5)


def test_select_all_blocks():
    bt = np.arange(12, dtype=np.int32).reshape(2, 6)[:, ::-1].copy()
    got = session(make_single_op_model("UcmSelectAllBlocks", num_kv_heads=3)).run(None, {"block_table": bt})[0]
    assert got.dtype == np.int32 and got.shape == (2, 3, 6)
    np.testing.assert_array_equal(got[1, 2], np.arange(6))


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_schema_and_function_agree(name):
    s = get_schema(name)
    fn = build_function(name, opset=20)
    assert fn.domain == "ucm" and fn.name == s.name
    assert list(fn.input) == [t.name for t in s.inputs] and list(fn.output) == [t.name for t in s.outputs]
    assert list(fn.attribute) == [a.name for a in s.all_attributes]
    assert {"plugin_namespace", "plugin_version"} <= set(fn.attribute)
    # never an ONNX built-in name (TensorRT would bind its builtin importer first)
    assert s.name not in ("Attention", "RotaryEmbedding")
    for domain in ("", "com.microsoft"):
        assert not onnx.defs.has(s.name, domain)
    m = make_single_op_model(name, opset=20, **{a.name: 2 if a.kind == "int" else 1.0
                                                for a in s.attributes if a.default is None})  # fmt: skip
    onnx.checker.check_model(m, full_check=True)
    node = m.graph.node[0]
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    assert attrs["plugin_namespace"] == b"ucm" and attrs["plugin_version"] == b"1"


def test_schema_attribute_validation():
    s = get_schema("UcmPagedSparseAttention")
    base = dict(num_q_heads=8, num_kv_heads=2, head_dim=64, block_size=16, scale=0.125)
    assert node_attributes(s, **base)["plugin_namespace"] == "ucm"
    with pytest.raises(ValueError, match="must be a multiple of num_kv_heads"):
        node_attributes(s, **{**base, "num_q_heads": 7})
    with pytest.raises(ValueError, match="block_size must be >= 1"):
        node_attributes(s, **{**base, "block_size": 0})
    with pytest.raises(TypeError, match="head_dim must be of type int"):
        node_attributes(s, **{**base, "head_dim": 64.0})
    with pytest.raises(ValueError, match="required"):
        node_attributes(s, num_q_heads=8)
    with pytest.raises(ValueError, match="has no attribute"):
        node_attributes(s, **base, window=3)
    with pytest.raises(ValueError, match="unknown UCM op 'Attention'; valid ops"):
        get_schema("Attention")
    with pytest.raises(ValueError, match="opset must be an int >= 15"):
        build_function("UcmPagedSparseAttention", opset=13)


def test_docs_embed_the_schemas():
    from pathlib import Path

    from ucm_trt.graph.schemas import render_markdown

    doc = (Path(__file__).resolve().parents[2] / "docs" / "graph.md").read_text()
    for s in SCHEMAS.values():
        assert render_markdown(s) in doc, f"docs/graph.md is out of date for {s.name}"
