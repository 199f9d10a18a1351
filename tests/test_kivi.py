"""KIVI reference quantizer: packing, error bound, layout and bytes."""

import pytest
import torch

import spectral_kv.compressors.kivi as K
from spectral_kv import SpectralConfig
from spectral_kv.quant import pack_bits, quantize_groups, unpack_bits


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_pack_roundtrip(bits):
    codes = torch.randint(0, 2**bits, (3, 5, 64), dtype=torch.uint8)
    packed = pack_bits(codes, bits)
    assert packed.shape == (3, 5, 64 * bits // 8)
    assert torch.equal(unpack_bits(packed, bits), codes)


def test_quantize_groups_hand_case():
    x = torch.tensor([[0.0, 1.0, 2.0, 3.0]])  # one group of 4, 2 bits: scale 1, zero 0
    codes, scale, zero = quantize_groups(x, 2, dim=1)
    assert codes.tolist() == [[0, 1, 2, 3]]
    assert float(scale) == 1.0 and float(zero) == 0.0


@pytest.mark.parametrize("cls", [K.Kivi4, K.Kivi2])
@pytest.mark.parametrize("role", ["keys", "values"])
def test_error_bound_layout_and_bytes(cls, role):
    cfg = SpectralConfig(compressor=cls.name, use_spectral_attention=False)
    comp = cls(cfg, role, 2)
    torch.manual_seed(0)
    x = torch.randn(4, 512, 64) * torch.linspace(0.1, 5, 64)  # outlier channels, as real keys
    parts = comp.compress(x)
    assert all(p.shape[0] == 4 for p in parts.values())
    if role == "keys":  # per channel: statistics over groups of 32 tokens
        assert parts["scale"].shape == (4, 16, 64)
    else:  # per token: statistics over groups of 32 channels
        assert parts["scale"].shape == (4, 512, 2)
    y = comp.decompress({k: v.reshape(2, 2, *v.shape[1:]) for k, v in parts.items()}, torch.float32).reshape(x.shape)
    # error <= scale/2 per element (+ fp16 rounding of zero point)
    if role == "keys":
        bound = parts["scale"].float().repeat_interleave(32, dim=1) / 2
    else:
        bound = parts["scale"].float().repeat_interleave(32, dim=2) / 2
    assert ((x - y).abs() <= bound + 1e-2).all()
    held = sum(p.numel() * p.element_size() for p in parts.values())
    fp16 = x.numel() * 2
    # codes bits/16 of fp16 plus 2 fp16 statistics per 32 elements
    assert held == fp16 * cls.fixed_bits // 16 + x.numel() // 32 * 4
    assert held < fp16
