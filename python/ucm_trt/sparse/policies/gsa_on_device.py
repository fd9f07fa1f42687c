"""GSA On-Device: hash codes of K, Hamming block scores and top-k on the KV's device
(upstream ``ucm/sparse/gsa_on_device``, HATA-style; ucm-upstream.md §4).

* Every K appended to the pool (prefill and decode) is hashed into a paged code cache
  ``[num_device_blocks, Hkv, block_size, bits/8]`` per layer that shares the KV pool's physical
  block ids (:meth:`on_append`; with ``use_kernel`` one Triton launch per layer,
  ``ucm_trt.kernels.encode_keys_into``). Rollback and reuse layers keep no code cache.
* Each decode step, inside each layer's attention (:meth:`layer_selection`): the query is
  averaged over each GQA group and hashed; a block's distance is the minimum over its tokens of
  ``popcount(q_code XOR k_code)``, then the minimum over KV heads for a shared selection; the
  ``top_k_tokens // block_size`` blocks (sink and local windows included) with the smallest
  distances are selected. Nothing leaves the device; KV is not offloaded.
* Gate (per step, for the whole batch): sparse decode only when at least
  ``concurrency_threshold`` rows have ``seq_len >= seq_len_threshold``; otherwise dense.
* ``head_merge`` (:class:`~ucm_trt.config.HeadMerge`): with ``"union"`` and a per-head selection, every KV
  head attends the union of its layer's heads' blocks (as ESA / GSA / KVStar), built on the device at a
  fixed width (``num_kv_heads`` x the per-head width, at most the table's), so graphs still capture it.
* ``rollback_layers`` always run dense; ``layer_reuse[l] = src`` makes layer ``l`` reuse this
  step's selection of layer ``src``.
* ``use_kernel`` (default: on CUDA) runs the fused Triton ``ucm_trt.kernels.hash_retrieve`` (query hash,
  paged Hamming scores and block top-k in one launch, one scratch workspace per policy, the engine's
  index guard flagged on a bad block-table id); otherwise
  PyTorch ops from :mod:`ucm_trt.sparse.score` / :mod:`ucm_trt.sparse.select`. Both give the same selection (a CPU test runs the kernel under the
  Triton interpreter against the PyTorch path).
"""

from __future__ import annotations

from typing import Any

import torch

from ucm_trt.config import GSAOnDeviceConfig, HeadMerge
from ucm_trt.sparse.policies.base import Policy, PolicyRuntime, RequestView
from ucm_trt.sparse.representations import HashEncoder, block_lens_from_seq_lens
from ucm_trt.sparse.score import hamming_scores, reduce_scores
from ucm_trt.sparse.select import select_blocks_by_count, union_kv_heads_fixed

__all__ = ["GSAOnDevicePolicy"]


