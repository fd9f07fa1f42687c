"""PyTorch paged attention and RoPE for the runtime (the eager path of ``TorchBackend``, e.g. on CPU).

Production code, written apart from the fp32 test oracle :mod:`ucm_trt.reference` (which the tests
compare it with and which nothing in the runtime imports). Semantics (docs/kernels.md):

* visibility: the queries are the last ``T`` of each row's ``seq_len`` tokens, whose K/V are in the
  pool already; key ``p`` is visible to query position ``i`` iff ``p <= i`` and (``p`` is in the
  chunk, ``p >= seq_len - T``, or block ``p // block_size`` is selected for the query's KV head);
  ``selection=None`` selects every block, ``-1`` pads a selection row;
* GQA: query head ``h`` reads KV head ``h // (Hq / Hkv)``;
* RoPE: NeoX half rotation with ``inv_freq = theta ** (-2j / D)``, angles in float64;
* ReRoPE (pool of un-rotated K): ``scale * rope(q_i, i) . rope(k_p, p)`` when ``i - p < window``,
  else ``scale * rope(q_i, window) . k_p``; with ``logn_training_length = L`` the query is first
  scaled by ``max(1, log(i + 1) / log(L))``.

Every function computes in float32 (float64 for float64 input) and returns that dtype.
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "dense_attention_at",
    "paged_rerope_attention",
    "paged_sparse_attention",
    "rope_cos_sin",
    "rope_rotate",
    "rotate_half",
]


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float, *,
                 dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """cos / sin of the rotation angles of integer ``positions``: each ``[*positions.shape, head_dim]``
    (angles in float64, so positions past 128K stay exact to fp32 rounding)."""
    if head_dim <= 0 or head_dim % 2:
        raise ValueError(f"head_dim must be a positive even int, got {head_dim!r}")
    if not theta > 0:
        raise ValueError(f"theta must be a positive number, got {theta!r}")
    exponents = torch.arange(0, head_dim, 2, dtype=torch.float64, device=positions.device) / head_dim
    half = positions.to(torch.float64).unsqueeze(-1) * torch.pow(float(theta), -exponents)
    angles = half.repeat(*([1] * positions.dim()), 2)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """``[x1, x2] -> [-x2, x1]`` over the last dimension."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x2.neg(), x1), dim=-1)


def rope_rotate(x: torch.Tensor, positions: torch.Tensor, *, theta: float) -> torch.Tensor:
    """``x [..., T, D]`` rotated by integer ``positions`` (broadcastable to ``x.shape[:-1]``). Rotations
    compose, so rotating already-rotated keys by an offset moves them by that offset (Blend)."""
    ct = _compute_dtype(x)
    cos, sin = rope_cos_sin(positions, x.shape[-1], theta, dtype=ct)
    xc = x.to(ct)
    return xc * cos + rotate_half(xc) * sin


