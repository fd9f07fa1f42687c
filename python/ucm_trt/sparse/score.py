"""Block scoring: how well each block's representation matches the current query.

Every scorer returns float32 ``[B, Hkv, nb]`` per KV head, **higher is better** (Hamming
distances are negated), so :func:`ucm_trt.sparse.select.select_blocks` can rank any of them.
A shared selection reduces the per-head scores with :func:`reduce_scores`: a sum over KV heads
for ``dot`` / ``quest`` / ``kvstar_vote`` (ESA's flattened dot product is exactly that sum) and
a max for ``hamming`` (the minimum distance over KV heads, upstream's ``REDUCE_KVHEAD``).

Block representations may carry a batch dimension ``B`` or none (then one set of blocks is
scored against every query in the batch, e.g. several query tokens of one sequence).

GQA: query head ``h`` belongs to KV head ``h // (Hq // Hkv)``.

Functions
---------
group_mean_query     average the query over each GQA group -> ``[..., Hkv, D]``
dot_scores           ESA/GSA: group-averaged query . block representation
quest_scores         Quest upper bound ``sum_d max(q_d min_d, q_d max_d)``
popcount_u8          bit count of every byte
hamming_distances    min over a block's valid tokens of popcount(q_code XOR k_code)
hamming_scores       hash the group-averaged query, negate the block distances
kvstar_vote_scores   KVStar softmax-mass voting of several queries over sub-block representations
reduce_scores        per-KV-head scores -> shared scores ``[B, 1, nb]``
"""

from __future__ import annotations

import torch

from ucm_trt._validation import FLOAT_DTYPES, INT_DTYPES, check_gqa, check_same_device, check_tensor
from ucm_trt.config import SCORINGS
from ucm_trt.sparse.representations import HashEncoder, SubBlockRepr

__all__ = [
    "group_mean_query",
    "dot_scores",
    "quest_scores",
    "popcount_u8",
    "hamming_distances",
    "hamming_scores",
    "kvstar_vote_scores",
    "reduce_scores",
]


