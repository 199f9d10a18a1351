"""Bit packing, the Hadamard rotation and the grouped (`hadamard`) compressor."""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from spectral_kv import SpectralConfig
from spectral_kv.compressors import COMPRESSORS, FactoredCompressor
from spectral_kv.compressors.grouped import hadamard_matrix, rotation_matrix
from spectral_kv.quant import pack_bits, unpack_bits


@given(bits=st.integers(1, 8), rows=st.integers(1, 4), bytes_=st.integers(1, 6), seed=st.integers(0, 10**6))
def test_pack_bits_round_trips_and_uses_bits_bytes(bits, rows, bytes_, seed):
    n = bytes_ * 8  # n * bits is a whole number of bytes for every width
    codes = torch.randint(0, 2**bits, (rows, n), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)
    packed = pack_bits(codes, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (rows, n * bits // 8)
    assert torch.equal(unpack_bits(packed, bits), codes)


@given(bits=st.integers(1, 7), k=st.integers(1, 12), seed=st.integers(0, 10**6))
def test_pack_bits_lays_codes_out_as_a_little_endian_bit_stream(bits, k, seed):
    """Both code paths (8 codes per int64 word when n is a multiple of 8, a bit stream
    otherwise, e.g. 2 or 6 four-bit codes) against the layout computed with Python ints."""
    n = k * (8 // math.gcd(8, bits))  # the whole-byte code counts
    codes = torch.randint(0, 2**bits, (2, n), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)
    for row in range(2):
        stream = sum(int(c) << (j * bits) for j, c in enumerate(codes[row]))
        expect = [(stream >> (8 * i)) & 0xFF for i in range(n * bits // 8)]
        assert pack_bits(codes, bits)[row].tolist() == expect
    assert torch.equal(unpack_bits(pack_bits(codes, bits), bits), codes)


def test_pack_bits_rejects_partial_bytes_and_bad_widths():
    with pytest.raises(ValueError, match="3 bits"):
        pack_bits(torch.zeros(1, 5, dtype=torch.uint8), 3)
    with pytest.raises(ValueError, match="got 9"):
        pack_bits(torch.zeros(1, 8, dtype=torch.uint8), 9)


@pytest.mark.parametrize("d", [1, 2, 8, 64, 12, 96])
def test_rotations_are_orthonormal(d):
    r = rotation_matrix(d, seed=3)
    assert torch.allclose(r @ r.T, torch.eye(d), atol=1e-5)
    if d & (d - 1) == 0:
        assert torch.equal(r, hadamard_matrix(d))
    else:
        assert torch.equal(r, rotation_matrix(d, seed=3))  # seeded: reproducible


def _cfg(bits, vbits, group):
    return SpectralConfig(block_size=64, hot_buffer_size=4, coeff_bits=bits, value_bits=vbits, quant_group=group)


@given(role=st.sampled_from(["keys", "values"]), bits=st.sampled_from([2, 3, 4, 8]), group=st.sampled_from([8, 16, 64]),
       d=st.sampled_from([8, 16, 32]), seed=st.integers(0, 10**6))
def test_error_bound_bytes_and_factored_form(role, bits, group, d, seed):
    cfg = _cfg(bits, bits, group)
    comp = COMPRESSORS["hadamard"](cfg, role, 0)
    assert isinstance(comp, FactoredCompressor)
    g = torch.Generator().manual_seed(seed)
    t = 64
    x = torch.randn(3, t, d, generator=g) * torch.linspace(0.1, 4, d)  # outlier-ish channels
    parts = comp.compress(x)
    r = rotation_matrix(d, cfg.seed)
    c = comp.coefficients(parts)
    # asymmetric min/max: every coefficient within half a step (+ fp16 rounding of scale/zero)
    scale = parts["scale"].float()
    gk = min(group, t) if role == "keys" else min(group, d)
    step = scale.repeat_interleave(gk, dim=-2) if role == "keys" else scale.repeat_interleave(gk, dim=-1)
    exact = x @ r.T
    assert ((c - exact).abs() <= step / 2 + 2e-3 * exact.abs().amax() + 1e-6).all()
    # the factored form and decompress agree, and decompress inverts the rotation
    assert torch.allclose(c @ comp.basis(parts)[0], comp.decompress(parts, torch.float32), atol=1e-5)
    assert comp.basis(parts).shape == (3, d, d)
    # bytes: bits per element exactly, plus one fp16 scale and zero per group
    held = sum(p.numel() * p.element_size() for p in parts.values())
    assert held == 3 * t * d * bits // 8 + 3 * (t * d // gk) * 4


def test_more_bits_less_error_and_rotation_beats_outlier_channels():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 64, 32, generator=g)
    x[..., 3] *= 30  # one outlier channel, as real keys have
    errs = []
    for bits in (2, 3, 4, 8):
        comp = COMPRESSORS["hadamard"](_cfg(bits, bits, 32), "values", 0)
        errs.append(float((comp.decompress(comp.compress(x), torch.float32) - x).norm()))
    assert errs == sorted(errs, reverse=True) and errs[-1] < 0.02 * float(x.norm())
    plain = COMPRESSORS["kivi4"](_cfg(4, 4, 32), "values", 0)
    rotated = COMPRESSORS["hadamard"](_cfg(4, 4, 32), "values", 0)
    e_plain = (plain.decompress(plain.compress(x), torch.float32) - x).norm()
    e_rot = (rotated.decompress(rotated.compress(x), torch.float32) - x).norm()
    assert e_rot < 0.7 * e_plain


@given(seed=st.integers(0, 10**6), d=st.sampled_from([4, 16, 12]))
def test_unquantized_is_lossless(seed, d):
    cfg = SpectralConfig(block_size=16, hot_buffer_size=2, coeff_bits=None, value_bits=None)
    x = torch.randn(2, 16, d, generator=torch.Generator().manual_seed(seed))
    for role in ("keys", "values"):
        comp = COMPRESSORS["hadamard"](cfg, role, 0)
        assert torch.allclose(comp.decompress(comp.compress(x), torch.float32), x, atol=1e-5)


def test_bad_group_is_a_clear_error():
    comp = COMPRESSORS["hadamard"](SpectralConfig(block_size=64, hot_buffer_size=4, quant_group=48), "values", 0)
    with pytest.raises(ValueError, match="head_dim 64 is not a multiple of quant_group=48"):
        comp.compress(torch.randn(1, 64, 64))


@pytest.mark.parametrize("name,bits,block,ok", [("hadamard", 3, 12, False), ("hadamard", 3, 16, True), ("hadamard", 2, 6, False),
                                                ("hadamard", 4, 6, True), ("kivi2", None, 6, False), ("kivi4", None, 6, True)])
def test_block_size_must_fill_the_bit_planes(name, bits, block, ok):
    """Codes are packed on the token axis (8/p tokens per byte of a p-bit plane), so the block
    size, not head_dim, must fill whole bytes; checked when the config is built."""
    kw = dict(compressor=name, block_size=block, hot_buffer_size=2, **({} if name.startswith("kivi") else dict(quant_group=2)))
    kw.update(dict(coeff_bits=bits, value_bits=bits) if bits else dict(use_spectral_attention=False))
    if ok:
        SpectralConfig(**kw)
    else:
        with pytest.raises(ValueError, match=f"block_size={block}"):
            SpectralConfig(**kw)


@pytest.mark.parametrize("name,role,bits,d", [("hadamard", "keys", 3, 12), ("hadamard", "values", 3, 12), ("kivi2", "values", None, 64),
                                              ("hadamard", "values", 2, 96)])
def test_codes_are_one_buffer_in_the_code_layout(name, role, bits, d):
    cfg = SpectralConfig(compressor=name, block_size=16, hot_buffer_size=2,
                         **(dict(coeff_bits=bits, value_bits=bits, quant_group=16) if bits else dict(use_spectral_attention=False)))
    comp = COMPRESSORS[name](cfg, role, 0)
    layout = comp.code_layout(d)
    x = torch.randn(3, 16, d, generator=torch.Generator().manual_seed(0))
    parts = comp.compress(x)
    assert parts["codes"].shape == (3, layout.nbytes) and parts["codes"].dtype == torch.uint8
    assert layout.nbytes == 16 * d * comp.bits // 8
    g = min(cfg.quant_group if name == "hadamard" else 32, d)
    assert layout.segments == (((d, comp.bits),) if role == "keys" else ((g, comp.bits),) * (d // g))
    # the buffer is the layout's packing of the quantized codes: rebuild them from the coefficients
    c, scale, zero = comp.coefficients(parts), parts["scale"].float(), parts["zero"].float()
    if role == "keys":
        s, z = scale.repeat_interleave(16 // scale.shape[1], 1), zero.repeat_interleave(16 // scale.shape[1], 1)
    else:
        s, z = scale.repeat_interleave(g, 2), zero.repeat_interleave(g, 2)
    codes = torch.round((c - z) / s).to(torch.uint8)
    assert torch.equal(layout.pack(codes), parts["codes"])
