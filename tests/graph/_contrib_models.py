"""Tiny decoder graphs built with onnx.helper around ONNX Runtime contrib attention ops,
shaped like ONNX Runtime GenAI's builder output, plus a torch twin of the same weights whose
attention is a pluggable function (the fp32 paged references in the tests).

kinds:
* ``gqa-fused``: com.microsoft.GroupQueryAttention with do_rotary=1 (cos/sin caches);
  inputs input_ids, attention_mask, past_key_values.*; seqlens_k/total_sequence_length from the mask.
* ``gqa-packed``: GroupQueryAttention with packed QKV (one MatMul), do_rotary=1, and the newer
  ``position_ids`` + ``attention_bias`` (a causal bias built from the mask) inputs.
* ``gqa-op``:    com.microsoft.RotaryEmbedding on Q and K, then GroupQueryAttention (do_rotary=0).
* ``mha``:       com.microsoft.RotaryEmbedding on Q and K, then MultiHeadAttention (unidirectional=1),
  Hq == Hkv; has a position_ids input.
* ``onnx-attention``: opset 23 ONNX RotaryEmbedding (4-D, position_ids, cos/sin caches) and ONNX
  ``Attention`` with its own past_key/past_value inputs and present outputs (native GQA, is_causal=1).
"""

from __future__ import annotations

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from ucm_trt import reference as R

MS = "com.microsoft"


