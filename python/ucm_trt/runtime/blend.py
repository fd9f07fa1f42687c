"""Blend: CacheBlend-style reuse of non-prefix chunk KV (upstream ``ucm/sparse/blend``; ucm-upstream.md §7).

* **Chunk cache.** :meth:`BlendRunner.cache_chunk` prefills a chunk on its own, at positions
  ``0 .. len-1`` (the chunk must be padded to a block boundary, as upstream requires), and stores
  the K/V of each of its blocks, all layers, in host memory under a chained block hash
  ``h_i = md5(h_{i-1} || tokens of block i)`` with ``h_{-1} = md5(meta || seed)``, so a block's key
  depends on the whole chunk prefix, never on what precedes the chunk in a later prompt.
* **Blend prefill.** :meth:`BlendRunner.add_request` takes the chunks and the question suffix. Each
  chunk is looked up block by block (a chunk stops at its first miss). The request's KV is laid
  out in the paged pools; hit blocks get the cached K rotated by the chunk's new offset
  (delta-RoPE, ``torch_attention.rope_rotate`` by the offset: RoPE is a rotation, ``R(start + p) = R(start) R(p)``) and
  the cached V, in every layer from ``recompute_layer`` on.
* **Selective recompute.** Layers before ``recompute_layer`` recompute every token (their fresh
  K/V overwrite everything). At ``recompute_layer`` the fresh K of every token is computed and the
  L1 deviation ``sum |K_reused - K_fresh|`` (K only, all heads) ranks the reused tokens; the top
  ``recompute_ratio`` of them, plus every token of missed blocks and the suffix, continue through
  that layer and all later ones (rows dropped from the hidden states, as upstream's ``ffn_begin`` /
  ``layer_begin``); the other tokens keep the reused K/V in those layers. Their queries attend to
  the whole sequence (reused + recomputed KV) causally by true position.
* Fewer than ``min_reused_blocks`` hits: plain full prefill, reported in the stats (never silent).

Requirements: the PyTorch backend with a Llama-family model (``model.model.layers[i]`` with
``input_layernorm`` and ``self_attn.k_proj``), NeoX RoPE with ``rotary_dim == head_dim`` (delta-RoPE
assumption, as upstream), a policy that keeps post-RoPE K (not ReRoPE) and whose KV stays
resident (no offload), and a prompt that fits in one prefill step (no chunked prefill, as upstream).
Decode then runs with the engine's policy.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Sequence

import torch

from ucm_trt import algorithms as registry
from ucm_trt.config import BlendConfig
from ucm_trt.runtime.engine import Engine, SamplingParams, TokenCallback, _check_prompt, _Request
from ucm_trt.runtime.kv import StepTransfer
from ucm_trt.runtime.torch_attention import rope_rotate
from ucm_trt.sparse.policies.base import RequestView

__all__ = ["BlendRunner", "ChunkCache"]

_SEED = b"UCM_HASH_SEED"


class ChunkCache:
    """Host store of chunk KV (computed at position 0), keyed by chained block hashes."""

    def __init__(self, *, block_size: int, meta: str) -> None:
        self.block_size = block_size
        self.meta = meta.encode()
        self._blocks: dict[str, torch.Tensor] = {}  # hash -> [L, 2, Hkv, bs, D] (host)

    def block_hashes(self, tokens: Sequence[int]) -> list[str]:
        bs = self.block_size
        h = hashlib.md5(self.meta + _SEED).hexdigest()
        out = []
        for i in range(len(tokens) // bs):
            blk = ",".join(map(str, tokens[i * bs : (i + 1) * bs])).encode()
            h = hashlib.md5(self.meta + h.encode() + b"|" + blk).hexdigest()
            out.append(h)
        return out

    def put(self, key: str, kv: torch.Tensor) -> None:
        self._blocks[key] = kv

    def get(self, key: str) -> torch.Tensor | None:
        return self._blocks.get(key)

    def __len__(self) -> int:
        return len(self._blocks)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._blocks.values())


class BlendRunner:
    """Chunk-KV reuse on top of an :class:`~ucm_trt.runtime.engine.Engine` (PyTorch backend)."""

    def __init__(self, engine: Engine, config: BlendConfig) -> None:
        if not isinstance(engine, Engine):
            raise TypeError(f"engine must be an Engine, got {type(engine).__name__}")
        if not isinstance(config, BlendConfig):
            raise TypeError(f"config must be a BlendConfig, got {type(config).__name__}")
        registry.check_backend("blend", engine.backend.kind)
        if engine.policy.rerope is not None:
            raise registry.refuse("blend", f"the {engine.policy.name} policy's ReRoPE attention",
                                  "Blend reuses post-RoPE K with delta-RoPE; ReRoPE stores un-rotated K")
        if engine.policy.offload:
            raise registry.refuse("blend", f"the {engine.policy.name} policy",
                                  f"Blend prefill needs the KV resident; the {engine.policy.name} policy offloads it")
        config.check_num_layers(engine.shape.num_layers)
        inner = getattr(engine.backend.model, "model", None)
        layers = getattr(inner, "layers", None)
        if layers is None or not all(hasattr(dl, "input_layernorm") and hasattr(dl.self_attn, "k_proj")
                                     for dl in layers):
            raise ValueError("Blend needs a Llama-family model (model.model.layers[i].input_layernorm, "
                             ".self_attn.k_proj)")
        self.engine = engine
        self.config = config
        self.inner = inner
        bs = engine.sparse.block_size
        meta = f"{type(engine.backend.model).__name__}:{engine.shape.num_layers}:{engine.backend.kv_dtype}"
        self.cache = ChunkCache(block_size=bs, meta=meta)
        self.stats: dict[str, object] = {"requests": 0, "fallbacks": 0, "reused_blocks": 0,
                                         "recomputed_tokens": 0, "reused_tokens": 0}

    # ------------------------------------------------------------------ chunk cache
    def cache_chunk(self, tokens: Sequence[int]) -> int:
        """Prefill ``tokens`` alone at positions 0.. and store its blocks; returns blocks stored."""
        eng = self.engine
        ids = _check_prompt(tokens)
        bs = eng.sparse.block_size
        if len(ids) % bs:
            raise ValueError(f"a chunk must be padded to a block boundary: len {len(ids)} is not a multiple of "
                             f"block_size {bs}")
        self._check_fits(len(ids))
        rid = f"blend-chunk-{len(self.cache)}-{time.perf_counter_ns()}"
        eng.kv.add_request(rid)
        try:
            self._forward(rid, ids, reuse=[], transfer=StepTransfer())
            nb = len(ids) // bs
            keys = self.cache.block_hashes(ids)
            L = eng.shape.num_layers
            for j, key in enumerate(keys):
                if self.cache.get(key) is None:
                    kv = torch.stack([eng.kv.pools[layer][int(eng.kv.tables_host[layer, 0, j])] for layer in range(L)])
                    self.cache.put(key, kv.to("cpu", copy=True))
        finally:
            eng.kv.free_request(rid)
        return nb

    def _check_fits(self, n: int) -> None:
        eng = self.engine
        limit = eng.config.prefill_chunk
        if n > limit:
            raise ValueError(f"Blend prefills the whole prompt in one step (no chunked prefill, as upstream): "
                             f"{n} tokens exceed RuntimeConfig.prefill_chunk ({limit})")
        if n + 1 > eng.config.max_seq_len:
            raise ValueError(f"prompt of {n} tokens leaves no room within RuntimeConfig.max_seq_len")

    # ------------------------------------------------------------------ blend requests
    def add_request(self, chunks: Sequence[Sequence[int]], suffix: Sequence[int],
                    params: SamplingParams | None = None, *, request_id: str | None = None,
                    on_token: TokenCallback | None = None) -> str:
        """Prefill ``chunks + suffix`` reusing cached chunk KV, sample the first token, and hand the
        request to the engine's decode loop (drive it with ``engine.step()``). ``on_token(rid, token)``
        is called for every generated token, as in :meth:`Engine.add_request`. Returns the id."""
        eng = self.engine
        bs = eng.sparse.block_size
        chunk_ids = [_check_prompt(c) for c in chunks]
        for i, c in enumerate(chunk_ids):
            if len(c) % bs:
                raise ValueError(f"chunks[{i}] has {len(c)} tokens, not a multiple of block_size {bs}")
        suffix_ids = _check_prompt(suffix)
        prompt = [t for c in chunk_ids for t in c] + suffix_ids
        self._check_fits(len(prompt))
        if eng._prefilling is not None or len(eng._running) >= eng.config.max_batch:
            raise RuntimeError("the engine is busy (a prefill in progress or max_batch requests running)")
        if eng._ahead is not None:
            raise RuntimeError(
                "the engine's next decode step is planned ahead (RuntimeConfig.plan_ahead) and a Blend prefill "
                "would overwrite its buffers: call engine.step() until none is (no request waiting lets it plan "
                "ahead), or build the engine with plan_ahead=False"
            )
        # look up every chunk's blocks: (logical block, cached kv, offset)
        reuse: list[tuple[int, torch.Tensor, int]] = []
        start = 0
        for c in chunk_ids:
            for j, key in enumerate(self.cache.block_hashes(c)):
                kv = self.cache.get(key)
                if kv is None:
                    break  # chained hashes: nothing after a miss can hit
                reuse.append((start // bs + j, kv, start))
            start += len(c)
        params = SamplingParams() if params is None else params
        rid = request_id or f"blend-{next(eng._ids_counter)}"
        if rid in eng._requests:
            raise ValueError(f"request_id {rid!r} is already in use")
        gen = torch.Generator(device="cpu").manual_seed(params.seed) if params.temperature > 0 else None
        req = _Request(rid=rid, prompt=prompt, params=params, callback=on_token, bounds=[0, len(prompt)],
                       generator=gen)
        eng._requests[rid] = req
        req.t_start = time.perf_counter()
        eng.kv.add_request(rid)
        eng.policy.on_request_start(rid, len(prompt))
        fallback = len(reuse) < self.config.min_reused_blocks
        self.stats["requests"] += 1
        if fallback:
            self.stats["fallbacks"] += 1
            reuse = []
        t0 = time.perf_counter()
        tr = StepTransfer()
        logits = self._forward(rid, prompt, reuse=reuse, transfer=tr)
        eng._record("prefill", 1, len(prompt), t0, tr, eng._held())
        # hand over to the engine: prefill-end hook, first token, decode loop
        queries = eng._policy_window(eng._prefill_queries(req, len(prompt), logits))
        eng.policy.on_prefill_end(RequestView(rid=rid, prompt_len=len(prompt), seq_len=len(prompt),
                                              new_len=len(prompt), step=0), queries)
        req.chunk = 1
        eng._running.append(rid)
        token = eng._sample(logits[0], req)
        req.ttft = time.perf_counter() - req.t_start
        eng.metrics.ttft[rid] = req.ttft
        eng._emit(req, token)
        return rid

    def generate(self, chunks: Sequence[Sequence[int]], suffix: Sequence[int],
                 params: SamplingParams | None = None, *, on_token: TokenCallback | None = None):
        """Blend-prefill one request and decode it to the end; returns its GenerationResult."""
        rid = self.add_request(chunks, suffix, params, on_token=on_token)
        eng = self.engine
        try:
            while eng._requests[rid].finish_reason is None:
                eng.step()
        except BaseException:
            eng.abort_all()
            raise
        return eng.result(rid)

    # ------------------------------------------------------------------ the forward
    @torch.inference_mode()
    def _forward(self, rid: str, ids: list[int], *, reuse, transfer: StepTransfer) -> torch.Tensor:
        eng = self.engine
        kv = eng.kv
        L = eng.shape.num_layers
        bs = eng.sparse.block_size
        n = len(ids)
        dev = eng.backend.device
        tr = transfer
        kv.plan_step([rid], [n], [[None]] * L, tr)
        eng._write_slots([rid], [0], n)
        r = self.config.recompute_layer if reuse else L
        # reused KV (delta-RoPE'd to its new offset) into every layer from r on: the hit blocks of all those
        # layers in one host-to-device copy and one rotation, then one indexed write per layer and pool half
        # (block by block and layer by layer it was ~2 copies and ~8 launches per block and layer: 886 ms of
        # a 1.9K-token TTFT on an H100, 2026-12-07)
        if reuse and r < L:
            blocks = torch.tensor([blk for blk, _, _ in reuse], dtype=torch.long)
            cached = torch.stack([c[r:L] for _, c, _ in reuse]).to(dev)  # [nr, L - r, 2, Hkv, bs, D]
            offsets = torch.tensor([off for _, _, off in reuse], dtype=torch.long, device=dev)
            # RoPE is a rotation: rotating post-RoPE K by the offset moves it there (offset 0: cos 1, sin 0)
            k_all = rope_rotate(cached[:, :, 0], offsets[:, None, None, None].expand(-1, 1, 1, bs),
                                theta=eng.shape.rope_theta)  # [nr, L - r, Hkv, bs, D]
            for i, layer in enumerate(range(r, L)):
                pool = kv.pools[layer]
                phys = kv.tables_host[layer, 0, blocks].long().to(dev)
                pool[phys, 0] = k_all[:, i].to(pool.dtype)
                pool[phys, 1] = cached[:, i, 1].to(pool.dtype)
        ids_t = torch.tensor([ids], dtype=torch.long, device=dev)
        pos = torch.arange(n, device=dev)[None]
        h = self.inner.embed_tokens(ids_t)
        cos, sin = self.inner.rotary_emb(h, pos)
        ctx = eng._context([rid], n, [n], [None] * L)
        reused_tok = torch.zeros(n, dtype=torch.bool)
        for blk, _, _ in reuse:
            reused_tok[blk * bs : (blk + 1) * bs] = True
        for layer, dl in enumerate(self.inner.layers[:L]):
            if layer == r and reuse:
                keep = self._select_tokens(layer, dl, h, pos, reused_tok, cos, sin)
                idx = keep.nonzero().flatten().to(dev)
                h, pos, cos, sin = h[:, idx], pos[:, idx], cos[:, idx], sin[:, idx]
                eng._write_positions([rid], pos.cpu(), [n])
                ctx = eng._context([rid], idx.numel(), [n], [None] * L)
                ctx.query_positions = pos
                self.stats["recomputed_tokens"] += int(keep[reused_tok].sum())
                self.stats["reused_tokens"] += int((reused_tok & ~keep).sum())
                self.stats["reused_blocks"] += len(reuse)
            out = dl(h, position_embeddings=(cos, sin), position_ids=pos, ucm_step=ctx)
            h = out[0] if isinstance(out, tuple) else out
        h = self.inner.norm(h[:, -1:])
        kv.write_back([rid], tr)
        return eng.backend.model.lm_head(h)[:, -1].float()

    def _select_tokens(self, layer, dl, h, pos, reused_tok, cos, sin) -> torch.Tensor:
        """Tokens that continue from ``layer`` on: every non-reused token, plus the reused tokens
        whose fresh K deviates most (L1, all heads) from the reused K."""
        eng = self.engine
        kv = eng.kv
        hkv, d, bs = eng.shape.num_kv_heads, eng.shape.head_dim, eng.sparse.block_size
        n = h.shape[1]
        x = dl.input_layernorm(h)
        k = dl.self_attn.k_proj(x).view(1, n, hkv, d).transpose(1, 2)  # [1, Hkv, n, D]
        k = rope_rotate(k.float(), pos[0], theta=eng.shape.rope_theta)[0]  # [Hkv, n, D]
        pool = kv.pools[layer]
        nb = -(-n // bs)
        phys = kv.tables[layer, 0, :nb].long()
        old = pool[phys, 0].permute(1, 0, 2, 3).reshape(hkv, nb * bs, d)[:, :n].float()
        dev_tok = (old - k).abs().sum(dim=(0, 2)).cpu()  # [n]
        keep = ~reused_tok.clone()
        n_reused = int(reused_tok.sum())
        top = int(self.config.recompute_ratio * n_reused)
        if top:
            scores = torch.where(reused_tok, dev_tok, torch.full_like(dev_tok, float("-inf")))
            keep[torch.topk(scores, top).indices] = True
        return keep