def _softmax_rows(logits: torch.Tensor, visible: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``softmax(logits)`` over visible keys, times ``v``; a row with no visible key is zero."""
    logits = logits.masked_fill(~visible, float("-inf"))
    top = logits.amax(dim=-1, keepdim=True)
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    weights = torch.exp(logits - top)
    total = weights.sum(dim=-1, keepdim=True)
    return (weights @ v) / torch.where(total > 0, total, torch.ones_like(total))


def _row_tokens(pool: torch.Tensor, table_row: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V ``[Hkv, n, D]`` of one row: its first ``n`` tokens, in logical order."""
    _, _, hkv, bs, d = pool.shape
    nb = -(-n // bs)
    blocks = pool.index_select(0, table_row[:nb].long())  # [nb, 2, Hkv, bs, D]
    kv = blocks.permute(1, 2, 0, 3, 4).reshape(2, hkv, nb * bs, d)
    return kv[0, :, :n], kv[1, :, :n]


def _row_visibility(n: int, t: int, bs: int, hkv: int, selection_row: torch.Tensor | None,
                    device: torch.device) -> torch.Tensor:
    """``[Hkv, T, n]`` bool (``[1, T, n]`` without a selection: the same for every head): which of the
    row's ``n`` keys each of its last ``t`` queries sees."""
    keys = torch.arange(n, device=device)
    queries = keys[n - t :]
    causal = keys[None, :] <= queries[:, None]  # [T, n]
    if selection_row is None:
        return causal[None]
    nb = -(-n // bs)
    chosen = torch.zeros(hkv, nb + 1, dtype=torch.bool, device=device)
    ids = torch.where(selection_row >= 0, selection_row.long(), torch.full_like(selection_row.long(), nb))
    chosen.scatter_(1, ids, True)
    seen = chosen[:, :nb].repeat_interleave(bs, dim=1)[:, :n] | (keys >= n - t)[None]  # [Hkv, n]
    return seen[:, None, :] & causal[None]


def _paged(q, pool, table, seq_lens, selection, attend_row) -> torch.Tensor:
    """Per row: gather its keys, build its visibility, ``attend_row(q, k, v, visible, n)`` (every
    ``[Hq, ...]``, GQA expanded) -> ``[Hq, T, D]``."""
    b, hq, t, d = q.shape
    hkv, bs = pool.shape[2], pool.shape[3]
    if hq % hkv:
        raise ValueError(f"q has {hq} heads, not a multiple of the pool's {hkv} KV heads")
    group = hq // hkv
    ct = _compute_dtype(q)
    out = torch.empty(b, hq, t, d, dtype=ct, device=q.device)
    for row, n in enumerate(seq_lens.tolist()):
        k, v = _row_tokens(pool, table[row], n)
        sel = None if selection is None else selection[row]
        visible = _row_visibility(n, t, bs, hkv, sel, q.device)
        if visible.shape[0] > 1:
            visible = visible.repeat_interleave(group, dim=0)
        qr = q[row].to(ct)  # [Hq, T, D]
        kr = k.to(ct).repeat_interleave(group, dim=0)  # [Hq, n, D]
        vr = v.to(ct).repeat_interleave(group, dim=0)
        out[row] = attend_row(qr, kr, vr, visible, n)
    return out


def paged_sparse_attention(q: torch.Tensor, pool: torch.Tensor, table: torch.Tensor, seq_lens: torch.Tensor,
                           selection: torch.Tensor | None = None, *, scale: float | None = None) -> torch.Tensor:
    """Paged block-sparse attention over post-RoPE K: q ``[B, Hq, T, D]``, pool ``[N, 2, Hkv, bs, D]``,
    table int32 ``[B, max_blocks]``, seq_lens int32 ``[B]`` (the chunk included), selection int32
    ``[B, Hkv, S]`` or ``None``. Returns ``[B, Hq, T, D]``."""
    s = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    t = q.shape[2]

    def attend_row(qr, kr, vr, visible, n):
        if n >= t:
            # every query sees at least its own key (the chunk is always visible), so no row of the
            # mask is empty: PyTorch's fused attention applies (several times faster on the CPU than
            # the explicit softmax below, which the empty-row case keeps)
            # (batched 4-D inputs take PyTorch's fused CPU kernel, 3-D ones its slower math path)
            return torch.nn.functional.scaled_dot_product_attention(qr[None], kr[None], vr[None],
                                                                    attn_mask=visible[None], scale=s)[0]
        return _softmax_rows((qr @ kr.transpose(-1, -2)) * s, visible, vr)

    return _paged(q, pool, table, seq_lens, selection, attend_row)


def paged_rerope_attention(q: torch.Tensor, pool: torch.Tensor, table: torch.Tensor, seq_lens: torch.Tensor,
                           selection: torch.Tensor | None = None, *, window: int, theta: float,
                           logn_training_length: int | None = None, scale: float | None = None) -> torch.Tensor:
    """Paged ReRoPE attention: the pool and q hold UN-rotated K / q (module docstring); same inputs
    and visibility as :func:`paged_sparse_attention`."""
    s = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    t = q.shape[2]

    def attend_row(qr, kr, vr, visible, n):
        return _softmax_rows(logits(qr, kr, n), visible, vr)

    def logits(qr, kr, n):
        qpos = torch.arange(n - t, n, device=qr.device)
        kpos = torch.arange(n, device=qr.device)
        if logn_training_length is not None:
            grow = torch.log(qpos.to(torch.float64) + 1.0) / math.log(logn_training_length)
            qr = qr * grow.clamp_min(1.0).to(qr.dtype)[None, :, None]
        near = rope_rotate(qr, qpos, theta=theta) @ rope_rotate(kr, kpos, theta=theta).transpose(-1, -2)
        far = rope_rotate(qr, torch.full_like(qpos, window), theta=theta) @ kr.transpose(-1, -2)
        inside = (qpos[:, None] - kpos[None, :]) < window
        return torch.where(inside[None], near, far) * s

    return _paged(q, pool, table, seq_lens, selection, attend_row)


def dense_attention_at(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_positions: torch.Tensor, *,
                       scale: float | None = None) -> torch.Tensor:
    """Causal attention of one row's queries at arbitrary positions over all its keys (positions
    ``0 .. n-1``): q ``[1, Hq, T, D]``, k / v ``[1, Hkv, n, D]``, q_positions int ``[T]``."""
    hq, hkv, n = q.shape[1], k.shape[1], k.shape[2]
    group = hq // hkv
    ct = _compute_dtype(q)
    s = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    kr = k[0].to(ct).repeat_interleave(group, dim=0)
    vr = v[0].to(ct).repeat_interleave(group, dim=0)
    visible = torch.arange(n, device=q.device)[None, :] <= q_positions.to(q.device)[:, None]  # [T, n]
    return _softmax_rows((q[0].to(ct) @ kr.transpose(-1, -2)) * s, visible[None], vr)[None]