def group_mean_query(q: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """float32 ``[..., Hkv, D]``: the mean of each GQA group of query heads ``q [..., Hq, D]``."""
    check_tensor("q", q, dtypes=FLOAT_DTYPES)
    if q.dim() < 2:
        raise ValueError(f"q must have shape [..., Hq, D], got shape {tuple(q.shape)}")
    if isinstance(num_kv_heads, bool) or not isinstance(num_kv_heads, int):
        raise TypeError(f"num_kv_heads must be an int, got {num_kv_heads!r}")
    group = check_gqa(q.shape[-2], num_kv_heads, kv_name="num_kv_heads")
    return q.float().reshape(*q.shape[:-2], num_kv_heads, group, q.shape[-1]).mean(-2)


def _check_query(q: object) -> torch.Tensor:
    return check_tensor("q", q, ndim=3, dtypes=FLOAT_DTYPES)


def _check_block_repr(name: str, r: object, batch: int, d: int) -> torch.Tensor:
    """``[B, nb, Hkv, D]`` or ``[nb, Hkv, D]`` -> ``[B or 1, nb, Hkv, D]``."""
    t = check_tensor(name, r, dtypes=FLOAT_DTYPES)
    if t.dim() == 3:
        t = t[None]
    if t.dim() != 4 or t.shape[-1] != d or t.shape[0] not in (1, batch):
        raise ValueError(
            f"{name} must have shape [B={batch}, nb, Hkv, D={d}] or [nb, Hkv, D={d}], got {tuple(r.shape)}"
        )
    return t


def dot_scores(q: torch.Tensor, reprs: torch.Tensor) -> torch.Tensor:
    """ESA/GSA scores ``[B, Hkv, nb]``: ``mean_{h in group} q_h . r[n, kv]`` per KV head.

    ``q [B, Hq, D]`` (post-RoPE decode query), ``reprs [B, nb, Hkv, D]`` or ``[nb, Hkv, D]``
    (mean, first or weighted-mean K). No softmax and no scaling, as upstream.
    """
    q = _check_query(q)
    r = _check_block_repr("reprs", reprs, q.shape[0], q.shape[-1])
    check_same_device(q=q, reprs=r)
    qg = group_mean_query(q, r.shape[2])  # [B, Hkv, D]
    return _vecdot(qg, r)


def _vecdot(qv: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """``[B, Hkv, D] . [B or 1, nb, Hkv, D] -> [B, Hkv, nb]`` in float32 (reads ``r`` in its layout)."""
    return torch.linalg.vecdot(r.float(), qv[:, None]).transpose(1, 2)


def quest_scores(q: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor, *, group: str = "sum") -> torch.Tensor:
    """Quest upper bound per KV head, float32 ``[B, Hkv, nb]``.

    For a query ``q`` the bound ``u(q) = sum_d max(q_d * min_d, q_d * max_d)`` is ``>= q . k`` for every
    token ``k`` of the block. With GQA:

    - ``group="sum"`` (default): the bound of every query head, summed over the group. It bounds
      ``sum_{h in group} q_h . k`` — the group's total logit — for every token, and keeps each head's
      own sign pattern (Quest is defined per query head).
    - ``group="mean_query"``: the bound of the group-averaged query (as ESA's query), a bound of
      ``mean_h q_h . k``; cheaper, looser per head.
    """
    q = _check_query(q)
    b, _, d = q.shape
    mn = _check_block_repr("kmin", kmin, b, d)
    mx = _check_block_repr("kmax", kmax, b, d)
    if mn.shape != mx.shape:
        raise ValueError(f"kmin and kmax must have the same shape, got {tuple(kmin.shape)} and {tuple(kmax.shape)}")
    check_same_device(q=q, kmin=mn, kmax=mx)
    hkv = mn.shape[2]
    gsize = check_gqa(q.shape[1], hkv, kv_name="kmin")
    if group == "sum":
        qf = q.float().reshape(b, hkv, gsize, d)
        pos = qf.clamp(min=0).sum(2)
        neg = qf.clamp(max=0).sum(2)
    elif group == "mean_query":
        qg = group_mean_query(q, hkv)
        pos, neg = qg.clamp(min=0), qg.clamp(max=0)
    else:
        raise ValueError(f"group must be 'sum' or 'mean_query', got {group!r}")
    return _vecdot(pos, mx) + _vecdot(neg, mn)


def popcount_u8(x: torch.Tensor) -> torch.Tensor:
    """Number of set bits of every byte of a uint8 tensor (uint8, same shape)."""
    check_tensor("x", x, dtypes=(torch.uint8,))
    x = x - ((x >> 1) & 0x55)
    x = (x & 0x33) + ((x >> 2) & 0x33)
    return (x + (x >> 4)) & 0x0F


def hamming_distances(q_codes: torch.Tensor, k_codes: torch.Tensor, block_lens: torch.Tensor) -> torch.Tensor:
    """Block distance ``[B, Hkv, nb]`` (float32): min over the block's valid tokens of ``popcount(q ^ k)``.

    ``q_codes`` uint8 ``[B, Hkv, nbytes]``; ``k_codes`` uint8 ``[B, nb, Hkv, bs, nbytes]`` or
    ``[nb, Hkv, bs, nbytes]`` (from :func:`~ucm_trt.sparse.representations.block_hash_codes`); ``block_lens``
    ``[B, nb]`` or ``[nb]`` to match. Invalid tokens count as ``+inf``, so an empty block is ``+inf``.
    Smaller is better.
    """
    qc = check_tensor("q_codes", q_codes, ndim=3, dtypes=(torch.uint8,))
    b, hkv, nbytes = qc.shape
    kc = check_tensor("k_codes", k_codes, dtypes=(torch.uint8,))
    if kc.dim() == 4:
        kc = kc[None]
    if kc.dim() != 5 or kc.shape[0] not in (1, b) or kc.shape[2] != hkv or kc.shape[-1] != nbytes:
        raise ValueError(
            f"k_codes must have shape [B={b}, nb, Hkv={hkv}, bs, nbytes={nbytes}] or "
            f"[nb, Hkv={hkv}, bs, nbytes={nbytes}], got {tuple(k_codes.shape)}"
        )
    nb, bs = kc.shape[1], kc.shape[3]
    lens = check_tensor("block_lens", block_lens, dtypes=INT_DTYPES)
    if lens.dim() == 1:
        lens = lens[None]
    if lens.dim() != 2 or lens.shape[1] != nb or lens.shape[0] != kc.shape[0]:
        want = f"[{nb}]" if k_codes.dim() == 4 else f"[{b}, {nb}]"
        raise ValueError(f"block_lens must have shape {want} to match k_codes, got {tuple(block_lens.shape)}")
    check_same_device(q_codes=qc, k_codes=kc, block_lens=lens)
    if lens.numel() and (int(lens.min()) < 0 or int(lens.max()) > bs):
        raise ValueError(f"block_lens must be in [0, block_size = {bs}], got values {lens.tolist()}")
    x = torch.bitwise_xor(kc.transpose(1, 2), qc[:, :, None, None, :])  # [B, Hkv, nb, bs, nbytes]
    dist = popcount_u8(x).sum(-1, dtype=torch.int32).to(torch.float32)
    valid = torch.arange(bs, device=lens.device) < lens[..., None].to(torch.int64)  # [B', nb, bs]
    dist = torch.where(valid[:, None], dist, float("inf"))
    return dist.amin(-1)


def hamming_scores(
    q: torch.Tensor, encoder: HashEncoder, k_codes: torch.Tensor, block_lens: torch.Tensor
) -> torch.Tensor:
    """GSA On-Device scores ``[B, Hkv, nb]`` = ``-hamming_distances(code(group_mean(q)), k_codes, block_lens)``.

    ``q [B, Hq, D]``; the query is averaged over each GQA group, then hashed (one code per KV head).
    Empty blocks score ``-inf``.
    """
    q = _check_query(q)
    if not isinstance(encoder, HashEncoder):
        raise TypeError(f"encoder must be a HashEncoder, got {type(encoder).__name__}")
    check_tensor("k_codes", k_codes, dtypes=(torch.uint8,))
    if k_codes.dim() not in (4, 5):
        raise ValueError(f"k_codes must have shape [B, nb, Hkv, bs, nbytes] or [nb, Hkv, bs, nbytes], got {tuple(k_codes.shape)}")
    hkv = k_codes.shape[-3]
    if encoder.dim != q.shape[-1]:
        raise ValueError(f"encoder.dim ({encoder.dim}) must equal the head dim of q ({q.shape[-1]})")
    q_codes = encoder.encode(group_mean_query(q, hkv))
    return -hamming_distances(q_codes, k_codes, block_lens)


def kvstar_vote_scores(
    q: torch.Tensor,
    sub: SubBlockRepr,
    *,
    block_mask: torch.Tensor | None = None,
    query_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """KVStar multi-query voting, float32 ``[B, Hkv, nb]``.

    ``q [B, Hq, Tv, D]``: the voting queries (post-RoPE, all query heads). Each query is pruned to
    its KV head's kept channels; logits ``q . r`` against every sub-representation (no ``1/sqrt(d)``,
    as upstream); softmax over all positions ``(block, sub-token)`` allowed by ``block_mask``
    (bool ``[B, nb]`` or ``[nb]``; default all blocks) and non-empty sub-blocks; a block's score is
    the softmax mass summed over queries (where ``query_mask [B, Tv]`` is True), the query heads of
    the KV head's group and the block's sub-tokens. A query with no allowed position votes nothing.
    """
    q = check_tensor("q", q, ndim=4, dtypes=FLOAT_DTYPES)
    b, hq, tv, d = q.shape
    if not isinstance(sub, SubBlockRepr):
        raise TypeError(f"sub must be a SubBlockRepr, got {type(sub).__name__}")
    vals, counts, ch = sub.values, sub.counts, sub.channels
    if vals.dim() == 4:
        vals, counts = vals[None], counts[None]
    if ch.dim() == 2:
        ch = ch[None]
    if vals.dim() != 5 or vals.shape[0] not in (1, b):
        raise ValueError(f"sub.values must have shape [B={b}, nb, M, Hkv, d'] or [nb, M, Hkv, d'], got {tuple(sub.values.shape)}")
    bv, nb, m, hkv, dp = vals.shape
    if tuple(counts.shape) != (bv, nb, m) or ch.dim() != 3 or ch.shape[1:] != (hkv, dp) or ch.shape[0] not in (1, b):
        raise ValueError(
            f"sub is inconsistent: values {tuple(sub.values.shape)}, counts {tuple(sub.counts.shape)}, "
            f"channels {tuple(sub.channels.shape)}"
        )
    if ch.numel() and (int(ch.min()) < 0 or int(ch.max()) >= d):
        raise ValueError(f"sub.channels must index the head dim of q ([0, {d})), got max {int(ch.max())}")
    gsize = check_gqa(hq, hkv, kv_name="sub.values")
    check_same_device(q=q, values=vals, channels=ch)
    allowed = counts > 0  # [B', nb, M]
    if block_mask is not None:
        bm = check_tensor("block_mask", block_mask, dtypes=(torch.bool,))
        if bm.dim() == 1:
            bm = bm[None]
        if bm.dim() != 2 or bm.shape[1] != nb or bm.shape[0] not in (1, b):
            raise ValueError(f"block_mask must have shape [B={b}, nb={nb}] or [nb={nb}], got {tuple(block_mask.shape)}")
        allowed = allowed & bm[:, :, None]
    qm = None
    if query_mask is not None:
        qm = check_tensor("query_mask", query_mask, ndim=2, dtypes=(torch.bool,), shape=(b, tv))
    # prune q to its KV head's channels: [B, Hkv, G, Tv, d']
    qf = q.float().reshape(b, hkv, gsize, tv, d)
    idx = ch.to(torch.int64)[:, :, None, None, :].expand(b, hkv, gsize, tv, dp)
    qp = torch.gather(qf, -1, idx)
    logits = torch.einsum("bhgxd,bnmhd->bhgxnm", qp, vals.float().expand(b, nb, m, hkv, dp))
    mask = allowed.expand(b, nb, m)[:, None, None, None]
    logits = logits.masked_fill(~mask, float("-inf")).reshape(b, hkv, gsize, tv, nb * m)
    probs = torch.softmax(logits, dim=-1)
    probs = torch.nan_to_num(probs, nan=0.0)  # queries with no allowed position
    if qm is not None:
        probs = probs * qm[:, None, None, :, None].to(probs.dtype)
    return probs.reshape(b, hkv, gsize, tv, nb, m).sum(dim=(2, 3, 5))


def reduce_scores(scores: torch.Tensor, scoring: str) -> torch.Tensor:
    """Per-KV-head scores ``[B, Hkv, nb]`` -> shared scores ``[B, 1, nb]``.

    ``dot``, ``quest``, ``kvstar_vote``: sum over KV heads. ``hamming`` (scores are negated
    distances): max over KV heads, i.e. minus the minimum distance over heads.
    """
    check_tensor("scores", scores, ndim=3, dtypes=FLOAT_DTYPES)
    if scoring not in SCORINGS:
        raise ValueError(f"scoring must be one of {', '.join(SCORINGS)}; got {scoring!r}")
    s = scores.float()
    if scoring == "hamming":
        return s.amax(1, keepdim=True)
    return s.sum(1, keepdim=True)
