"""Drive an original (contiguous KV) and a rewritten (paged KV) ONNX model step by step.

The paged side keeps a numpy KV pool per layer with PERMUTED physical blocks, appends the
``new_key.{i}``/``new_value.{i}`` outputs after every step, and feeds ``seq_lens``,
``block_table`` and per-layer selections exactly as the runtime will.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from ucm_trt import reference as R


def session(model) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    so.log_severity_level = 3
    data = str(model) if isinstance(model, Path) else model if isinstance(model, (str, bytes)) else model.SerializeToString()
    return ort.InferenceSession(data, so, providers=["CPUExecutionProvider"])


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    """max |a - b| relative to max |b| (floored at 1)."""
    return float(np.abs(a - b).max() / max(1.0, float(np.abs(b).max())))


class ContiguousRunner:
    """The exported model: input_ids, attention_mask, position_ids, past_key_values.* -> logits, present.*."""

    def __init__(self, model, batch: int, num_layers: int, kv_heads: int, head_dim: int):
        self.sess = session(model)
        self.names = [i.name for i in self.sess.get_inputs()]
        self.batch, self.L = batch, num_layers
        self.past = {
            f"past_key_values.{i}.{kv}": np.zeros((batch, kv_heads, 0, head_dim), np.float32)
            for i in range(num_layers)
            for kv in ("key", "value")
        }
        self.length = 0

    def step(self, ids: np.ndarray) -> np.ndarray:
        b, t = ids.shape
        feeds = {
            "input_ids": ids.astype(np.int64),
            "attention_mask": np.ones((b, self.length + t), np.int64),
            "position_ids": np.broadcast_to(np.arange(self.length, self.length + t), (b, t)).astype(np.int64),
            **self.past,
        }
        feeds = {k: v for k, v in feeds.items() if k in self.names}
        outs = self.sess.run(None, feeds)
        onames = [o.name for o in self.sess.get_outputs()]
        for name, val in zip(onames, outs, strict=True):
            if name.startswith("present."):
                _, i, kv = name.split(".")
                self.past[f"past_key_values.{i}.{kv}"] = val
        self.length += t
        return outs[0]


class PagedRunner:
    """The rewritten model over a numpy paged pool with a permuted block table."""

    def __init__(self, model, batch: int, num_layers: int, kv_heads: int, head_dim: int, block_size: int,
                 max_blocks: int, seed: int = 0):  # fmt: skip
        self.sess = session(model)
        self.in_names = {i.name for i in self.sess.get_inputs()}
        self.out_names = [o.name for o in self.sess.get_outputs()]
        rng = np.random.default_rng(seed)
        self.num_blocks = batch * max_blocks + 3
        self.block_table = rng.permutation(self.num_blocks)[: batch * max_blocks].reshape(batch, max_blocks)
        self.block_table = self.block_table.astype(np.int32)
        self.pools = [np.zeros((self.num_blocks, 2, kv_heads, block_size, head_dim), np.float32)
                      for _ in range(num_layers)]  # fmt: skip
        self.bs, self.L, self.batch = block_size, num_layers, batch
        self.lengths = np.zeros(batch, np.int64)
        self.last_outputs: dict[str, np.ndarray] = {}

    def step(self, ids: np.ndarray, selections: list[np.ndarray] | None = None) -> np.ndarray:
        b, t = ids.shape
        feeds = {
            "input_ids": ids.astype(np.int64),
            "position_ids": (self.lengths[:, None] + np.arange(t)[None]).astype(np.int64),
            "seq_lens": (self.lengths + t).astype(np.int32),
            "block_table": self.block_table,
            # the split-K scratch: zeros (the function bodies do not read it; the TensorRT backend binds
            # a zeroed buffer of the engine's length)
            "attn_split_counters": np.zeros(1, np.int32),
        }
        for i in range(self.L):
            feeds[f"kv_pool.{i}"] = self.pools[i]
            if f"selection.{i}" in self.in_names:
                if selections is None:
                    raise ValueError("model has selection inputs; pass selections")
                feeds[f"selection.{i}"] = selections[i]
        feeds = {k: v for k, v in feeds.items() if k in self.in_names}
        outs = dict(zip(self.out_names, self.sess.run(None, feeds), strict=True))
        self.last_outputs = outs
        for i in range(self.L):
            self.append(i, outs[f"new_key.{i}"], outs[f"new_value.{i}"])
        self.lengths += t
        return outs["logits"]

    def append(self, layer: int, k: np.ndarray, v: np.ndarray) -> None:
        for bi in range(k.shape[0]):
            for ti in range(k.shape[2]):
                p = int(self.lengths[bi]) + ti
                phys = self.block_table[bi, p // self.bs]
                self.pools[layer][phys, 0, :, p % self.bs] = k[bi, :, ti]
                self.pools[layer][phys, 1, :, p % self.bs] = v[bi, :, ti]

    def all_blocks(self, kv_heads: int) -> list[np.ndarray]:
        m = self.block_table.shape[1]
        sel = np.broadcast_to(np.arange(m, dtype=np.int32), (self.batch, kv_heads, m)).copy()
        return [sel] * self.L


def sparse_selection(rng, batch: int, kv_heads: int, total_len: int, block_size: int, width: int) -> np.ndarray:
    """Sink block 0 + the block holding the last past token + random others; -1 padded, sorted."""
    n_blocks = max(1, -(-total_len // block_size))
    sel = np.full((batch, kv_heads, width), -1, np.int32)
    for b in range(batch):
        for h in range(kv_heads):
            keep = {0, n_blocks - 1}
            others = [j for j in range(n_blocks) if j not in keep]
            extra = rng.choice(others, size=min(len(others), max(0, width - 3)), replace=False) if others else []
            ids = sorted(keep | {int(x) for x in extra})[:width]
            sel[b, h, : len(ids)] = ids
    return sel


class TorchPagedReference:
    """A transformers attention function (AttentionInterface) that computes each layer with the
    fp32 paged reference over a pool built from the model's own cache, with the test's
    selection for that layer. ``mode`` is "sparse" or "rerope" (then q/k are un-rotated first).
    """

    def __init__(self, block_size: int, mode: str = "sparse", theta: float | None = None,
                 window: int | None = None, logn_training_length: int | None = None):  # fmt: skip
        self.bs, self.mode, self.theta = block_size, mode, theta
        self.window, self.logn = window, logn_training_length
        self.selections: list[np.ndarray] | None = None

    def __call__(self, module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
        b, hkv, total, d = key.shape
        tq = query.shape[2]
        if self.mode == "rerope":  # HF rotated with true positions; undo it (rotation is orthogonal)
            query = R.apply_rope(query, -torch.arange(total - tq, total), theta=self.theta)
            key = R.apply_rope(key, -torch.arange(total), theta=self.theta)
        nblk = -(-total // self.bs)
        pool = torch.zeros(b * nblk, 2, hkv, self.bs, d)
        bt = torch.arange(b * nblk, dtype=torch.int32).reshape(b, nblk).flip(1).contiguous()  # non-identity
        for bi in range(b):
            for p in range(total):
                pool[bt[bi, p // self.bs], 0, :, p % self.bs] = key[bi, :, p]
                pool[bt[bi, p // self.bs], 1, :, p % self.bs] = value[bi, :, p]
        seq = torch.full((b,), total, dtype=torch.int32)
        sel = None if self.selections is None else torch.from_numpy(self.selections[module.layer_idx])
        if self.mode == "rerope":
            out = R.paged_rerope_attention(query, pool, bt, seq, sel, window=self.window, theta=self.theta,
                                           logn_training_length=self.logn, scale=scaling)  # fmt: skip
        else:
            out = R.paged_sparse_attention(query, pool, bt, seq, sel, scale=scaling)
        return out.transpose(1, 2).contiguous(), None


class TorchRunner:
    """Greedy-free step driver of a transformers model with a DynamicCache."""

    def __init__(self, model):
        from transformers import DynamicCache

        self.model, self.cache, self.length = model, DynamicCache(), 0

    @torch.no_grad()
    def step(self, ids: np.ndarray) -> np.ndarray:
        b, t = ids.shape
        pos = torch.arange(self.length, self.length + t).expand(b, t)
        out = self.model(input_ids=torch.from_numpy(ids.astype(np.int64)), position_ids=pos,
                         attention_mask=torch.ones(b, self.length + t, dtype=torch.int64),
                         cache=self.cache, use_cache=True)  # fmt: skip
        self.cache = out.cache
        self.length += t
        return out.logits.float().numpy()