def build(kind: str, *, layers=2, hidden=64, hq=4, hkv=2, d=16, vocab=100, theta=10000.0, max_pos=64, seed=0,
          attn_attrs=None, rope_interleaved=0):
    """attn_attrs: {layer: {attr: value}} overrides on the attention node (near-miss variants)."""
    attn_attrs = attn_attrs or {}
    if kind == "mha":
        hkv = hq
    rng = np.random.default_rng(seed)
    w = {"embed": rng.standard_normal((vocab, hidden)).astype(np.float32) * 0.5,
         "lm_head": rng.standard_normal((hidden, vocab)).astype(np.float32) * 0.2}  # fmt: skip
    for i in range(layers):
        for name, shape in (("q", (hidden, hq * d)), ("k", (hidden, hkv * d)), ("v", (hidden, hkv * d)),
                            ("o", (hq * d, hidden))):  # fmt: skip
            w[f"{name}{i}"] = (rng.standard_normal(shape) / np.sqrt(shape[0])).astype(np.float32)
    inv = theta ** (-np.arange(0, d, 2, dtype=np.float64) / d)
    ang = np.arange(max_pos)[:, None] * inv[None]
    w["cos"], w["sin"] = np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32)

    inits = [numpy_helper.from_array(v, k) for k, v in w.items()]
    nodes, inputs, outputs = [], [], []

    def c(name, arr):
        inits.append(numpy_helper.from_array(np.asarray(arr), name))
        return name

    inputs.append(helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"]))
    inputs.append(helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "total"]))
    if kind != "gqa-fused":
        inputs.append(helper.make_tensor_value_info("position_ids", TensorProto.INT64, ["batch", "seq"]))
    if kind == "gqa-packed":  # causal additive bias [1, 1, S, total] from the mask's width
        c("zero_i64", np.array(0, np.int64))
        c("one_s", np.array(1, np.int64))
        c("ax01", np.array([0, 1], np.int64))
        c("ax0", np.array([0], np.int64))
        c("bias_zero", np.array(0.0, np.float32))
        c("bias_neg", np.array(np.finfo(np.float32).min, np.float32))
        nodes += [
            helper.make_node("Shape", ["attention_mask"], ["tot1"], start=1, end=2),
            helper.make_node("Shape", ["input_ids"], ["s1"], start=1, end=2),
            helper.make_node("Squeeze", ["tot1", "ax0"], ["tot"]),
            helper.make_node("Squeeze", ["s1", "ax0"], ["s"]),
            helper.make_node("Sub", ["tot", "s"], ["past_len"]),
            helper.make_node("Range", ["zero_i64", "s", "one_s"], ["ri"]),
            helper.make_node("Range", ["zero_i64", "tot", "one_s"], ["rj"]),
            helper.make_node("Add", ["ri", "past_len"], ["qpos"]),
            helper.make_node("Unsqueeze", ["qpos", "one_i64b"], ["qpos2"]),
            helper.make_node("LessOrEqual", ["rj", "qpos2"], ["vis"]),
            helper.make_node("Where", ["vis", "bias_zero", "bias_neg"], ["bias2"]),
            helper.make_node("Unsqueeze", ["bias2", "ax01"], ["attn_bias"]),
        ]
        c("one_i64b", np.array([1], np.int64))
        w_packed = {i: np.concatenate([w[f"q{i}"], w[f"k{i}"], w[f"v{i}"]], axis=1) for i in range(layers)}
        for i in range(layers):
            c(f"qkv{i}", w_packed[i])
    nodes.append(helper.make_node("Gather", ["embed", "input_ids"], ["h0"], axis=0))
    if kind.startswith("gqa"):
        c("one_i64", np.array([1], np.int64))
        nodes += [
            helper.make_node("ReduceSum", ["attention_mask", "one_i64"], ["mask_sum"], keepdims=0),
            helper.make_node("Sub", ["mask_sum", "one_i64"], ["seqlens_k64"]),
            helper.make_node("Cast", ["seqlens_k64"], ["seqlens_k"], to=TensorProto.INT32),
            helper.make_node("Shape", ["attention_mask"], ["total64"], start=1, end=2),
            helper.make_node("Squeeze", ["total64"], ["total64s"]),
            helper.make_node("Cast", ["total64s"], ["total_len"], to=TensorProto.INT32),
        ]
    h = "h0"
    for i in range(layers):
        pk, pv = f"past_key_values.{i}.key", f"past_key_values.{i}.value"
        inputs += [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["batch", hkv, "past", d]) for n in (pk, pv)]
        outputs += [helper.make_tensor_value_info(f"present.{i}.{kv}", TensorProto.FLOAT, ["batch", hkv, "total", d])
                    for kv in ("key", "value")]  # fmt: skip
        if kind == "gqa-packed":
            nodes.append(helper.make_node("MatMul", [h, f"qkv{i}"], [f"qkv_{i}"]))
            nodes.append(helper.make_node(
                "GroupQueryAttention",
                [f"qkv_{i}", "", "", pk, pv, "seqlens_k", "total_len", "cos", "sin", "position_ids", "attn_bias"],
                [f"attn_{i}", f"present.{i}.key", f"present.{i}.value"], domain=MS,
                num_heads=hq, kv_num_heads=hkv, do_rotary=1, rotary_interleaved=0,
            ))  # fmt: skip
            nodes += [helper.make_node("MatMul", [f"attn_{i}", f"o{i}"], [f"ao_{i}"]),
                      helper.make_node("Add", [h, f"ao_{i}"], [f"h{i + 1}"])]  # fmt: skip
            h = f"h{i + 1}"
            continue
        nodes += [helper.make_node("MatMul", [h, f"{x}{i}"], [f"{x}_{i}"]) for x in "qkv"]
        q, k = f"q_{i}", f"k_{i}"
        if kind == "onnx-attention":
            if i == 0:
                c("shape_q", np.array([0, 0, hq, d], np.int64))
                c("shape_kv", np.array([0, 0, hkv, d], np.int64))
                c("shape_out", np.array([0, 0, -1], np.int64))
            for x, shp in (("q", "shape_q"), ("k", "shape_kv"), ("v", "shape_kv")):
                nodes += [helper.make_node("Reshape", [f"{x}_{i}", shp], [f"{x}4r_{i}"]),
                          helper.make_node("Transpose", [f"{x}4r_{i}"], [f"{x}4_{i}"], perm=[0, 2, 1, 3])]  # fmt: skip
            nodes += [helper.make_node("RotaryEmbedding", [f"{x}4_{i}", "cos", "sin", "position_ids"], [f"{x}r_{i}"],
                                       interleaved=0) for x in "qk"]  # fmt: skip
            nodes += [
                helper.make_node("Attention", [f"qr_{i}", f"kr_{i}", f"v4_{i}", "", pk, pv],
                                 [f"y_{i}", f"present.{i}.key", f"present.{i}.value"], is_causal=1),
                helper.make_node("Transpose", [f"y_{i}"], [f"yt_{i}"], perm=[0, 2, 1, 3]),
                helper.make_node("Reshape", [f"yt_{i}", "shape_out"], [f"attn_{i}"]),
                helper.make_node("MatMul", [f"attn_{i}", f"o{i}"], [f"ao_{i}"]),
                helper.make_node("Add", [h, f"ao_{i}"], [f"h{i + 1}"]),
            ]  # fmt: skip
            h = f"h{i + 1}"
            continue
        if kind != "gqa-fused":
            nodes += [
                helper.make_node("RotaryEmbedding", [q, "position_ids", "cos", "sin"], [f"qr_{i}"], domain=MS,
                                 interleaved=rope_interleaved, num_heads=hq),
                helper.make_node("RotaryEmbedding", [k, "position_ids", "cos", "sin"], [f"kr_{i}"], domain=MS,
                                 interleaved=rope_interleaved, num_heads=hkv),
            ]  # fmt: skip
            q, k = f"qr_{i}", f"kr_{i}"
        outs = [f"attn_{i}", f"present.{i}.key", f"present.{i}.value"]
        if kind.startswith("gqa"):
            rot = kind == "gqa-fused"
            nodes.append(helper.make_node(
                "GroupQueryAttention",
                [q, k, f"v_{i}", pk, pv, "seqlens_k", "total_len"] + (["cos", "sin"] if rot else []),
                outs, domain=MS, **{"num_heads": hq, "kv_num_heads": hkv, "do_rotary": int(rot),
                                    "rotary_interleaved": 0, **attn_attrs.get(i, {})},
            ))  # fmt: skip
        else:
            nodes.append(helper.make_node("MultiHeadAttention", [q, k, f"v_{i}", "", "", "", pk, pv], outs,
                                          domain=MS, **{"num_heads": hq, "unidirectional": 1,
                                                        **attn_attrs.get(i, {})}))  # fmt: skip
        nodes += [helper.make_node("MatMul", [f"attn_{i}", f"o{i}"], [f"ao_{i}"]),
                  helper.make_node("Add", [h, f"ao_{i}"], [f"h{i + 1}"])]  # fmt: skip
        h = f"h{i + 1}"
    nodes.append(helper.make_node("MatMul", [h, "lm_head"], ["logits"]))
    outputs.insert(0, helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "seq", vocab]))
    g = helper.make_graph(nodes, f"tiny_{kind}", inputs, outputs, inits)
    opset = 23 if kind == "onnx-attention" else 17
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid(MS, 1)])
    m.ir_version = 9
    onnx.checker.check_model(m)
    meta = dict(layers=layers, hq=hq, hkv=hkv, d=d, theta=theta)
    return m, w, meta


