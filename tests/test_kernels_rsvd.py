"""Capturable randomized SVD vs exact SVD and vs its Householder-QR reference twin."""
import pytest
import torch

from spectral_kv.kernels.rsvd import (
    cholesky_qr2,
    jacobi_eigh,
    randomized_svd_lowrank,
    randomized_svd_lowrank_reference,
)


def decaying(N, T, D, decay, seed=0):
    g = torch.Generator().manual_seed(seed)
    U = torch.linalg.qr(torch.randn(N, T, D, generator=g)).Q
    V = torch.linalg.qr(torch.randn(N, D, D, generator=g)).Q
    s = decay ** torch.arange(D, dtype=torch.float32)
    return (U * s) @ V.transpose(1, 2)


def optimal_err(x, r):
    return torch.linalg.svdvals(x)[:, r:].pow(2).sum(-1).sqrt()


@pytest.mark.parametrize("decay,rank", [(0.9, 8), (0.7, 16), (0.97, 16)])
def test_error_within_5pct_of_exact_svd(decay, rank):
    x = decaying(8, 128, 64, decay)
    c, b = randomized_svd_lowrank(x, rank)
    assert c.shape == (8, 128, rank) and b.shape == (8, rank, 64)
    err = (x - c @ b).norm(dim=(1, 2))
    assert torch.all(err <= 1.05 * optimal_err(x, rank)), (err / optimal_err(x, rank))


def test_flat_spectrum_is_not_worse_than_reference():
    # Slow decay is the hard case for randomized methods; match the exact-QR twin.
    x = decaying(4, 96, 48, 0.99, seed=3)
    c, b = randomized_svd_lowrank(x, 8)
    cr, br = randomized_svd_lowrank_reference(x, 8)
    err, err_ref = (x - c @ b).norm(dim=(1, 2)), (x - cr @ br).norm(dim=(1, 2))
    assert torch.all(err <= 1.01 * err_ref)


def test_matches_reference_factors():
    x = decaying(4, 64, 32, 0.8, seed=1)
    c, b = randomized_svd_lowrank(x, 6, seed=5)
    cr, br = randomized_svd_lowrank_reference(x, 6, seed=5)
    # Singular vectors agree up to sign; the singular values (coeff column norms) must match.
    assert torch.allclose(c.norm(dim=1), cr.norm(dim=1), rtol=1e-4)
    assert torch.allclose((c @ b), (cr @ br), atol=1e-4)
    # Columns ordered by decreasing energy, like U S.
    assert torch.all(c.norm(dim=1)[:, :-1] >= c.norm(dim=1)[:, 1:])


def test_deterministic_under_seed():
    x = decaying(3, 64, 32, 0.85)
    a = randomized_svd_lowrank(x, 8, seed=11)
    b = randomized_svd_lowrank(x, 8, seed=11)
    c = randomized_svd_lowrank(x, 8, seed=12)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[1], c[1])


def test_basis_rows_orthonormal():
    x = decaying(5, 128, 64, 0.9)
    _, b = randomized_svd_lowrank(x, 16)
    eye = torch.eye(16).expand(5, 16, 16)
    assert (b @ b.transpose(1, 2) - eye).abs().max() < 1e-5


def test_exactly_low_rank_input():
    # Rank-deficient sketches must not break the Cholesky (shifted CholeskyQR).
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 64, 4, generator=g) @ torch.randn(2, 4, 32, generator=g)
    c, b = randomized_svd_lowrank(x, 8)
    assert torch.isfinite(c).all() and torch.isfinite(b).all()
    assert ((x - c @ b).norm() / x.norm()) < 1e-4


def test_cholesky_qr2_and_jacobi():
    g = torch.Generator().manual_seed(4)
    y = torch.randn(3, 100, 20, generator=g) @ torch.diag(torch.logspace(0, -3, 20))
    q = cholesky_qr2(y)
    assert (q.transpose(1, 2) @ q - torch.eye(20)).abs().max() < 1e-5
    a = torch.randn(3, 11, 11, generator=g)
    a = a @ a.transpose(1, 2)
    w, v = jacobi_eigh(a)
    assert torch.allclose(w, torch.linalg.eigvalsh(a).flip(-1), rtol=1e-4, atol=1e-4)
    assert torch.allclose(a @ v, v * w[:, None, :], atol=1e-3)


def test_error_check_can_fail():
    # Too small a rank must visibly miss a decaying spectrum's error budget at a larger rank.
    x = decaying(2, 64, 32, 0.8)
    c, b = randomized_svd_lowrank(x, 4)
    assert torch.all((x - c @ b).norm(dim=(1, 2)) > 1.05 * optimal_err(x, 8))
