"""What one model step sees: per-step views of the runtime's preallocated buffers, and the
attention entry point every backend layer calls (``StepContext.attend``).

Per layer, ``attend``:

1. (ReRoPE policy) un-rotates the model's post-RoPE q and k by their true positions, so the pool
   holds un-rotated K;
2. writes the chunk's new K/V into the layer's pool at the slots the plan reserved, and calls the
   policy's ``on_append`` hook (GSA On-Device hashes K there);
3. takes the layer's selection: the policy's per-layer hook if it has one (on-device
   retrieval), else the selection the plan wrote (``None`` = every block);
4. runs paged attention over the pool / block table / seq_lens / selection: the PyTorch attention
   (:mod:`ucm_trt.runtime.torch_attention`) or the Triton kernels (:mod:`ucm_trt.kernels`);
5. records the queries of the last ``capture_width`` tokens (float32) for CPU retrieval.

Where each field lives: ``kv.pools``/``kv.tables``, ``seq_lens``, ``selections``,
``slot_blocks``/``slot_offsets`` and ``capture`` are on the runtime device; ``new_lens`` and
``rows`` are Python lists on the host.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from ucm_trt.runtime import torch_attention
from ucm_trt.runtime.torch_attention import rope_cos_sin, rotate_half

if TYPE_CHECKING:
    from ucm_trt.runtime.kv import KVManager
    from ucm_trt.sparse.policies.base import Policy

__all__ = ["AttentionImpl", "StepContext", "torch_attention_impl", "triton_attention"]


class AttentionImpl:
    """Paged attention functions of one implementation (PyTorch or Triton)."""

    def __init__(self, name: str, sparse: Callable, rerope: Callable, *, validate: bool | None,
                 workspace: Callable | None = None) -> None:
        self.name = name
        self._sparse = sparse
        self._rerope = rerope
        self._validate = validate
        self._new_workspace = workspace
        self._workspaces: dict = {}

    def _kw(self, q, guard=None) -> dict:
        kw = {} if self._validate is None else {"validate": self._validate}
        if guard is not None and self.name == "triton":
            kw["guard"] = guard  # the Triton launchers flag out-of-range ids there (no sync)
        if self._new_workspace is not None:
            # the split-K scratch, one per device, reused by every layer and step (attention runs on
            # one stream, layer after layer): each call is one kernel launch
            if q.device not in self._workspaces:
                self._workspaces[q.device] = self._new_workspace(q.device)
            kw["workspace"] = self._workspaces[q.device]
        return kw

    def sparse(self, q, pool, table, seq_lens, selection, scale, guard=None):
        return self._sparse(q, pool, table, seq_lens, selection, scale=scale, **self._kw(q, guard))

    def rerope(self, q, pool, table, seq_lens, selection, scale, cfg, theta, guard=None):
        return self._rerope(q, pool, table, seq_lens, selection, window=cfg.window, theta=theta,
                            logn_training_length=cfg.logn_training_length, scale=scale, **self._kw(q, guard))


def torch_attention_impl() -> AttentionImpl:
    """The PyTorch paged attention (:mod:`ucm_trt.runtime.torch_attention`; CPU or eager CUDA)."""
    return AttentionImpl("torch", torch_attention.paged_sparse_attention, torch_attention.paged_rerope_attention,
                         validate=None)


def triton_attention(*, validate: bool = False) -> AttentionImpl:
    from ucm_trt import kernels

    return AttentionImpl("triton", kernels.paged_sparse_attention, kernels.paged_rerope_attention,
                         validate=validate, workspace=kernels.AttentionWorkspace)


class StepContext:
    """Inputs of one forward step (prefill chunk of one request, or one decode token per row)."""

    def __init__(
        self,
        *,
        kv: KVManager,
        policy: Policy,
        attention: AttentionImpl,
        rows: list[str],
        num_tokens: int,
        new_lens: list[int],
        seq_lens: torch.Tensor,
        positions: torch.Tensor,
        selections: list[torch.Tensor | None],
        slot_blocks: torch.Tensor,
        slot_offsets: torch.Tensor,
        capture: torch.Tensor,
        capture_width: int,
        rope_theta: float,
        query_positions: torch.Tensor | None = None,
        layer_waits: list | None = None,
    ) -> None:
        self.kv = kv
        self.policy = policy
        self.attention = attention
        self.rows = rows
        self.num_tokens = num_tokens
        self.new_lens = new_lens
        self.seq_lens = seq_lens
        self.positions = positions
        self.selections = selections
        self.slot_blocks = slot_blocks
        self.slot_offsets = slot_offsets
        self.capture = capture
        self.capture_width = capture_width
        self.rope_theta = rope_theta
        #: [B, T] true positions of scattered queries (Blend's selective recompute); None = the
        #: queries are the last T tokens of each sequence (prefill chunk / decode)
        self.query_positions = query_positions
        #: per layer, the copy event (KVManager.layer_waits) the compute stream waits for before the
        #: layer touches its pool, or None; DecodeGraphs waits for all of them before a replay
        self.layer_waits = layer_waits
        self.layers_run = 0
        self._unrotate: tuple[torch.Tensor, torch.Tensor] | None = None  # ReRoPE: cos/sin of -positions
        #: a prefill being recorded (runtime.prefill_cache): every layer's appended (k, v), in order
        self.record: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        #: True once a layer attended a selection the policy made during the step (layer_selection)
        self.selected_in_step = False

    def wait_for_loads(self, layer: int | None = None) -> None:
        """Make the compute stream wait for the copies ``layer`` (None = every layer) reads; each
        event is waited for once (later calls are no-ops)."""
        if not self.layer_waits:
            return
        layers = range(len(self.layer_waits)) if layer is None else (layer,)
        for i in layers:
            ev = self.layer_waits[i]
            if ev is not None:
                self.kv.wait_on(ev)
                self.layer_waits[i] = None

    def reset_for_capture(self) -> None:
        """Before capturing the forward this context just ran eagerly: count layers afresh, build
        the per-step tables again inside the capture, and leave the copy waits out of it (they were
        waited for by the eager run; a replay waits for its own step's before it starts)."""
        self.layers_run = 0
        self._unrotate = None
        self.layer_waits = None

    def _unrotated(self, x: torch.Tensor) -> torch.Tensor:
        """ReRoPE: ``x`` ``[B, H, T, D]`` rotated back by its true positions. The cos/sin tables of
        ``-positions`` are built once per step (float64 angles, as the reference), not per layer."""
        if self._unrotate is None:
            self._unrotate = rope_cos_sin(-self.positions[:, None, :], x.shape[-1], self.rope_theta)
        cos, sin = self._unrotate
        xf = x.to(torch.float64 if x.dtype == torch.float64 else torch.float32)
        return (xf * cos + rotate_half(xf) * sin).to(x.dtype)

    def tables(self, layer: int) -> torch.Tensor:
        """int32 ``[B, max_blocks]`` block table of ``layer`` for this step's rows (device)."""
        return self.kv.tables[layer, : len(self.rows)]

    def append_kv(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write this step's K/V ``[B, Hkv, T, D]`` into ``layer``'s pool at the planned slots and
        call the policy's ``on_append`` hook."""
        b, hkv, t, d = k.shape
        pool = self.kv.pools[layer]
        k_flat = k.permute(0, 2, 1, 3).reshape(b * t, hkv, d)
        v_flat = v.permute(0, 2, 1, 3).reshape(b * t, hkv, d)
        blocks = self.slot_blocks[layer]
        offs = self.slot_offsets[layer]
        pool[blocks, 0, :, offs] = k_flat.to(pool.dtype)
        pool[blocks, 1, :, offs] = v_flat.to(pool.dtype)
        if self.record is not None:
            self.record.append((k.detach().to(pool.dtype, copy=True), v.detach().to(pool.dtype, copy=True)))
        self.policy.on_append(layer, blocks, offs, k_flat)

    def _attend_scattered(self, layer: int, q: torch.Tensor, scale: float | None) -> torch.Tensor:
        """Dense causal attention of queries at arbitrary positions over each row's whole sequence
        (every block), through the PyTorch attention."""
        pool = self.kv.pools[layer]
        _, _, hkv, bs, d = pool.shape
        outs = []
        for row, n in enumerate(self.new_lens):
            nb = -(-n // bs)
            phys = self.tables(layer)[row, :nb].long()
            blocks = pool[phys]  # [nb, 2, Hkv, bs, D]
            k = blocks[:, 0].permute(1, 0, 2, 3).reshape(hkv, nb * bs, d)[:, :n]
            v = blocks[:, 1].permute(1, 0, 2, 3).reshape(hkv, nb * bs, d)[:, :n]
            outs.append(torch_attention.dense_attention_at(q[row : row + 1], k[None], v[None],
                                                           self.query_positions[row], scale=scale))
        w = min(q.shape[2], self.capture_width)
        self.capture[layer, : q.shape[0], :, :w] = q[:, :, q.shape[2] - w :].float()
        return torch.cat(outs)

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None) -> torch.Tensor:
        """q ``[B, Hq, T, D]``, k/v ``[B, Hkv, T, D]`` (post-RoPE) of this step -> ``[B, Hq, T, D]``."""
        b, hq, t, d = q.shape
        if b != len(self.rows) or t != self.num_tokens:
            raise ValueError(
                f"layer {layer}: q has batch {b} and {t} tokens, the step planned {len(self.rows)} rows "
                f"of {self.num_tokens} tokens"
            )
        if not isinstance(layer, int) or not 0 <= layer < len(self.kv.pools):
            raise ValueError(f"layer index {layer!r} outside [0, {len(self.kv.pools)})")
        pool = self.kv.pools[layer]
        self.wait_for_loads(layer)
        rerope = self.policy.rerope
        if rerope is not None:
            q, k = self._unrotated(q), self._unrotated(k)
        self.append_kv(layer, k, v)
        if self.query_positions is not None:
            out = self._attend_scattered(layer, q, scale)
            self.layers_run += 1
            return out.to(q.dtype)
        sel = self.policy.layer_selection(layer, q, self)
        if sel is NotImplemented:
            sel = self.selections[layer]
        elif sel is not None:
            self.selected_in_step = True
        table = self.tables(layer)
        guard = self.kv.guard
        if rerope is None:
            out = self.attention.sparse(q, pool, table, self.seq_lens, sel, scale, guard)
        else:
            out = self.attention.rerope(q, pool, table, self.seq_lens, sel, scale, rerope, self.rope_theta, guard)
        w = min(t, self.capture_width)
        self.capture[layer, :b, :, :w] = q[:, :, t - w :].float()
        self.layers_run += 1
        return out.to(q.dtype)
