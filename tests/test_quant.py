import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from spectral_kv.quant import dequantize, qmax, quantize


@given(
    bits=st.sampled_from([8, 4]),
    t=st.integers(1, 40),
    r_half=st.integers(1, 8),
    scale=st.floats(1e-3, 1e3),
    seed=st.integers(0, 2**31 - 1),
)
def test_dequantization_error_at_most_half_a_step(bits, t, r_half, scale, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, t, 2 * r_half, generator=g) * scale
    x[0, :, 0] = 0.0  # an all-zero component must survive too
    codes, scales = quantize(x, bits)
    y = dequantize(codes, scales, bits)
    assert y.shape == x.shape
    err = (y - x).abs()
    assert bool((err <= scales.unsqueeze(-2) / 2 * (1 + 1e-5) + 1e-12).all())
    assert int(codes.numel()) == x.numel() * bits // 8  # 4-bit codes really pack two per byte


def test_codes_use_full_symmetric_range():
    x = torch.tensor([[[-2.0, 1.0], [1.0, -0.5], [0.5, 0.25]]])
    codes, scales = quantize(x, 8)
    assert codes.dtype == torch.int8
    assert torch.allclose(scales, torch.tensor([[2.0 / 127, 1.0 / 127]]))
    assert codes[0, 0, 0].item() == -qmax(8) and codes[0, 0, 1].item() == qmax(8)


def test_group_layout_is_built_once_and_its_cached_sizes_are_right():
    """The decode glue asks for the same layout at every step: one object, sizes as defined."""
    from spectral_kv.kernels.quant_compress import group_layout

    lay = group_layout("values", 64, 32, 3, 16)
    assert group_layout("values", 64, 32, 3, 16) is lay
    assert lay.segments == ((16, 3), (16, 3)) and lay.kept == lay.channels == 32
    assert lay.kept_segments == lay.segments and lay.nbytes == 64 * 3 * 32 // 8
    # planes (2, 1) of 16 and 8 rows, 16 channels each, segment after segment
    assert lay.offsets == ((0, 16 * 16), (16 * 16 + 8 * 16, 2 * 16 * 16 + 8 * 16))
    with pytest.raises(Exception):
        lay.tokens = 32  # frozen: the cached sizes can never go stale