class TorchTwin:
    """The same network in torch with a paged pool per layer; attention = a reference function.

    mode "sparse": K stored post-RoPE, attention = paged_sparse_attention.
    mode "rerope": K stored un-rotated, attention = paged_rerope_attention.
    """

    def __init__(self, w, meta, *, block_size, mode="sparse", window=None, logn=None, batch=2, max_blocks=8):
        self.w = {k: torch.from_numpy(v) for k, v in w.items()}
        self.meta, self.bs, self.mode, self.window, self.logn = meta, block_size, mode, window, logn
        n = batch * max_blocks
        self.bt = torch.randperm(n, generator=torch.Generator().manual_seed(5)).reshape(batch, max_blocks).int()
        self.pools = [torch.zeros(n, 2, meta["hkv"], block_size, meta["d"]) for _ in range(meta["layers"])]
        self.length = 0
        self.last_query: list[np.ndarray] = []  # per layer: q of the last chunk token (as fed to attention)
        self.chunk_query: list[np.ndarray] = []  # per layer: q of every chunk token [B, Hq, T, D]

    def step(self, ids: np.ndarray, selections=None) -> np.ndarray:
        m, w = self.meta, self.w
        b, t = ids.shape
        pos = torch.arange(self.length, self.length + t)
        seq = torch.full((b,), self.length + t, dtype=torch.int32)
        h = w["embed"][torch.from_numpy(ids)]
        self.last_query = []
        self.chunk_query = []
        for i in range(m["layers"]):
            q = (h @ w[f"q{i}"]).reshape(b, t, m["hq"], m["d"]).transpose(1, 2)
            k = (h @ w[f"k{i}"]).reshape(b, t, m["hkv"], m["d"]).transpose(1, 2)
            v = (h @ w[f"v{i}"]).reshape(b, t, m["hkv"], m["d"]).transpose(1, 2)
            if self.mode == "sparse":
                q, k = R.apply_rope(q, pos, theta=m["theta"]), R.apply_rope(k, pos, theta=m["theta"])
            for bi in range(b):
                for ti in range(t):
                    p = self.length + ti
                    self.pools[i][self.bt[bi, p // self.bs], 0, :, p % self.bs] = k[bi, :, ti]
                    self.pools[i][self.bt[bi, p // self.bs], 1, :, p % self.bs] = v[bi, :, ti]
            self.last_query.append(q[:, :, -1].numpy())
            self.chunk_query.append(q.numpy())
            sel = None if selections is None else torch.from_numpy(selections[i])
            if self.mode == "sparse":
                o = R.paged_sparse_attention(q, self.pools[i], self.bt, seq, sel)
            else:
                o = R.paged_rerope_attention(q, self.pools[i], self.bt, seq, sel, window=self.window,
                                             theta=m["theta"], logn_training_length=self.logn)  # fmt: skip
            h = h + o.transpose(1, 2).reshape(b, t, -1) @ w[f"o{i}"]
        self.length += t
        return (h @ w["lm_head"]).numpy()
