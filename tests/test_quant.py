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


# ---------------------------------------------------------------------------- byte statistics
def test_byte_scale_codes_are_exact_rounded_up_and_name_nan():
    from spectral_kv.quant import BYTE_SCALE_NAN, byte_scale, byte_scale_code

    codes = torch.arange(256, dtype=torch.uint8)
    s = byte_scale(codes)
    assert s[0].item() == 2.0**-16 and s[254].item() == 1.75 * 2**15 and torch.isnan(s[255])
    assert bool((s[1:255] > s[:254]).all())  # strictly increasing: a code is its scale
    # 3 mantissa bits: within an octave the steps are 1/8 of its lower end
    assert torch.equal(s[8:16] / s[8], 1 + torch.arange(8) / 8)
    assert torch.equal(byte_scale_code(s[:255]), codes[:255])  # a grid point needs exactly its code
    need = torch.tensor([0.0, -0.0, 1e-30, 2.0**-17, 1.0, 1.0 + 2**-23, 1.2, 57344.0, 57344.5, float("inf"), float("nan")])
    got = byte_scale_code(need)
    assert got[:5].tolist() == [0, 0, 0, 0, 128] and got[5].item() == 129 and got[7].item() == 254
    assert (got[8:] == BYTE_SCALE_NAN).all()
    assert byte_scale(got[6]).item() >= 1.2 > byte_scale(got[6] - 1).item()


@given(need=st.floats(2.0**-16, 57344.0, allow_nan=False))
def test_byte_scale_code_is_the_smallest_scale_not_below_the_need(need):
    from spectral_kv.quant import byte_scale, byte_scale_code

    n = torch.tensor([need], dtype=torch.float32)
    code = byte_scale_code(n)
    assert byte_scale(code).item() >= n.item()
    if code.item() > 0:
        assert byte_scale(code - 1).item() < n.item()


@given(bits=st.integers(1, 8), t=st.integers(1, 9), g=st.integers(1, 40), offset=st.floats(-1e3, 1e3),
       spread=st.floats(0, 1e2), seed=st.integers(0, 2**31 - 1))
def test_byte_statistics_keep_the_half_step_bound_wherever_the_range_lies(bits, t, g, offset, spread, seed):
    """Ranges straddling 0, far from it (the zero point would leave int8: the scale widens
    instead of clipping), constant (spread 0) and zero groups: error <= scale / 2."""
    from spectral_kv.quant import ZP_MAX, ZP_MIN, group_stats, quantize_groups

    x = offset + spread * torch.randn(t, g, generator=torch.Generator().manual_seed(seed))
    x[0] = 0.0
    codes, scale, zp = quantize_groups(x, bits, dim=-1, stats="byte")
    assert codes.dtype == scale.dtype == torch.uint8 and zp.dtype == torch.int8 and scale.shape == (t, 1)
    assert int(codes.max()) <= 2**bits - 1 and ZP_MIN <= int(zp.min()) and int(zp.max()) <= ZP_MAX
    s, z = group_stats(scale, zp)
    assert torch.equal(codes.float() * s + z, (codes.float() - zp.float()) * s)  # exact, as documented
    err = (codes.float() * s + z - x).abs()
    assert bool((err <= s / 2 * (1 + 1e-5)).all()), float((err / s).max())
    assert torch.equal(codes[0].float() * s[0] + z[0], torch.zeros(g))  # zeros decode to exact zeros
    # the needed scale rounded up: at most one code step (12.5%) above (hi - lo) / levels unless
    # the zero point forced a wider one
    lo, hi = x.amin(-1, keepdim=True), x.amax(-1, keepdim=True)
    need = torch.maximum(torch.maximum((hi - lo) / (2**bits - 1), hi / (2**bits - 1 - ZP_MIN)), -lo / ZP_MAX)
    assert bool((s <= torch.clamp(need, min=2.0**-16) * 1.125 * (1 + 1e-6)).all())


def test_byte_statistics_of_non_finite_or_overflowing_groups_decode_to_nan():
    """As the float16 form: a group with NaN/inf (or too wide for the largest scale) decodes
    to non-finite values, never to plausible numbers; the other groups are untouched."""
    from spectral_kv.quant import group_stats, quantize_groups

    x = torch.randn(5, 16, generator=torch.Generator().manual_seed(0))
    x[1, 3], x[2, 0], x[3] = float("nan"), float("inf"), torch.linspace(-6e5, 6e5, 16)
    for form in ("fp16", "byte"):
        codes, scale, zero = quantize_groups(x, 3, dim=-1, stats=form)
        s, z = group_stats(scale, zero)
        y = codes.float() * s + z
        assert not torch.isfinite(y[1]).any() and not torch.isfinite(y[2]).all(), form
        assert bool(torch.isfinite(y[[0, 4]]).all()) and (y[[0, 4]] - x[[0, 4]]).abs().max() < 1.0, form
    assert torch.isnan(y[3]).all()  # byte form: 6e5 / 7 is above the largest scale code


def test_group_stats_refuses_mixed_forms_and_the_forms_match_the_config():
    from spectral_kv.config import VALUE_STATS
    from spectral_kv.quant import STATS_FORMS, group_stats, quantize_groups

    assert STATS_FORMS == VALUE_STATS
    with pytest.raises(ValueError, match="uint8/int8"):
        group_stats(torch.zeros(2, dtype=torch.uint8), torch.zeros(2, dtype=torch.float16))
    with pytest.raises(ValueError, match="'fp8'"):
        quantize_groups(torch.zeros(2, 4), 3, dim=-1, stats="fp8")
