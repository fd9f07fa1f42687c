"""Block representations of K, the summaries that block scoring reads.

Input layout: the K of a layer's blocks as ``k_blocks [..., num_blocks, Hkv, block_size, D]`` —
what ``pool[block_ids, 0]`` gives for the paged pool ``[num_blocks, 2, Hkv, block_size, D]`` —
plus ``block_lens [..., num_blocks]``, the number of valid tokens in each block (``block_size``
for full blocks, fewer for the partial last block, 0 for blocks past the sequence). Only the
first ``block_lens`` tokens of a block contribute; the rest may hold anything (even NaN).
A block with no valid token gets zeros (and all-zero hash codes).

All math is float32 whatever the input dtype; results are float32 unless stated.

Representations (upstream names in brackets)
--------------------------------------------
block_mean            mean of K per block and head [ESA, GSA]
block_minmax          channel-wise min and max of K [Quest]
block_hash_codes      per-token sign-bit codes of ``K @ W`` [GSA On-Device / KVComp], see HashEncoder
block_first           the block's first token
block_weighted_mean   mean of K weighted by per-token weights (e.g. :func:`attention_token_weights`)
kvstar_channels,
block_subblock        KVStar: top channels by mean |K|, every ``token_merge`` tokens averaged

Helpers: :func:`tokens_to_blocks` (contiguous ``[..., H, T, D]`` -> blocks), :func:`block_lens_from_seq_lens`,
:class:`BlockReprState` (incremental update of the representations as tokens are appended).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from ucm_trt._validation import (
    FLOAT_DTYPES,
    INT_DTYPES,
    check_gqa,
    check_positive_int,
    check_same_device,
    check_tensor,
)
from ucm_trt.config import KVStarConfig

__all__ = [
    "tokens_to_blocks",
    "block_lens_from_seq_lens",
    "block_mean",
    "block_submeans",
    "block_minmax",
    "block_first",
    "block_weighted_mean",
    "attention_token_weights",
    "HashEncoder",
    "pack_bits",
    "unpack_bits",
    "block_hash_codes",
    "kvstar_channels",
    "SubBlockRepr",
    "block_subblock",
    "kvstar_subblock",
    "BlockReprState",
]


# --------------------------------------------------------------------------------------------
# layout helpers and checks


def _check_blocks(k_blocks: object, block_lens: object, name: str = "k_blocks") -> tuple[torch.Tensor, torch.Tensor]:
    k = check_tensor(name, k_blocks, dtypes=FLOAT_DTYPES)
    if k.dim() < 4:
        raise ValueError(
            f"{name} must have shape [..., num_blocks, Hkv, block_size, D] (at least 4 dims), "
            f"got shape {tuple(k.shape)}"
        )
    lens = check_tensor("block_lens", block_lens, dtypes=INT_DTYPES, shape=tuple(k.shape[:-3]))
    check_same_device(**{name: k, "block_lens": lens})
    bs = k.shape[-2]
    if lens.numel():
        lo, hi = int(lens.min()), int(lens.max())
        if lo < 0 or hi > bs:
            raise ValueError(f"block_lens must be in [0, block_size = {bs}], got values in [{lo}, {hi}]")
    return k, lens


def _token_mask(lens: torch.Tensor, block_size: int) -> torch.Tensor:
    """Bool ``[..., nb, bs]``: token is valid."""
    return torch.arange(block_size, device=lens.device) < lens[..., None].to(torch.int64)


def tokens_to_blocks(x: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Contiguous per-head tokens ``[..., H, T, D]`` -> ``(blocks [..., nb, H, bs, D], block_lens [..., nb])``.

    ``nb = ceil(T / bs)``; the padding of the last block is zeros; ``block_lens`` is int32.
    """
    check_tensor("x", x, dtypes=FLOAT_DTYPES)
    if x.dim() < 3:
        raise ValueError(f"x must have shape [..., H, T, D], got shape {tuple(x.shape)}")
    bs = check_positive_int("block_size", block_size)
    *lead, h, t, d = x.shape
    nb = (t + bs - 1) // bs
    pad = nb * bs - t
    if pad:
        x = torch.cat([x, x.new_zeros((*lead, h, pad, d))], dim=-2)
    blocks = x.reshape(*lead, h, nb, bs, d).movedim(-3, -4).contiguous()
    lens = (t - torch.arange(nb, device=x.device) * bs).clamp(0, bs).to(torch.int32)
    return blocks, lens.expand(*lead, nb).contiguous()


