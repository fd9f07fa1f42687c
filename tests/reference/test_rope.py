import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ucm_trt.reference import apply_rope, delta_rope, rope_cos_sin, rotate_half


def complex_rope(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """Independent NeoX RoPE: pair (i, i + D/2) is one complex number rotated by pos * theta^(-2i/D)."""
    d = x.shape[-1]
    half = d // 2
    z = torch.complex(x[..., :half].double(), x[..., half:].double())
    inv = torch.tensor([theta ** (-2 * i / d) for i in range(half)], dtype=torch.float64)
    ang = positions.double()[..., None] * inv
    zr = z * torch.polar(torch.ones_like(ang), ang)
    return torch.cat([zr.real, zr.imag], dim=-1)


@pytest.mark.parametrize("d", [64, 128])
def test_apply_rope_matches_complex_rotation(d):
    g = torch.Generator().manual_seed(d)
    x = torch.randn(2, 3, 17, d, generator=g)
    pos = torch.randint(0, 200_000, (17,), generator=g)
    out = apply_rope(x, pos, theta=1e5)
    ref = complex_rope(x, pos, 1e5)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)


@settings(max_examples=25, deadline=None)
@given(a=st.integers(0, 131_072), b=st.integers(0, 131_072), seed=st.integers(0, 2**16))
def test_delta_rope_composes(a, b, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4, 64, generator=g, dtype=torch.float64)
    pa = torch.full((4,), a)
    pb = torch.full((4,), b)
    torch.testing.assert_close(
        delta_rope(apply_rope(x, pa, theta=1e4), pb, theta=1e4),
        apply_rope(x, pa + pb, theta=1e4),
        rtol=1e-9, atol=1e-9,
    )


def test_rope_position_zero_is_identity_and_norm_preserved():
    x = torch.randn(5, 8, 64)
    torch.testing.assert_close(apply_rope(x, torch.zeros(8, dtype=torch.long), theta=1e4), x)
    y = apply_rope(x, torch.arange(8), theta=1e4)
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1), rtol=1e-5, atol=1e-5)


def test_rotate_half_and_tables():
    x = torch.arange(4.0)
    assert rotate_half(x).tolist() == [-2.0, -3.0, 0.0, 1.0]
    cos, sin = rope_cos_sin(torch.tensor([0, 1]), 4, 10000.0)
    assert cos.shape == (2, 4)
    assert math.isclose(float(cos[1, 0]), math.cos(1.0), rel_tol=1e-6)
    assert math.isclose(float(sin[1, 3]), math.sin(1.0 / 100.0), rel_tol=1e-6)


def test_rope_bad_inputs():
    with pytest.raises(ValueError, match="head_dim"):
        rope_cos_sin(torch.tensor([1]), 7, 1e4)
    with pytest.raises(ValueError, match="theta"):
        rope_cos_sin(torch.tensor([1]), 8, -1.0)
    with pytest.raises(TypeError, match="positions"):
        apply_rope(torch.randn(3, 8), torch.tensor([1.0, 2.0, 3.0]), theta=1e4)
    with pytest.raises(ValueError, match="positions"):
        apply_rope(torch.randn(3, 8), torch.arange(4), theta=1e4)
    with pytest.raises(ValueError, match="even last dimension"):
        apply_rope(torch.randn(3, 7), torch.arange(3), theta=1e4)
    with pytest.raises(TypeError, match="x must"):
        apply_rope([1.0, 2.0], torch.arange(2), theta=1e4)
