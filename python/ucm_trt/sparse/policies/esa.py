"""ESA (upstream ``ucm/sparse/esa``; ucm-upstream.md §2).

* Prefill end: mean-K representation of every prompt block, per layer, kept on the host (float32).
  The first selection is retrieved synchronously from the last prompt token's query (upstream uses
  the first decode step's query; ours is one token older, which lets the runtime prefetch the
  blocks before the first decode step).
* Score: ``dot`` of the GQA-averaged query with each block's mean K (summed over KV heads for a
  shared selection), budget from :class:`~ucm_trt.config.SparseConfig` (``Budget.ratio`` as
  upstream's ``sparse_ratio``), forced sink / local windows at the prompt's end.
* Decode-generated blocks are never sparsified: every block past the prompt is selected.
* Schedule with stride ``R = SparseConfig.retrieval_stride`` and decode step ``s`` (1-based):
  after step ``s`` with ``s % R == 2 % R`` a retrieval is submitted with that step's queries;
  after step ``s`` with ``s % R == 0`` it is collected (waited for) and the next plan loads the
  blocks that changed. Steps in between run on the previous selection, as upstream.
  ``R = 1`` and ``R = 2`` degenerate to synchronous retrieval every ``R`` steps.
"""

from __future__ import annotations

from functools import partial

import torch

from ucm_trt.sparse.policies._offload import OffloadPolicy
from ucm_trt.sparse.policies.base import PolicyRuntime, RequestView, select_from_scores
from ucm_trt.sparse.repr import block_lens_from_seq_lens, block_mean
from ucm_trt.sparse.score import dot_scores

__all__ = ["ESAPolicy"]


class ESAPolicy(OffloadPolicy):
    name = "esa"

    def bind(self, rt: PolicyRuntime) -> None:
        super().bind(rt)
        s = rt.sparse
        if s.scoring != "dot" or s.representation != "mean":
            raise ValueError(
                "ESA scores mean-K block representations with a dot product: SparseConfig must have "
                f"scoring='dot' and representation='mean', got scoring={s.scoring!r}, "
                f"representation={s.representation!r}"
            )

    def on_prefill_end(self, req: RequestView, queries: list[torch.Tensor]) -> None:
        nbp = self._num_blocks(req.prompt_len)
        st = {"dense": nbp < self.sparse.min_blocks, "sel_nb": nbp, "pending": None}
        self._state[req.rid] = st
        if st["dense"]:
            return
        kv = self.rt.kv
        lens = block_lens_from_seq_lens(torch.tensor(req.prompt_len), nbp, self.sparse.block_size)
        st["reps"] = [
            block_mean(kv.gather_keys(req.rid, layer, list(range(nbp))), lens.to(kv.layout.device)).cpu()
            for layer in range(self.shape.num_layers)
        ]
        q_last = [q[:, -1] for q in queries]
        self._collect(st, self._submit(req.rid, 0, partial(self._select, st["reps"], nbp, q_last)))

    def _select(self, reps: list[torch.Tensor], nbp: int, qs: list[torch.Tensor], layer: int) -> torch.Tensor:
        scores = dot_scores(qs[layer][None], reps[layer])[0]  # [Hkv, nbp]
        return select_from_scores(scores, nbp, self.sparse, "dot", self.shape.num_kv_heads)

    def after_step(self, reqs: list[RequestView], queries: list[torch.Tensor]) -> None:
        r = self.sparse.retrieval_stride
        for row, req in enumerate(reqs):
            st = self._state[req.rid]
            if st["dense"]:
                continue
            s = req.step
            if s % r == 2 % r:
                q = [queries[layer][row] for layer in range(self.shape.num_layers)]
                st["pending"] = self._submit(req.rid, s, partial(self._select, st["reps"], st["sel_nb"], q))
            if s % r == 0:
                if st["pending"] is None:
                    raise RuntimeError(f"esa: request {req.rid!r} step {s}: no retrieval to collect")
                self._collect(st, st["pending"])
                st["pending"] = None