def block_lens_from_seq_lens(seq_lens: torch.Tensor, max_blocks: int, block_size: int) -> torch.Tensor:
    """int32 ``[..., max_blocks]``: valid tokens of each logical block, ``clamp(len - i*bs, 0, bs)``."""
    check_tensor("seq_lens", seq_lens, dtypes=INT_DTYPES)
    check_positive_int("max_blocks", max_blocks)
    bs = check_positive_int("block_size", block_size)
    if seq_lens.numel():
        lo, hi = int(seq_lens.min()), int(seq_lens.max())
        if lo < 0 or hi > max_blocks * bs:
            raise ValueError(
                f"seq_lens must be in [0, max_blocks * block_size = {max_blocks * bs}], got values in [{lo}, {hi}]"
            )
    i = torch.arange(max_blocks, device=seq_lens.device, dtype=torch.int64)
    return (seq_lens.to(torch.int64)[..., None] - i * bs).clamp(0, bs).to(torch.int32)


# --------------------------------------------------------------------------------------------
# dense representations


def block_mean(k_blocks: torch.Tensor, block_lens: torch.Tensor) -> torch.Tensor:
    """Mean of K over each block's valid tokens: float32 ``[..., nb, Hkv, D]`` (ESA/GSA)."""
    k, lens = _check_blocks(k_blocks, block_lens)
    mask = _token_mask(lens, k.shape[-2])[..., None, :, None]  # [..., nb, 1, bs, 1]
    total = torch.where(mask, k.float(), 0.0).sum(-2)
    count = lens.to(torch.float32)[..., None, None].clamp(min=1)
    return total / count


