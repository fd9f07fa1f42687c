"""ucm_trt.kernels.hash_encode.encode_keys_into against an independent float64 / NumPy reference.

The reference projects in float64 and packs the bits with NumPy (bit j of byte i = bit 8 i + j); the
kernel projects in float32, so bits whose float64 projection is within 1e-4 of 0 are not compared.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ucm_trt.kernels.guard import IndexGuard, IndexOutOfRangeError
from ucm_trt.kernels.hash_encode import encode_keys_into


def _reference(k: torch.Tensor, w: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(codes uint8 [N, H, bits/8], ambiguous bool [N, H, bits]) by float64 NumPy."""
    proj = k.double().cpu().numpy() @ w.double().cpu().numpy()  # [N, H, bits]
    bits = (proj > 0).astype(np.uint8)
    n, h, nb = bits.shape
    codes = (bits.reshape(n, h, nb // 8, 8) << np.arange(8, dtype=np.uint8)).sum(-1).astype(np.uint8)
    return codes, np.abs(proj) < 1e-4


def _unpack(codes: np.ndarray) -> np.ndarray:
    return ((codes[..., None] >> np.arange(8, dtype=np.uint8)) & 1).reshape(*codes.shape[:-1], -1)


@pytest.mark.parametrize(("n", "hkv", "d", "bits", "dtype"), [
    (1, 8, 128, 128, torch.bfloat16),    # one decode token, Llama-8B heads, the ucm preset's width
    (6, 8, 128, 512, torch.float16),     # batch 6, the default preset's 4 bits per channel
    (5, 2, 80, 320, torch.float32),      # head_dim 80, 4 bits per channel: bits not a power of two
    (37, 1, 64, 24, torch.bfloat16),     # one KV head, a prefill-sized row count, 3 code bytes
    (3, 3, 96, 8, torch.float32),        # odd head count, one byte
])
def test_codes_match_reference_at_permuted_slots(n, hkv, d, bits, dtype, device):
    gen = torch.Generator().manual_seed(n * 131 + bits)
    num_blocks, bs = 11, 16
    k = torch.randn((n, hkv, d), generator=gen).to(dtype).to(device)
    w = torch.randn((d, bits), generator=gen).to(device)
    codes = torch.randint(0, 256, (num_blocks, hkv, bs, bits // 8), generator=gen, dtype=torch.uint8).to(device)
    before = codes.clone()
    slots = torch.randperm(num_blocks * bs, generator=gen)[:n]  # distinct slots, in no order
    blocks = (slots // bs).to(torch.int32).to(device)
    offsets = (slots % bs).to(torch.int64).to(device)
    encode_keys_into(k, w, codes, blocks, offsets)

    ref, ambiguous = _reference(k.float(), w)
    got = codes.cpu().numpy()
    for i in range(n):
        b, o = int(blocks[i]), int(offsets[i])
        gb, rb = _unpack(got[b, :, o]), _unpack(ref[i])
        keep = ~ambiguous[i]
        assert keep.mean() > 0.95
        assert np.array_equal(gb[keep], rb[keep]), f"token {i} at block {b} offset {o}"
    written = torch.zeros((num_blocks, bs), dtype=torch.bool)
    written[slots // bs, slots % bs] = True
    untouched = ~written[:, None, :, None].expand(codes.shape).to(device)
    assert torch.equal(codes[untouched], before[untouched]), "a slot no token names was written"


def test_non_contiguous_heads_and_the_runtime_layout(device):
    """k as the runtime hands it over (a permuted [B, Hkv, T, D] reshaped to [B*T, Hkv, D])."""
    gen = torch.Generator().manual_seed(5)
    k4 = torch.randn((2, 4, 3, 32), generator=gen).to(device)  # [B, Hkv, T, D]
    k = k4.permute(0, 2, 1, 3)[:, :2].reshape(4, 4, 32)  # [B*T', Hkv, D]
    kv = k.transpose(0, 1).contiguous().transpose(0, 1)  # same values, token stride 32, head stride 128
    assert kv.stride(0) == 32 and kv.stride(1) == 128
    w = torch.randn((32, 64), generator=gen).to(device)
    codes = torch.zeros((4, 4, 8, 8), dtype=torch.uint8, device=device)
    blocks = torch.tensor([3, 0, 2, 1], dtype=torch.int32, device=device)
    offsets = torch.tensor([7, 0, 5, 1], dtype=torch.int32, device=device)
    encode_keys_into(kv, w, codes, blocks, offsets)
    ref, ambiguous = _reference(k, w)
    got = codes.cpu().numpy()[blocks.cpu().numpy(), :, offsets.cpu().numpy()]  # [N, H, bytes]
    assert np.array_equal(_unpack(got)[~ambiguous], _unpack(ref)[~ambiguous])


def test_bad_ids_are_skipped_and_flagged(device):
    gen = torch.Generator().manual_seed(7)
    k = torch.randn((3, 2, 32), generator=gen).to(device)
    w = torch.randn((32, 16), generator=gen).to(device)
    codes = torch.zeros((4, 2, 8, 2), dtype=torch.uint8, device=device)
    for bad_block, bad_off in ((4, 0), (-1, 0), (1, 8), (1, -3)):
        codes.zero_()
        blocks = torch.tensor([0, bad_block, 2], dtype=torch.int32, device=device)
        offsets = torch.tensor([1, bad_off, 3], dtype=torch.int32, device=device)
        with pytest.raises(ValueError, match=r"token 1: block id .* must be in \[0, 4\) and offset .* in \[0, 8\)"):
            encode_keys_into(k, w, codes, blocks, offsets)
        guard = IndexGuard(device)
        encode_keys_into(k, w, codes, blocks, offsets, validate=False, guard=guard)
        ref, ambiguous = _reference(k, w)
        for i, (b, o) in ((0, (0, 1)), (2, (2, 3))):
            keep = ~ambiguous[i]
            assert np.array_equal(_unpack(codes[b, :, o].cpu().numpy())[keep], _unpack(ref[i])[keep])
        mask = torch.ones((4, 8), dtype=torch.bool)
        mask[0, 1] = mask[2, 3] = False
        assert not codes.transpose(1, 2)[mask.to(device)].any(), "the token with the bad id wrote somewhere"
        with pytest.raises(IndexOutOfRangeError, match="encode_keys_into: a block id is outside"):
            guard.check("decode step")


def test_bad_arguments_are_refused(device):
    k = torch.zeros((2, 2, 32), device=device)
    w = torch.zeros((32, 16), device=device)
    codes = torch.zeros((4, 2, 8, 2), dtype=torch.uint8, device=device)
    ids = torch.zeros(2, dtype=torch.int32, device=device)
    with pytest.raises(ValueError, match="multiple of 8 bits"):
        encode_keys_into(k, torch.zeros((32, 12), device=device), codes, ids, ids)
    with pytest.raises((TypeError, ValueError), match="weight"):
        encode_keys_into(k, w.half(), codes, ids, ids)
    with pytest.raises((TypeError, ValueError), match="codes"):
        encode_keys_into(k, w, codes[..., :1], ids, ids)
    with pytest.raises((TypeError, ValueError), match="blocks"):
        encode_keys_into(k, w, codes, ids[:1], ids)
    with pytest.raises((TypeError, ValueError), match="offsets"):
        encode_keys_into(k, w, codes, ids, ids.float())
    with pytest.raises(TypeError, match="guard must be an IndexGuard"):
        encode_keys_into(k, w, codes, ids, ids, guard=object())
    with pytest.raises(TypeError, match="validate"):
        encode_keys_into(k, w, codes, ids, ids, validate=1)
