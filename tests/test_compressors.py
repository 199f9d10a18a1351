import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from spectral_kv import COMPRESSORS, LowRankCompressor, SpectralConfig, register_compressor
from spectral_kv.compressors import randomized_svd

LOSSLESS = dict(coeff_bits=None, value_bits="same", basis_dtype="float32")


def _matrix(n, t, d, seed, decay):
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(n, t, min(t, d), generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n, d, min(t, d), generator=g, dtype=torch.float64))
    s = decay ** torch.arange(min(t, d), dtype=torch.float64)
    return ((u * s) @ v.transpose(-1, -2)).float(), s


@given(t=st.integers(2, 48), d=st.integers(2, 24), seed=st.integers(0, 10**6), decay=st.floats(0.3, 0.99), data=st.data())
def test_exact_svd_error_equals_tail_energy(t, d, seed, decay, data):
    """Eckart–Young: ||X - X_k||_F^2 == sum of the singular values beyond k, squared."""
    rank = data.draw(st.integers(1, min(t, d)))
    x, s = _matrix(2, t, d, seed, decay)
    comp = COMPRESSORS["exact_svd"](SpectralConfig(**LOSSLESS, compressor="exact_svd", k_rank_keys=rank, k_rank_values=rank), "keys", rank)
    y = comp.decompress(comp.compress(x), torch.float64)
    err2 = ((y - x.double()) ** 2).sum(dim=(-1, -2))
    tail = (s[rank:] ** 2).sum()
    assert torch.allclose(err2, tail.expand(2), rtol=1e-3, atol=1e-6 * float((s**2).sum()))


@given(t=st.integers(4, 40), d=st.integers(4, 20), seed=st.integers(0, 10**6), name=st.sampled_from(["exact_svd", "randomized_svd"]), bits=st.sampled_from([None, 8]))
def test_error_never_rises_with_rank(t, d, seed, name, bits):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, t, d, generator=g) * torch.linspace(3, 0.1, d)
    errs = []
    for rank in range(1, min(t, d) + 1):
        comp = COMPRESSORS[name](SpectralConfig(compressor=name, coeff_bits=bits, value_bits="same", basis_dtype="float32", k_rank_keys=rank, k_rank_values=rank), "keys", rank)
        errs.append(float((comp.decompress(comp.compress(x), torch.float64) - x.double()).norm()))
    slack = 1e-4 * float(x.norm()) + (0.02 * float(x.norm()) if bits else 0.0)
    assert all(b <= a + slack for a, b in zip(errs, errs[1:])), errs


@given(seed=st.integers(0, 10**6), rank=st.integers(1, 12))
def test_full_rank_unquantized_is_identity(seed, rank):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 20, rank, generator=g)  # rank == head_dim: full rank
    for name in ("exact_svd", "randomized_svd"):
        comp = COMPRESSORS[name](SpectralConfig(**LOSSLESS, compressor=name, k_rank_keys=rank, k_rank_values=rank), "values", rank)
        assert torch.allclose(comp.decompress(comp.compress(x), torch.float32), x, atol=1e-4)


def test_randomized_close_to_exact_and_deterministic():
    x, s = _matrix(8, 128, 64, seed=1, decay=0.9)
    for rank in (8, 16, 32):
        exact = ((s[rank:] ** 2).sum().sqrt()).item()
        coeffs, basis = randomized_svd(x, rank, oversample=8, power_iters=2, seed=3)
        err = (coeffs @ basis - x).norm(dim=(-1, -2))
        assert float(err.max()) <= 1.05 * exact + 1e-6
        coeffs2, basis2 = randomized_svd(x, rank, oversample=8, power_iters=2, seed=3)
        assert torch.equal(coeffs, coeffs2) and torch.equal(basis, basis2)
        eye = basis @ basis.transpose(-1, -2)
        assert torch.allclose(eye, torch.eye(rank).expand_as(eye), atol=1e-4)


def test_user_compressor_is_selectable_by_name():
    @register_compressor("test_first_components")
    class FirstComponents(LowRankCompressor):
        """Projects onto the first `rank` coordinate axes (a deliberately bad basis)."""

        def factorize(self, x, rank):
            basis = torch.eye(x.shape[-1])[:rank].expand(x.shape[0], rank, x.shape[-1])
            return x[..., :rank], basis

    cfg = SpectralConfig(compressor="test_first_components", k_rank_keys=2, k_rank_values=2, **LOSSLESS)
    comp = COMPRESSORS[cfg.compressor](cfg, "keys", 2)
    x = torch.randn(1, 5, 4)
    y = comp.decompress(comp.compress(x), torch.float32)
    assert torch.equal(y[..., :2], x[..., :2]) and torch.equal(y[..., 2:], torch.zeros(1, 5, 2))
    with pytest.raises(ValueError, match="already registered"):
        register_compressor("exact_svd")(FirstComponents)


def test_randomized_compressor_is_the_kernel_modules_algorithm():
    # One randomized SVD: the compressor runs kernels/rsvd.py's reference twin, bit for bit
    # (the separate implementation it replaced gave the same bits).
    from spectral_kv.kernels.rsvd import randomized_svd_lowrank_reference

    cfg = SpectralConfig(compressor="randomized_svd", coeff_bits=None, value_bits="same", basis_dtype="float32", seed=5,
                         k_rank_keys=8, k_rank_values=8)
    x = torch.randn(6, 64, 32, generator=torch.Generator().manual_seed(4))
    comp = COMPRESSORS["randomized_svd"](cfg, "keys", 8)
    got = comp.factorize(x, 8)
    want = randomized_svd_lowrank_reference(x, 8, cfg.rsvd_oversample, cfg.rsvd_power_iters, cfg.seed)
    assert all(torch.equal(a, b) for a, b in zip(got, want))
