"""Triton Jacobi eigensolver (one program per matrix) vs LAPACK, under the CPU interpreter."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede any triton import

import pytest
import torch

from spectral_kv.kernels import jacobi

needs_triton = pytest.mark.skipif(not jacobi.HAS_TRITON, reason="triton not importable")
DEV = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"


def spd(n_mats, n, seed):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n_mats, n, n, generator=g)
    return (a @ a.transpose(1, 2) / n).to(DEV)


@needs_triton
@pytest.mark.parametrize("n", [5, 12])  # odd and even sizes, both padded to M = 32
def test_matches_eigh(n):
    a = spd(2, n, seed=n)
    w, v = jacobi.jacobi_eigh_triton(a, sweeps=4)
    assert w.shape == (2, n) and v.shape == (2, n, n)
    ref = torch.linalg.eigvalsh(a.double()).flip(-1)
    assert torch.allclose(w.double(), ref, atol=1e-4 * float(ref.abs().max()))
    assert torch.all(w[:, :-1] >= w[:, 1:])  # descending
    assert torch.allclose(a @ v, v * w[:, None, :], atol=1e-4 * float(ref.abs().max()))
    assert torch.allclose(v.transpose(1, 2) @ v, torch.eye(n, device=DEV).expand(2, n, n), atol=1e-5)


@needs_triton
def test_zero_sweeps_is_detectably_wrong():
    # The comparison above can fail: without rotations the "eigenvalues" are the diagonal.
    a = spd(1, 6, seed=1)
    w, _ = jacobi.jacobi_eigh_triton(a, sweeps=0)
    assert (w.double() - torch.linalg.eigvalsh(a.double()).flip(-1)).abs().max() > 1e-2


def test_bad_shape_is_rejected():
    with pytest.raises(ValueError, match="n <= 64"):
        jacobi.jacobi_eigh_triton(torch.zeros(1, 65, 65))


@needs_triton
def test_opcheck():
    a = spd(1, 4, seed=2)
    p, q = jacobi._schedule(32, str(a.device))
    utils = ("test_schema", "test_autograd_registration", "test_faketensor")
    if DEV == "cuda":  # under the interpreter AOT tracing records no kernel (see test_kernels_fused)
        utils = utils + ("test_aot_dispatch_dynamic",)
    res = torch.library.opcheck(torch.ops.spectral_kv.jacobi_eigh.default, (a, p, q, 1), test_utils=utils)
    assert all(v == "SUCCESS" for v in res.values()), res


@needs_triton
def test_rsvd_with_triton_jacobi_matches_reference():
    from spectral_kv.kernels.rsvd import randomized_svd_lowrank, randomized_svd_lowrank_reference

    g = torch.Generator().manual_seed(3)
    x = (torch.randn(1, 32, 6, generator=g) @ torch.randn(1, 6, 16, generator=g)).to(DEV)
    c, b = randomized_svd_lowrank(x, 4, oversample=4, jacobi_sweeps=3, eigh=jacobi.jacobi_eigh_triton)
    cr, br = randomized_svd_lowrank_reference(x, 4, oversample=4)
    assert torch.allclose(c @ b, cr @ br, atol=1e-4 * float(x.norm()))