def block_submeans(k_blocks: torch.Tensor, block_lens: torch.Tensor, sub_blocks: int) -> torch.Tensor:
    """Mean of K over each of ``sub_blocks`` equal, consecutive token ranges of every block: float32
    ``[..., nb * sub_blocks, Hkv, D]``, block-major (sub-block ``j`` of block ``b`` at ``b * sub_blocks + j``).

    A range without valid tokens (past a partial block's end) is 0. ``sub_blocks = 1`` equals
    :func:`block_mean`. ESA / GSA's sub-block representation (``sub_blocks > 1``): a needle of a few
    tokens moves its sub-block's mean ``block_size / sub_blocks`` times less diluted than the block mean."""
    k, lens = _check_blocks(k_blocks, block_lens)
    sb = check_positive_int("sub_blocks", sub_blocks)
    *lead, nb, hkv, bs, d = k.shape
    if bs % sb:
        raise ValueError(f"sub_blocks ({sb}) must divide block_size ({bs})")
    mask = _token_mask(lens, bs)  # [..., nb, bs]
    kf = torch.where(mask[..., None, :, None], k.float(), 0.0)  # [..., nb, Hkv, bs, D]
    sums = kf.reshape(*lead, nb, hkv, sb, bs // sb, d).sum(-2)  # [..., nb, Hkv, S, D]
    counts = mask.reshape(*lead, nb, sb, bs // sb).sum(-1).to(torch.float32).clamp(min=1)  # [..., nb, S]
    means = sums / counts[..., None, :, None]
    return means.transpose(-2, -3).reshape(*lead, nb * sb, hkv, d)


def block_minmax(k_blocks: torch.Tensor, block_lens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Channel-wise ``(min, max)`` of K over each block's valid tokens, each float32 ``[..., nb, Hkv, D]`` (Quest)."""
    k, lens = _check_blocks(k_blocks, block_lens)
    mask = _token_mask(lens, k.shape[-2])[..., None, :, None]
    kf = k.float()
    kmin = torch.where(mask, kf, float("inf")).amin(-2)
    kmax = torch.where(mask, kf, float("-inf")).amax(-2)
    empty = (lens == 0)[..., None, None]
    return torch.where(empty, 0.0, kmin), torch.where(empty, 0.0, kmax)


def block_first(k_blocks: torch.Tensor, block_lens: torch.Tensor) -> torch.Tensor:
    """The first token's K of each block, float32 ``[..., nb, Hkv, D]``."""
    k, lens = _check_blocks(k_blocks, block_lens)
    return torch.where((lens == 0)[..., None, None], 0.0, k[..., 0, :].float())


def block_weighted_mean(k_blocks: torch.Tensor, block_lens: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``sum_t w_t k_t / sum_t w_t`` over each block's valid tokens, float32 ``[..., nb, Hkv, D]``.

    ``weights``: non-negative, finite, ``[..., nb, Hkv, bs]`` (per head) or ``[..., nb, bs]``
    (shared by the heads) — e.g. attention mass per token from :func:`attention_token_weights`
    reshaped with :func:`tokens_to_blocks`. Blocks whose valid weights sum to 0 get zeros.
    """
    k, lens = _check_blocks(k_blocks, block_lens)
    check_tensor("weights", weights, dtypes=FLOAT_DTYPES)
    per_head = tuple(k.shape[:-1])
    shared = tuple(k.shape[:-3]) + (k.shape[-2],)
    if tuple(weights.shape) == shared:
        w = weights[..., None, :]
    elif tuple(weights.shape) == per_head:
        w = weights
    else:
        raise ValueError(
            f"weights must have shape {per_head} (per head) or {shared} (shared), got {tuple(weights.shape)}"
        )
    check_same_device(k_blocks=k, weights=w)
    mask = _token_mask(lens, k.shape[-2])[..., None, :]  # [..., nb, 1, bs]
    wf = torch.where(mask, w.float(), 0.0)
    if not bool(torch.isfinite(wf).all()) or bool((wf < 0).any()):
        raise ValueError("weights must be finite and >= 0 on valid tokens")
    total = wf.sum(-1)  # [..., nb, Hkv]
    num = (torch.where(mask[..., None], k.float(), 0.0) * wf[..., None]).sum(-2)
    return torch.where(total[..., None] > 0, num / total.clamp(min=torch.finfo(torch.float32).tiny)[..., None], 0.0)


def attention_token_weights(
    q: torch.Tensor, k: torch.Tensor, *, scale: float | None = None, causal: bool = True
) -> torch.Tensor:
    """Attention mass each key receives from a window of observation queries, float32 ``[B, Hkv, T]``.

    ``q [B, Hq, Tq, D]`` are the queries of positions ``T-Tq .. T-1`` (causal), ``k [B, Hkv, T, D]``.
    The softmax probabilities are summed over the queries and over the query heads of each KV head's
    GQA group (query head ``h`` uses KV head ``h // (Hq // Hkv)``). Use as ``weights`` of
    :func:`block_weighted_mean` (after :func:`tokens_to_blocks` on ``[B, Hkv, T, 1]``).
    """
    check_tensor("q", q, ndim=4, dtypes=FLOAT_DTYPES)
    b, hq, tq, d = q.shape
    check_tensor("k", k, ndim=4, dtypes=FLOAT_DTYPES, shape=(b, None, None, d))
    hkv, t = k.shape[1], k.shape[2]
    group = check_gqa(hq, hkv)
    if tq > t:
        raise ValueError(f"q has {tq} query tokens but k only {t} keys; queries are the last tokens of k")
    check_same_device(q=q, k=k)
    sc = 1.0 / math.sqrt(d) if scale is None else float(scale)
    qg = q.float().reshape(b, hkv, group, tq, d)
    logits = torch.einsum("bhgqd,bhtd->bhgqt", qg, k.float()) * sc
    if causal:
        qpos = torch.arange(t - tq, t, device=q.device)
        allowed = torch.arange(t, device=q.device)[None, :] <= qpos[:, None]
        logits = logits.masked_fill(~allowed, float("-inf"))
    return torch.softmax(logits, dim=-1).sum(dim=(2, 3))


# --------------------------------------------------------------------------------------------
# hash codes (GSA On-Device / KVComp)


def pack_bits(bits: torch.Tensor) -> torch.Tensor:
    """Bool ``[..., nbits]`` -> uint8 ``[..., nbits/8]``, little-endian in each byte: bit ``i`` of byte ``b``
    is ``bits[..., 8*b + i]`` (weights 1, 2, 4, ..., 128)."""
    check_tensor("bits", bits, dtypes=(torch.bool,))
    if bits.dim() < 1 or bits.shape[-1] % 8:
        raise ValueError(f"bits must have a last dimension that is a multiple of 8, got shape {tuple(bits.shape)}")
    weights = (1 << torch.arange(8, device=bits.device, dtype=torch.int32))
    grouped = bits.reshape(*bits.shape[:-1], bits.shape[-1] // 8, 8).to(torch.int32)
    return (grouped * weights).sum(-1).to(torch.uint8)


def unpack_bits(codes: torch.Tensor) -> torch.Tensor:
    """uint8 ``[..., nbytes]`` -> bool ``[..., 8*nbytes]`` (inverse of :func:`pack_bits`)."""
    check_tensor("codes", codes, dtypes=(torch.uint8,))
    if codes.dim() < 1:
        raise ValueError("codes must have at least 1 dimension (bytes)")
    shifts = torch.arange(8, device=codes.device, dtype=torch.uint8)
    bits = (codes[..., None] >> shifts) & 1
    return bits.reshape(*codes.shape[:-1], codes.shape[-1] * 8).bool()


class HashEncoder:
    """Sign-bit hash of a projection: ``code(x) = pack_bits(x @ W > 0)``.

    ``W`` is ``[D, bits]`` (one projection for every head) or ``[H, D, bits]`` (one per head,
    e.g. trained HATA weights); ``bits`` is a multiple of 8. Build it with :meth:`random`
    (random rotation, as upstream's ``hash_weight_type="random"``), :meth:`from_weights` or
    :meth:`load`. Immutable: the weight is stored as float32 and never modified.
    """

    __slots__ = ("_weight",)

    def __init__(self, weight: torch.Tensor) -> None:
        check_tensor("weight", weight, dtypes=FLOAT_DTYPES)
        if weight.dim() not in (2, 3):
            raise ValueError(
                f"weight must have shape [D, bits] or [H, D, bits], got shape {tuple(weight.shape)}"
            )
        bits = weight.shape[-1]
        if bits == 0 or bits % 8:
            raise ValueError(f"weight's last dimension (hash bits) must be a positive multiple of 8, got {bits}")
        if weight.shape[-2] == 0:
            raise ValueError(f"weight's input dimension D must be > 0, got shape {tuple(weight.shape)}")
        if not bool(torch.isfinite(weight).all()):
            raise ValueError("weight must be finite")
        object.__setattr__(self, "_weight", weight.detach().to(torch.float32).clone())

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError("HashEncoder is immutable")

    def __repr__(self) -> str:
        return f"HashEncoder(weight_shape={tuple(self._weight.shape)}, device={self._weight.device})"

    @property
    def weight(self) -> torch.Tensor:
        """A copy of the float32 projection ``[D, bits]`` or ``[H, D, bits]``."""
        return self._weight.clone()

    @property
    def dim(self) -> int:
        return self._weight.shape[-2]

    @property
    def bits(self) -> int:
        return self._weight.shape[-1]

    @property
    def num_bytes(self) -> int:
        return self.bits // 8

    @property
    def num_heads(self) -> int | None:
        """Heads of a per-head weight, ``None`` for a shared ``[D, bits]`` weight."""
        return self._weight.shape[0] if self._weight.dim() == 3 else None

    @classmethod
    def random(
        cls,
        dim: int,
        bits: int,
        *,
        seed: int | None = None,
        generator: torch.Generator | None = None,
        num_heads: int | None = None,
        device: torch.device | str | None = None,
    ) -> HashEncoder:
        """Random orthogonal projection: Gaussian, QR, R-diagonal signs fixed (a random rotation).

        Exactly one of ``seed`` / ``generator`` (a CPU ``torch.Generator``) must be given; the global
        RNG is never used. With ``bits <= dim`` the columns of ``W`` are orthonormal (``W^T W = I``),
        otherwise the rows are (``W W^T = I``). ``num_heads`` draws one matrix per head.
        """
        check_positive_int("dim", dim)
        check_positive_int("bits", bits)
        if bits % 8:
            raise ValueError(f"bits must be a multiple of 8, got {bits}")
        if (seed is None) == (generator is None):
            raise ValueError("give exactly one of seed= or generator= (the global RNG is never used)")
        if generator is None:
            if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
                raise ValueError(f"seed must be an int >= 0, got {seed!r}")
            generator = torch.Generator(device="cpu").manual_seed(seed)
        elif not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
        heads = 1 if num_heads is None else check_positive_int("num_heads", num_heads)
        rows, cols = (dim, bits) if bits <= dim else (bits, dim)
        g = torch.randn((heads, rows, cols), generator=generator, dtype=torch.float64) * 2.0
        qmat, rmat = torch.linalg.qr(g)  # q [heads, rows, cols] orthonormal columns
        signs = torch.sign(torch.diagonal(rmat, dim1=-2, dim2=-1))
        signs = torch.where(signs == 0, torch.ones_like(signs), signs)
        qmat = qmat * signs[..., None, :]
        w = qmat if bits <= dim else qmat.transpose(-1, -2)
        w = w.to(torch.float32)
        if num_heads is None:
            w = w[0]
        return cls(w.to(device) if device is not None else w)

    @classmethod
    def from_weights(cls, weight: torch.Tensor) -> HashEncoder:
        """Wrap given (e.g. trained) weights ``[D, bits]`` or ``[H, D, bits]``."""
        return cls(weight)

    @classmethod
    def load(cls, path: str | Path, *, key: str | None = None, device: torch.device | str | None = None) -> HashEncoder:
        """Load weights from a ``.pt``/``.pth`` (a tensor or a dict of tensors) or ``.safetensors`` file.

        A file with several tensors (e.g. one per layer) needs ``key``.
        """
        if not isinstance(path, (str, Path)):
            raise TypeError(f"path must be a str or Path, got {type(path).__name__}")
        p = Path(path)
        if not p.is_file():
            raise ValueError(f"path {str(p)!r} is not a file")
        suffix = p.suffix.lower()
        if suffix == ".safetensors":
            from safetensors.torch import load_file

            obj: object = load_file(str(p))
        elif suffix in (".pt", ".pth"):
            obj = torch.load(str(p), map_location="cpu", weights_only=True)
        else:
            raise ValueError(f"path must end in .pt, .pth or .safetensors, got {str(p)!r}")
        if isinstance(obj, torch.Tensor):
            if key is not None:
                raise ValueError(f"key={key!r} given but {str(p)!r} holds a single tensor")
            weight = obj
        elif isinstance(obj, dict):
            if key is None:
                if len(obj) != 1:
                    raise ValueError(
                        f"{str(p)!r} holds {len(obj)} tensors ({', '.join(map(str, list(obj)[:8]))}); pass key="
                    )
                weight = next(iter(obj.values()))
            else:
                if key not in obj:
                    raise ValueError(f"key={key!r} is not in {str(p)!r} (keys: {', '.join(map(str, list(obj)[:8]))})")
                weight = obj[key]
            if not isinstance(weight, torch.Tensor):
                raise TypeError(f"entry of {str(p)!r} must be a tensor, got {type(weight).__name__}")
        else:
            raise TypeError(f"{str(p)!r} must hold a tensor or a dict of tensors, got {type(obj).__name__}")
        return cls(weight.to(device) if device is not None else weight)

    def save(self, path: str | Path, *, key: str = "weight") -> None:
        """Save the weight (``.pt``/``.pth`` as a dict ``{key: W}``, or ``.safetensors``)."""
        p = Path(path)
        data = {key: self._weight.cpu().contiguous()}
        if p.suffix.lower() == ".safetensors":
            from safetensors.torch import save_file

            save_file(data, str(p))
        elif p.suffix.lower() in (".pt", ".pth"):
            torch.save(data, str(p))
        else:
            raise ValueError(f"path must end in .pt, .pth or .safetensors, got {str(p)!r}")

    def to(self, device: torch.device | str) -> HashEncoder:
        return HashEncoder(self._weight.to(device))

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """float32 ``x @ W``: ``[..., D] -> [..., bits]`` (per-head weights need ``x [..., H, D]``)."""
        check_tensor("x", x, dtypes=FLOAT_DTYPES)
        if x.dim() < 1 or x.shape[-1] != self.dim:
            raise ValueError(f"x must have last dimension D = {self.dim}, got shape {tuple(x.shape)}")
        w = self._weight if self._weight.device == x.device else self._weight.to(x.device)
        if w.dim() == 2:
            return x.float() @ w
        if x.dim() < 2 or x.shape[-2] != w.shape[0]:
            raise ValueError(
                f"per-head hash weights need x of shape [..., H = {w.shape[0]}, D = {self.dim}], "
                f"got shape {tuple(x.shape)}"
            )
        return torch.einsum("...hd,hdb->...hb", x.float(), w)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 codes ``[..., bits/8]`` of ``x [..., D]``: ``pack_bits(x @ W > 0)``, little-endian per byte."""
        return pack_bits(self.project(x) > 0)


def block_hash_codes(k_blocks: torch.Tensor, block_lens: torch.Tensor, encoder: HashEncoder) -> torch.Tensor:
    """Per-token hash codes of each block: uint8 ``[..., nb, Hkv, bs, bits/8]``; invalid tokens get 0.

    A per-head encoder (``[H, D, bits]`` weight) needs ``H == Hkv``.
    """
    k, lens = _check_blocks(k_blocks, block_lens)
    if not isinstance(encoder, HashEncoder):
        raise TypeError(f"encoder must be a HashEncoder, got {type(encoder).__name__}")
    if encoder.dim != k.shape[-1]:
        raise ValueError(f"encoder.dim ({encoder.dim}) must equal the head dim of k_blocks ({k.shape[-1]})")
    if encoder.num_heads is not None and encoder.num_heads != k.shape[-3]:
        raise ValueError(f"per-head encoder has {encoder.num_heads} heads, k_blocks has {k.shape[-3]} KV heads")
    if encoder.num_heads is None:
        codes = encoder.encode(k)
    else:  # [..., Hkv, bs, D] -> put heads next to D
        codes = encoder.encode(k.transpose(-2, -3)).transpose(-2, -3)
    mask = _token_mask(lens, k.shape[-2])[..., None, :, None]
    return torch.where(mask, codes, torch.zeros((), dtype=torch.uint8, device=codes.device)).contiguous()


# --------------------------------------------------------------------------------------------
# KVStar sub-block representation


def kvstar_channels(k_blocks: torch.Tensor, block_lens: torch.Tensor, num_channels: int) -> torch.Tensor:
    """Channels kept per KV head: int64 ``[..., Hkv, d']``, ascending.

    The ``num_channels`` channels with the largest mean ``|K|`` over all valid tokens (the prompt);
    ties go to the lower channel index. ``...`` are the batch dims of ``k_blocks`` before ``nb``.
    """
    k, lens = _check_blocks(k_blocks, block_lens)
    d = k.shape[-1]
    check_positive_int("num_channels", num_channels)
    if num_channels > d:
        raise ValueError(f"num_channels must be <= head dim {d}, got {num_channels}")
    mask = _token_mask(lens, k.shape[-2])[..., None, :, None]
    mag = torch.where(mask, k.float().abs(), 0.0).sum(dim=(-2, -4))  # [..., Hkv, D]
    count = lens.sum(-1).to(torch.float32).clamp(min=1)[..., None, None]
    mean_abs = mag / count
    order = torch.sort(mean_abs, dim=-1, descending=True, stable=True).indices
    return order[..., :num_channels].sort(dim=-1).values


@dataclass(frozen=True, eq=False)
class SubBlockRepr:
    """KVStar sub-block representation.

    values:   float32 ``[..., nb, M, Hkv, d']`` mean of every ``token_merge`` consecutive tokens,
              pruned to ``channels`` (``M = block_size / token_merge``)
    counts:   int32 ``[..., nb, M]`` valid tokens in each sub-block (0 = empty, excluded from scoring)
    channels: int64 ``[..., Hkv, d']`` kept channel indices per KV head
    """

    values: torch.Tensor
    counts: torch.Tensor
    channels: torch.Tensor


def block_subblock(
    k_blocks: torch.Tensor, block_lens: torch.Tensor, channels: torch.Tensor, token_merge: int
) -> SubBlockRepr:
    """KVStar sub-blocks of given channels: average every ``token_merge`` consecutive valid tokens.

    ``channels``: int ``[Hkv, d']`` or ``[..., Hkv, d']`` (batch dims of ``k_blocks``), indices in ``[0, D)``.
    """
    k, lens = _check_blocks(k_blocks, block_lens)
    *lead, nb, hkv, bs, d = k.shape
    c = check_positive_int("token_merge", token_merge)
    if bs % c:
        raise ValueError(f"token_merge ({c}) must divide block_size ({bs})")
    check_tensor("channels", channels, dtypes=INT_DTYPES)
    if channels.dim() < 2 or channels.shape[-2] != hkv or tuple(channels.shape[:-2]) not in ((), tuple(lead)):
        raise ValueError(
            f"channels must have shape [Hkv={hkv}, d'] or [{', '.join(map(str, lead))}, {hkv}, d'], "
            f"got {tuple(channels.shape)}"
        )
    if channels.numel() and (int(channels.min()) < 0 or int(channels.max()) >= d):
        raise ValueError(f"channels must be in [0, {d}), got values in [{int(channels.min())}, {int(channels.max())}]")
    check_same_device(k_blocks=k, channels=channels)
    m = bs // c
    mask = _token_mask(lens, bs)  # [..., nb, bs]
    idx = channels.to(torch.int64)
    if idx.dim() == 2:
        idx = idx.expand(*lead, hkv, idx.shape[-1])
    # gather channels: k [..., nb, Hkv, bs, D] -> [..., nb, Hkv, bs, d']
    gidx = idx[..., None, :, None, :].expand(*lead, nb, hkv, bs, idx.shape[-1])
    kp = torch.gather(k.float(), -1, gidx)
    kp = torch.where(mask[..., None, :, None], kp, 0.0)
    sums = kp.reshape(*lead, nb, hkv, m, c, idx.shape[-1]).sum(-2)  # [..., nb, Hkv, M, d']
    counts = mask.reshape(*lead, nb, m, c).sum(-1).to(torch.int32)  # [..., nb, M]
    values = sums.transpose(-2, -3) / counts.to(torch.float32).clamp(min=1)[..., None, None]
    return SubBlockRepr(values=values.contiguous(), counts=counts, channels=idx.contiguous())


def kvstar_subblock(
    k_blocks: torch.Tensor, block_lens: torch.Tensor, config: KVStarConfig, channels: torch.Tensor | None = None
) -> SubBlockRepr:
    """KVStar representation as upstream: channels from :func:`kvstar_channels` with
    ``config.kept_channels(D)`` (unless ``channels`` is given), then :func:`block_subblock`."""
    if not isinstance(config, KVStarConfig):
        raise TypeError(f"config must be a KVStarConfig, got {type(config).__name__}")
    k, lens = _check_blocks(k_blocks, block_lens)
    config.check_block_size(k.shape[-2])
    if channels is None:
        channels = kvstar_channels(k, lens, config.kept_channels(k.shape[-1]))
    return block_subblock(k, lens, channels, config.token_merge)


# --------------------------------------------------------------------------------------------
# incremental update


class BlockReprState:
    """Running block representations of a batch of sequences, updated as tokens are appended.

    Tracks, per sequence ``[B]``, block ``[max_blocks]`` and KV head: the sum of K (-> mean),
    channel-wise min and max, the first token, and optionally per-token hash codes (when built
    with an ``encoder``). Every accessor returns exactly what the from-scratch functions
    (:func:`block_mean`, :func:`block_minmax`, :func:`block_first`, :func:`block_hash_codes`)
    give on the same tokens (the sum is accumulated in float32 in token order, so the mean may
    differ from a recomputation in the last bits only).

    Valid tokens of a sequence are a prefix of its blocks: full blocks, then one partial block,
    then empty blocks. :meth:`append` writes new tokens at the end, crossing block boundaries
    as needed, and raises if a sequence would outgrow ``max_blocks``.
    """

    def __init__(
        self,
        *,
        batch: int,
        max_blocks: int,
        num_kv_heads: int,
        block_size: int,
        head_dim: int,
        encoder: HashEncoder | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        b = check_positive_int("batch", batch)
        nb = check_positive_int("max_blocks", max_blocks)
        h = check_positive_int("num_kv_heads", num_kv_heads)
        bs = check_positive_int("block_size", block_size)
        d = check_positive_int("head_dim", head_dim)
        if encoder is not None:
            if not isinstance(encoder, HashEncoder):
                raise TypeError(f"encoder must be a HashEncoder or None, got {type(encoder).__name__}")
            if encoder.dim != d:
                raise ValueError(f"encoder.dim ({encoder.dim}) must equal head_dim ({d})")
            if encoder.num_heads is not None and encoder.num_heads != h:
                raise ValueError(f"per-head encoder has {encoder.num_heads} heads, expected {h}")
        dev = torch.device("cpu") if device is None else torch.device(device)
        self.block_size = bs
        self.encoder = encoder
        self._sum = torch.zeros((b, nb, h, d), dtype=torch.float32, device=dev)
        self._min = torch.full((b, nb, h, d), float("inf"), dtype=torch.float32, device=dev)
        self._max = torch.full((b, nb, h, d), float("-inf"), dtype=torch.float32, device=dev)
        self._first = torch.zeros((b, nb, h, d), dtype=torch.float32, device=dev)
        self._seq_lens = torch.zeros((b,), dtype=torch.int64, device=dev)
        self._codes = (
            torch.zeros((b, nb, h, bs, encoder.num_bytes), dtype=torch.uint8, device=dev)
            if encoder is not None
            else None
        )

    @property
    def shape(self) -> tuple[int, int, int, int, int]:
        """``(batch, max_blocks, num_kv_heads, block_size, head_dim)``."""
        b, nb, h, d = self._sum.shape
        return b, nb, h, self.block_size, d

    @property
    def device(self) -> torch.device:
        return self._sum.device

    @classmethod
    def from_blocks(
        cls, k_blocks: torch.Tensor, block_lens: torch.Tensor, *, encoder: HashEncoder | None = None
    ) -> BlockReprState:
        """State of existing blocks ``k_blocks [B, nb, Hkv, bs, D]`` with ``block_lens [B, nb]``
        (valid tokens must be a prefix: full blocks, at most one partial block, then empty ones)."""
        k, lens = _check_blocks(k_blocks, block_lens)
        if k.dim() != 5:
            raise ValueError(f"k_blocks must have shape [B, nb, Hkv, bs, D], got {tuple(k.shape)}")
        b, nb, h, bs, d = k.shape
        seq = lens.to(torch.int64).sum(-1)
        expected = block_lens_from_seq_lens(seq, nb, bs).to(lens.device)
        if not torch.equal(expected, lens.to(torch.int32)):
            raise ValueError(
                "block_lens must describe a prefix of tokens (full blocks, one partial block, then empty "
                f"blocks), got {lens.tolist()}"
            )
        state = cls(batch=b, max_blocks=nb, num_kv_heads=h, block_size=bs, head_dim=d, encoder=encoder, device=k.device)
        state.append(k.transpose(-2, -3).reshape(b, nb * bs, h, d).transpose(1, 2), seq)
        return state

    def append(self, k_new: torch.Tensor, num_new: torch.Tensor | None = None) -> None:
        """Append tokens ``k_new [B, Hkv, Tn, D]``; ``num_new [B]`` (default ``Tn`` each) says how many of
        each row's ``Tn`` tokens are real (the first ``num_new[b]``; the rest is ignored)."""
        b, nb, h, bs, d = self.shape
        check_tensor("k_new", k_new, ndim=4, dtypes=FLOAT_DTYPES, shape=(b, h, None, d))
        check_same_device(state=self._sum, k_new=k_new)
        tn = k_new.shape[2]
        if num_new is None:
            n = torch.full((b,), tn, dtype=torch.int64, device=self.device)
        else:
            check_tensor("num_new", num_new, ndim=1, dtypes=INT_DTYPES, shape=(b,))
            check_same_device(state=self._sum, num_new=num_new)
            n = num_new.to(torch.int64)
            if n.numel() and (int(n.min()) < 0 or int(n.max()) > tn):
                raise ValueError(f"num_new must be in [0, {tn}] (tokens in k_new), got {n.tolist()}")
        new_lens = self._seq_lens + n
        if int(new_lens.max()) > nb * bs:
            raise ValueError(
                f"appending num_new = {n.tolist()} tokens to seq_lens {self._seq_lens.tolist()} exceeds the "
                f"capacity max_blocks * block_size = {nb * bs}"
            )
        t = torch.arange(tn, device=self.device)
        keep = t[None, :] < n[:, None]  # [B, Tn]
        rows = torch.arange(b, device=self.device)[:, None].expand(b, tn)[keep]
        pos = (self._seq_lens[:, None] + t[None, :])[keep]
        blk, off = pos // bs, pos % bs
        x = k_new.float().transpose(1, 2)[keep]  # [N, Hkv, D]
        self._sum.index_put_((rows, blk), x, accumulate=True)
        # min/max: reduce the new tokens over a small grid of the blocks they touch (at most
        # ceil(Tn / bs) + 1 per row), then merge into those blocks; (row, block) pairs are unique.
        span = (tn + bs - 1) // bs + 1
        base = self._seq_lens // bs  # [B]
        local = pos - base[rows] * bs
        touched = base[:, None] + torch.arange(span, device=self.device)[None, :]  # [B, span]
        ok = touched < nb
        trow = torch.arange(b, device=self.device)[:, None].expand(b, span)[ok]
        tblk = touched[ok]
        for store, fill, reduce in ((self._min, float("inf"), torch.minimum), (self._max, float("-inf"), torch.maximum)):
            grid = torch.full((b, span * bs, h, d), fill, dtype=torch.float32, device=self.device)
            grid[rows, local] = x
            red = grid.view(b, span, bs, h, d).amin(2) if fill > 0 else grid.view(b, span, bs, h, d).amax(2)
            store[trow, tblk] = reduce(store[trow, tblk], red[ok])
        first = off == 0
        self._first[rows[first], blk[first]] = x[first]
        if self._codes is not None:
            codes = self.encoder.encode(x)  # x [N, Hkv, D]: per-head weights apply per head
            self._codes.permute(0, 1, 3, 2, 4)[rows, blk, off] = codes
        self._seq_lens = new_lens

    @property
    def seq_lens(self) -> torch.Tensor:
        """int64 ``[B]`` tokens per sequence so far."""
        return self._seq_lens.clone()

    @property
    def block_lens(self) -> torch.Tensor:
        """int32 ``[B, max_blocks]`` valid tokens per block."""
        return block_lens_from_seq_lens(self._seq_lens, self.shape[1], self.block_size)

    def _empty(self) -> torch.Tensor:
        return (self.block_lens == 0)[..., None, None]

    def mean(self) -> torch.Tensor:
        """As :func:`block_mean`."""
        return self._sum / self.block_lens.to(torch.float32).clamp(min=1)[..., None, None]

    def minmax(self) -> tuple[torch.Tensor, torch.Tensor]:
        """As :func:`block_minmax`."""
        e = self._empty()
        return torch.where(e, 0.0, self._min), torch.where(e, 0.0, self._max)

    def first(self) -> torch.Tensor:
        """As :func:`block_first`."""
        return self._first.clone()

    def codes(self) -> torch.Tensor:
        """As :func:`block_hash_codes` (needs an ``encoder``)."""
        if self._codes is None:
            raise ValueError("this BlockReprState was built without an encoder; it has no hash codes")
        return self._codes.clone()