class GSAOnDevicePolicy(Policy):
    name = "gsa-on-device"
    offload = False

    def __init__(self, config: GSAOnDeviceConfig | None = None, *, use_kernel: bool | None = None,
                 dense_layers=None, head_merge: HeadMerge | None = None) -> None:
        super().__init__(dense_layers=dense_layers)
        if config is None:
            config = GSAOnDeviceConfig()
        if not isinstance(config, GSAOnDeviceConfig):
            raise TypeError(f"config must be a GSAOnDeviceConfig, got {type(config).__name__}")
        if head_merge is None:
            head_merge = HeadMerge()
        if not isinstance(head_merge, HeadMerge):
            raise TypeError(f"head_merge must be a HeadMerge or None, got {type(head_merge).__name__}")
        #: what each KV head attends of a per-head selection: its own blocks, or its layer's union
        #: (per step on the device, :func:`~ucm_trt.sparse.select.union_kv_heads_fixed`)
        self.head_merge = head_merge
        if use_kernel is not None and not isinstance(use_kernel, bool):
            raise TypeError(f"use_kernel must be a bool or None (auto: on CUDA), got {use_kernel!r}")
        self.config = config
        self.use_kernel = use_kernel
        self._gate = False
        self._dense_now: frozenset[int] = frozenset()  # dense layers of this step (union over its rows)
        self._step_sel: dict[int, torch.Tensor] = {}
        self.sparse_steps = 0
        self.dense_steps = 0
        # selected blocks are counted on the device (no host sync per layer; a captured CUDA
        # graph keeps counting on replay); candidates are counted on the host in plan()
        self._selected_dev: torch.Tensor | None = None
        self.candidate_blocks = 0

    def bind(self, rt: PolicyRuntime) -> None:
        super().bind(rt)
        cfg, s, shape = self.config, rt.sparse, rt.shape
        cfg.check_num_layers(shape.num_layers)
        if s.scoring != "hamming" or s.representation != "hash":
            raise ValueError(
                "GSA On-Device scores hash codes: SparseConfig must have scoring='hamming' and "
                f"representation='hash', got scoring={s.scoring!r}, representation={s.representation!r}"
            )
        forced = s.sink_blocks + s.local_blocks
        if cfg.top_k_tokens // s.block_size <= forced:
            raise ValueError(
                f"GSAOnDeviceConfig.top_k_tokens ({cfg.top_k_tokens}) must exceed the forced windows: "
                f"(sink_blocks + local_blocks) * block_size = {forced * s.block_size}"
            )
        bits = cfg.resolved_hash_bits(shape.head_dim)
        if bits % 8:
            raise ValueError(
                f"GSA On-Device codes are packed in bytes: head_dim {shape.head_dim} x "
                f"GSAOnDeviceConfig.hash_bits_per_dim {cfg.hash_bits_per_dim or 1} = {bits} bits is not a multiple "
                "of 8; set GSAOnDeviceConfig.hash_bits"
            )
        dev = rt.device
        n_dev = rt.kv.pools[0].shape[0]
        if self.use_kernel is None:
            self.use_kernel = dev.type == "cuda"
        self._selected_dev = torch.zeros((), dtype=torch.int64, device=dev)
        self._workspace = None
        if self.use_kernel:
            from ucm_trt.kernels import RetrievalWorkspace

            self._workspace = RetrievalWorkspace(dev)
        self.encoders: dict[int, HashEncoder] = {}
        self.codes: dict[int, torch.Tensor] = {}
        self._weights: dict[int, torch.Tensor] = {}
        for layer in self._computing_layers():
            if cfg.hash_weights_path is not None:
                enc = HashEncoder.load(cfg.hash_weights_path, key=f"layer{layer}", device=dev)
            else:
                enc = HashEncoder.random(shape.head_dim, bits, seed=cfg.hash_seed + layer, device=dev)
            if self.use_kernel and enc.num_heads is not None:
                raise ValueError(
                    f"GSA On-Device hash weights of layer {layer} are per head {tuple(enc.weight.shape)}; the "
                    "fused retrieval kernel takes one [D, bits] projection (set use_kernel=False)"
                )
            self.encoders[layer] = enc
            self._weights[layer] = enc.weight.to(dev).contiguous()
            self.codes[layer] = torch.zeros(n_dev, shape.num_kv_heads, s.block_size, bits // 8,
                                            dtype=torch.uint8, device=dev)

    def _computing_layers(self) -> list[int]:
        cfg = self.config
        return [i for i in range(self.shape.num_layers)
                if i not in cfg.rollback_layers and i not in cfg.layer_reuse]

    def on_append(self, layer: int, phys_blocks: torch.Tensor, offsets: torch.Tensor, k: torch.Tensor) -> None:
        codes = self.codes.get(layer)
        if codes is None:
            return
        if self.use_kernel:
            # one launch: project, pack and store (the PyTorch path below is a float32 GEMM, five
            # elementwise kernels and an index_put per layer and step; ucm_trt.kernels.hash_encode)
            from ucm_trt.kernels.hash_encode import encode_keys_into

            encode_keys_into(k if k.stride(-1) == 1 else k.contiguous(), self._weights[layer], codes, phys_blocks,
                             offsets, validate=False, guard=self.rt.kv.guard)
            return
        enc = self.encoders[layer]
        codes[phys_blocks, :, offsets] = enc.encode(k)  # k [N, Hkv, D] -> [N, Hkv, bytes]

    def on_prefill_end(self, req: RequestView, queries: list[torch.Tensor]) -> None:
        self._decide_dense_layers(req, queries)

    def on_request_end(self, rid: str) -> None:
        self._end_dense(rid)

    def plan(self, reqs: list[RequestView]) -> list[list[torch.Tensor | None]]:
        self._gate = self.config.gate_open([r.new_len for r in reqs])
        # a layer dense for any row runs dense for the step (selections are per batch, not per row)
        self._dense_now = frozenset().union(*(self.dense_layers_of(r.rid) for r in reqs))
        if self._gate:
            self.sparse_steps += 1
            bs = self.sparse.block_size
            skipped = set(self.config.rollback_layers) | self._dense_now
            selecting = self.shape.num_layers - len(skipped)
            blocks = sum((r.new_len + bs - 1) // bs for r in reqs)
            self.candidate_blocks += blocks * self.shape.num_kv_heads * selecting
        else:
            self.dense_steps += 1
        self._step_sel = {}
        return super().plan(reqs)

    def graph_key(self) -> Any:
        # the PyTorch path sizes its tensors from the host's sequence lengths: not capturable
        return (self._gate, self._dense_now) if self.use_kernel else None

    @property
    def selected_blocks(self) -> int:
        return 0 if self._selected_dev is None else int(self._selected_dev)

    def layer_selection(self, layer: int, q: torch.Tensor, step: Any) -> Any:
        """``q [B, Hq, T, D]`` of this layer; ``step`` exposes ``tables(layer)``, ``seq_lens``,
        ``new_lens``. Returns a selection ``[B, Hkv, S]`` on q's device or ``None`` (dense)."""
        cfg = self.config
        if not self._gate or q.shape[2] != 1 or layer in cfg.rollback_layers or layer in self._dense_now:
            return None
        if layer in cfg.layer_reuse:
            if cfg.layer_reuse[layer] in self._dense_now:
                return None  # the source layer runs dense this step: so does the reusing layer
            sel = self._step_sel[cfg.layer_reuse[layer]]
            self._step_sel[layer] = sel
            self._selected_dev += (sel >= 0).sum()
            return sel
        s = self.sparse
        bs = s.block_size
        lens = step.new_lens
        if self.use_kernel:
            from ucm_trt.kernels import hash_retrieve

            sel = hash_retrieve(q[:, :, -1].contiguous(), self.codes[layer], self._weights[layer], step.tables(layer),
                                step.seq_lens, top_k=cfg.top_k_tokens // bs, sink_blocks=s.sink_blocks,
                                local_blocks=s.local_blocks, shared=s.selection == "shared", validate=False,
                                workspace=self._workspace, guard=self.rt.kv.guard)
            return self._keep(layer, sel, step.tables(layer).shape[1])
        nb_max = max((n + bs - 1) // bs for n in lens)
        table = step.tables(layer)[:, :nb_max].long()  # [B, nb]
        k_codes = self.codes[layer][table]  # [B, nb, Hkv, bs, bytes]
        seq = torch.tensor(lens, dtype=torch.int64, device=q.device)
        block_lens = block_lens_from_seq_lens(seq, nb_max, bs)
        scores = hamming_scores(q[:, :, -1, :], self.encoders[layer], k_codes, block_lens)
        if s.selection == "shared":
            scores = reduce_scores(scores, "hamming")
        nb = (seq + bs - 1) // bs
        keep = cfg.top_k_tokens // bs - s.sink_blocks - s.local_blocks
        sel = select_blocks_by_count(scores, nb.to(torch.int32), keep, sink_blocks=s.sink_blocks,
                                     local_blocks=s.local_blocks, num_kv_heads=self.shape.num_kv_heads)
        return self._keep(layer, sel, nb_max)

    def _keep(self, layer: int, sel: torch.Tensor, max_blocks: int) -> torch.Tensor:
        """The layer's selection as attention reads it (each head's own blocks, or with
        ``HeadMerge("union")`` and a per-head selection the union of the layer's heads), recorded
        for the layers that reuse it and counted on the device."""
        if self.head_merge.mode == "union" and self.sparse.selection == "per_head":
            sel = union_kv_heads_fixed(sel, max_blocks)
        self._step_sel[layer] = sel
        self._selected_dev += (sel >= 0).sum()
        return sel

    def stats(self) -> dict:
        frac = self.selected_blocks / self.candidate_blocks if self.candidate_blocks else None
        return {"sparse_steps": self.sparse_steps, "dense_steps": self.dense_steps,
                "selected_block_fraction": frac, "rollback_layers": list(self.config.rollback_layers),
                "reuse_layers": dict(self.config.layer_reuse), **self._dense_stats()}
