"""The `triton_rsvd` compressor: graph-capturable randomized SVD behind the compressor API."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from spectral_kv import COMPRESSORS, SpectralConfig
from spectral_kv.compressors import TritonRSVD
from spectral_kv.tiers import TierManager

LOSSLESS = dict(coeff_bits=None, value_bits="same", basis_dtype="float32")


def _cfg(**kw):
    """A triton_rsvd config (the compressors below get their rank as an argument)."""
    return SpectralConfig(**{**LOSSLESS, "compressor": "triton_rsvd", "k_rank_keys": 16, "k_rank_values": 16, **kw})


def low_rank_plus_noise(n, t, d, rank, noise, seed, decay=0.8):
    g = torch.Generator().manual_seed(seed)
    u = torch.linalg.qr(torch.randn(n, t, rank, generator=g)).Q
    v = torch.linalg.qr(torch.randn(n, d, rank, generator=g)).Q
    s = 10 * decay ** torch.arange(rank, dtype=torch.float32)
    return (u * s) @ v.transpose(1, 2) + noise * torch.randn(n, t, d, generator=g)


def rank_error(name, x, rank, **cfg):
    comp = COMPRESSORS[name](_cfg(**{"compressor": name, **cfg}), "keys", rank)
    y = comp.decompress(comp.compress(x), torch.float64)
    return (y - x.double()).norm(dim=(-1, -2))


def test_registered_and_selectable():
    assert COMPRESSORS["triton_rsvd"] is TritonRSVD and TritonRSVD.low_rank
    cfg = SpectralConfig.preset("fast", compressor="triton_rsvd", attention="spectral")
    assert isinstance(TierManager(cfg).key_compressor, TritonRSVD)


@settings(max_examples=15, deadline=None)
@given(
    t=st.integers(24, 96),
    d=st.sampled_from([16, 32, 48]),
    true_rank=st.integers(4, 16),
    noise=st.floats(0.0, 0.05),
    seed=st.integers(0, 10**6),
)
def test_error_within_5pct_of_exact_svd(t, d, true_rank, noise, seed):
    x = low_rank_plus_noise(3, t, d, true_rank, noise, seed)
    for rank in (max(1, true_rank // 2), true_rank):
        exact = rank_error("exact_svd", x, rank)
        ours = rank_error("triton_rsvd", x, rank)
        scale = float(x.norm()) * 1e-5  # fp32 rounding when the exact error is ~0
        # Eckart-Young: nothing beats the truncated SVD; we stay within 5% of it.
        assert torch.all(ours >= exact - scale), (ours, exact)
        assert torch.all(ours <= 1.05 * exact + scale), (ours / exact)


def test_eckart_young_tail_energy():
    # ||X - X_k||_F^2 >= sum_{i>k} s_i^2 with equality for the SVD; the rSVD is within 10% (in squares).
    x = low_rank_plus_noise(4, 128, 64, 24, 0.02, seed=3, decay=0.9)
    s = torch.linalg.svdvals(x.double())
    for rank in (4, 8, 16):
        tail = s[:, rank:].pow(2).sum(-1)
        err2 = rank_error("triton_rsvd", x, rank).pow(2)
        assert torch.all(err2 >= tail * (1 - 1e-4)) and torch.all(err2 <= 1.10 * tail), (err2 / tail)


def test_parts_shapes_and_dtypes():
    x = low_rank_plus_noise(5, 64, 32, 8, 0.01, seed=1)
    comp = COMPRESSORS["triton_rsvd"](SpectralConfig.preset("fast"), "values", 6)
    parts = comp.compress(x)
    assert parts["coeffs"].dtype == torch.int8 and parts["coeffs"].shape == (5, 64, 6)
    assert parts["scales"].dtype == torch.float32 and parts["scales"].shape == (5, 6)
    assert parts["basis"].dtype == torch.float16 and parts["basis"].shape == (5, 6, 32)
    basis = parts["basis"].float()
    assert torch.allclose(basis @ basis.transpose(1, 2), torch.eye(6).expand(5, 6, 6), atol=2e-3)
    assert comp.decompress(parts, torch.bfloat16).dtype == torch.bfloat16


def test_seed_and_knobs_come_from_config():
    x = low_rank_plus_noise(2, 64, 32, 32, 0.0, seed=2, decay=0.95)  # slow decay: the sketch matters
    a = COMPRESSORS["triton_rsvd"](_cfg(seed=1), "keys", 4).factorize(x, 4)
    b = COMPRESSORS["triton_rsvd"](_cfg(seed=1), "keys", 4).factorize(x, 4)
    c = COMPRESSORS["triton_rsvd"](_cfg(seed=2), "keys", 4).factorize(x, 4)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[1], c[1])
    # No oversampling and no power iterations must visibly lose accuracy on a flat spectrum.
    crude = rank_error("triton_rsvd", x, 4, rsvd_oversample=0, rsvd_power_iters=0)
    tuned = rank_error("triton_rsvd", x, 4)
    assert torch.all(crude > tuned * 1.001), (crude, tuned)


def test_full_rank_is_lossless():
    x = torch.randn(3, 20, 8, generator=torch.Generator().manual_seed(4))
    err = rank_error("triton_rsvd", x, 8)
    assert torch.all(err <= 1e-4 * x.norm())


def test_in_tiers_matches_exact_svd_on_low_rank_stream():
    # A cache compressing with triton_rsvd holds what exact_svd would, on exactly low-rank data.
    cfg = dict(block_size=32, hot_buffer_size=4, sink_tokens=2, k_rank_keys=4, k_rank_values=4, **LOSSLESS)
    g = torch.Generator().manual_seed(5)
    k = torch.randn(2, 2, 70, 4, generator=g) @ torch.randn(2, 2, 4, 16, generator=g)
    v = torch.randn(2, 2, 70, 4, generator=g) @ torch.randn(2, 2, 4, 16, generator=g)
    outs = []
    for name in ("exact_svd", "triton_rsvd"):
        tiers = TierManager(SpectralConfig.preset("fast", **{"compressor": name, **cfg}))
        tiers.append(k, v)
        assert tiers.n_cold == [2, 2]
        outs.append(tiers.materialize()[0])
    assert torch.allclose(outs[0], outs[1], atol=1e-4)
    assert torch.allclose(outs[1], k, atol=1e-4)


def test_cpu_capturable_path_agrees_with_cpu_default(monkeypatch):
    # CPU runs the reference twin; the GPU's capturable ops compute the same factorization.
    x = low_rank_plus_noise(2, 32, 16, 6, 0.01, seed=7)
    comp = COMPRESSORS["triton_rsvd"](_cfg(), "keys", 4)
    c_ref, b_ref = comp.factorize(x, 4)
    monkeypatch.setattr(TritonRSVD, "cpu_capturable", True)
    c, b = comp.factorize(x, 4)
    assert torch.allclose(c @ b, c_ref @ b_ref, atol=1e-4 * float(x.norm()))
    assert torch.allclose(c.norm(dim=1), c_ref.norm(dim=1), rtol=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_cuda_graph_path_matches_eager():
    x = low_rank_plus_noise(8, 128, 64, 16, 0.01, seed=6).cuda()
    comp = COMPRESSORS["triton_rsvd"](_cfg(), "keys", 16)
    graphed = comp.factorize(x, 16)
    again = comp.factorize(x * 2, 16)  # replay with new data
    TritonRSVD.use_cuda_graphs = False
    try:
        eager = comp.factorize(x, 16)
    finally:
        TritonRSVD.use_cuda_graphs = True
    assert torch.allclose(graphed[0] @ graphed[1], eager[0] @ eager[1], atol=1e-3)
    assert torch.allclose(again[0] @ again[1], 2 * (eager[0] @ eager[1]), atol=2e-3)
