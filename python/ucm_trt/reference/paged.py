"""Paged block-sparse attention references over a KV pool, block table and selection.

Written independently of the kernels: every visible token is materialised into a contiguous
tensor and an explicit boolean mask, then handed to the dense / ReRoPE references.

Visibility (DESIGN §3): the queries are the last ``Tq`` tokens of each sequence and their K/V
are already in the pool. The key at logical position ``p`` is visible to the query at position
``i`` iff ``p <= i`` and (``p >= seq_len - Tq`` or block ``p // block_size`` is selected for
the query's KV head).
"""

from __future__ import annotations

import torch

from ucm_trt._validation import FLOAT_DTYPES, check_gqa, check_tensor
from ucm_trt.reference.dense import dense_attention
from ucm_trt.reference.rerope import rerope_attention


def _check_paged_inputs(
    q: torch.Tensor,
    kv_pool: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    selection: torch.Tensor | None,
) -> tuple[int, int, int, int, int]:
    check_tensor("q", q, ndim=4, dtypes=FLOAT_DTYPES)
    b, hq, tq, d = q.shape
    check_tensor("kv_pool", kv_pool, ndim=5, dtypes=FLOAT_DTYPES)
    num_phys, two, hkv, bs, dk = kv_pool.shape
    if two != 2 or dk != d:
        raise ValueError(
            f"kv_pool must have shape [num_blocks, 2, num_kv_heads, block_size, {d}], "
            f"got {tuple(kv_pool.shape)}"
        )
    check_gqa(hq, hkv, kv_name="kv_pool")
    check_tensor("block_table", block_table, ndim=2, dtypes=(torch.int32,))
    if block_table.shape[0] != b:
        raise ValueError(f"block_table must have {b} rows (batch of q), got shape {tuple(block_table.shape)}")
    check_tensor("seq_lens", seq_lens, dtypes=(torch.int32,), shape=(b,))
    max_blocks = block_table.shape[1]
    lens = seq_lens.tolist()
    for i, n in enumerate(lens):
        if n < tq or n > max_blocks * bs:
            raise ValueError(
                f"seq_lens[{i}] = {n} must be in [{tq}, {max_blocks * bs}] "
                f"(at least the {tq} query tokens, at most block_table capacity)"
            )
        used = block_table[i, : (n + bs - 1) // bs]
        if used.numel() and (int(used.min()) < 0 or int(used.max()) >= num_phys):
            raise ValueError(
                f"block_table[{i}] maps to physical blocks outside [0, {num_phys}): {used.tolist()}"
            )
    if selection is not None:
        check_tensor("selection", selection, ndim=3, dtypes=(torch.int32,), shape=(b, hkv, None))
        for i, n in enumerate(lens):
            nb = (n + bs - 1) // bs
            row = selection[i]
            if row.numel() and (int(row.min()) < -1 or int(row.max()) >= nb):
                raise ValueError(
                    f"selection[{i}] holds logical block ids outside [-1, {nb}) "
                    f"for seq_len {n}: {row.tolist()}"
                )
    return b, hq, tq, hkv, bs


def gather_visible_tokens(
    kv_pool: torch.Tensor,
    block_table: torch.Tensor,
    seq_len: int,
    batch_index: int,
    selection_row: torch.Tensor | None,
    num_queries: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Materialise one sequence: K, V ``[1, Hkv, L, D]`` and the visibility mask ``[Hkv, Tq, L]``.

    The mask applies causality and the block selection (the current chunk is always visible).
    """
    _, _, hkv, bs, d = kv_pool.shape
    nb = (seq_len + bs - 1) // bs
    phys = block_table[batch_index, :nb].long()
    blocks = kv_pool[phys]  # [nb, 2, Hkv, bs, D]
    k = blocks[:, 0].permute(1, 0, 2, 3).reshape(hkv, nb * bs, d)[:, :seq_len]
    v = blocks[:, 1].permute(1, 0, 2, 3).reshape(hkv, nb * bs, d)[:, :seq_len]
    dev = kv_pool.device
    pos = torch.arange(seq_len, device=dev)
    q_pos = torch.arange(seq_len - num_queries, seq_len, device=dev)
    if selection_row is None:
        block_ok = torch.ones(hkv, nb, dtype=torch.bool, device=dev)
    else:
        block_ok = torch.zeros(hkv, nb + 1, dtype=torch.bool, device=dev)
        ids = selection_row.long().clone()
        ids[ids < 0] = nb  # padding lands in a scratch column
        block_ok.scatter_(1, ids, True)
        block_ok = block_ok[:, :nb]
    in_chunk = pos >= seq_len - num_queries
    token_ok = block_ok[:, pos // bs] | in_chunk[None]  # [Hkv, L]
    causal = pos[None, :] <= q_pos[:, None]  # [Tq, L]
    mask = token_ok[:, None, :] & causal[None]
    return k[None], v[None], mask


def _paged(q, kv_pool, block_table, seq_lens, selection, attend):
    b, hq, tq, hkv, _ = _check_paged_inputs(q, kv_pool, block_table, seq_lens, selection)
    group = hq // hkv
    outs = []
    for i, n in enumerate(seq_lens.tolist()):
        sel = None if selection is None else selection[i]
        k, v, mask = gather_visible_tokens(kv_pool, block_table, n, i, sel, tq)
        mask = mask.repeat_interleave(group, dim=0)[None]  # [1, Hq, Tq, L]
        outs.append(attend(q[i : i + 1], k, v, mask, n))
    return torch.cat(outs, dim=0)


def paged_sparse_attention(
    q: torch.Tensor,
    kv_pool: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    selection: torch.Tensor | None = None,
    *,
    scale: float | None = None,
) -> torch.Tensor:
    """Reference paged block-sparse attention (K stored post-RoPE).

    Parameters
    ----------
    q : ``[B, Hq, Tq, D]`` — the last ``Tq`` tokens of each sequence.
    kv_pool : ``[num_blocks, 2, Hkv, block_size, D]`` holding every token incl. the queries'.
    block_table : int32 ``[B, max_blocks]`` logical -> physical block.
    seq_lens : int32 ``[B]`` true lengths (including the ``Tq`` query tokens).
    selection : int32 ``[B, Hkv, S]`` logical block ids (-1 = padding) or ``None`` (all blocks).

    Returns ``[B, Hq, Tq, D]`` float32.
    """

    def attend(qi, k, v, mask, n):
        return dense_attention(qi, k, v, scale=scale, causal=False, mask=mask)

    return _paged(q, kv_pool, block_table, seq_lens, selection, attend)


def paged_rerope_attention(
    q: torch.Tensor,
    kv_pool: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    selection: torch.Tensor | None = None,
    *,
    window: int,
    theta: float,
    logn_training_length: int | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """Reference paged ReRoPE attention: the pool holds UN-rotated K, q is un-rotated.

    Same visibility as :func:`paged_sparse_attention`; positions are true logical positions.
    """

    def attend(qi, k, v, mask, n):
        tq = qi.shape[2]
        dev = qi.device
        return rerope_attention(
            qi, k, v, window=window, theta=theta, logn_training_length=logn_training_length,
            scale=scale, q_positions=torch.arange(n - tq, n, device=dev),
            k_positions=torch.arange(n, device=dev), causal=False, mask=mask,
        )

    return _paged(q, kv_pool, block_table, seq_lens, selection, attend)
