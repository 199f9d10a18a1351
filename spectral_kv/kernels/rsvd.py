"""Batched randomized SVD that a CUDA graph can capture.

``torch.linalg.svd`` / ``qr`` / ``eigh`` check their LAPACK info codes on the host (a sync),
so they cannot be captured. This module uses only matmuls, ``cholesky_ex`` (no error check),
triangular solves and a fixed-sweep Jacobi eigensolver written as batched tensor ops, so the
whole compression of a block is one straight-line sequence of kernels with no host syncs.

Public entry points
-------------------
randomized_svd_lowrank(x, rank, ...)            capturable path (matmul + CholeskyQR2 + Jacobi)
randomized_svd_lowrank_reference(x, rank, ...)  same algorithm with torch.linalg.qr / svd

Why plain torch and not Triton: the work is a handful of batched GEMMs ([N,T,D] x [N,D,l]
with l = r + p ~ 24..40), which cuBLAS already runs near the memory floor; the only
launch-heavy part is the l x l Jacobi (a few hundred tiny kernels), which graph replay
hides. Measured numbers are in benchmarks/NOTES_kernels.md.
"""
from __future__ import annotations

import functools

import torch

__all__ = ["randomized_svd_lowrank", "randomized_svd_lowrank_reference", "cholesky_qr2", "jacobi_eigh"]


def _sketch(x: torch.Tensor, l: int, seed: int) -> torch.Tensor:
    g = torch.Generator(device=x.device).manual_seed(seed)
    return torch.randn(x.shape[0], x.shape[2], l, generator=g, device=x.device, dtype=x.dtype)


def _cholesky_qr(y: torch.Tensor, shift: float) -> torch.Tensor:
    gram = y.transpose(-1, -2) @ y
    n = gram.shape[-1]
    # Relative diagonal shift keeps rank-deficient sketches positive definite (shifted CholeskyQR).
    tr = gram.diagonal(dim1=-2, dim2=-1).sum(-1, keepdim=True) / n
    eye = torch.eye(n, device=y.device, dtype=y.dtype)
    gram = gram + (shift * tr + 1e-30)[..., None] * eye
    L, _ = torch.linalg.cholesky_ex(gram)
    # y = Q L^T  ->  Q = y L^{-T}
    return torch.linalg.solve_triangular(L.transpose(-1, -2), y, upper=True, left=False)


def cholesky_qr2(y: torch.Tensor, shift: float = 1e-6) -> torch.Tensor:
    """Orthonormalize the columns of ``y`` [N, m, l] (m >= l) with two CholeskyQR passes.

    Returns Q [N, m, l]; the second pass repairs the orthogonality lost to cond(y)^2.
    """
    return _cholesky_qr(_cholesky_qr(y, shift), shift * 1e-2)


@functools.lru_cache(maxsize=32)
def _round_robin_idx(n: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    # Cached on the device so a graph capture (after one eager warm-up) does no H2D copy.
    P, Q = _round_robin(n)
    return torch.tensor(P, device=device), torch.tensor(Q, device=device)


@functools.lru_cache(maxsize=16)
def _round_robin(n: int) -> tuple[list[list[int]], list[list[int]]]:
    # Tournament schedule: n-1 rounds of n/2 disjoint (p, q) pairs cover every pair once.
    others = list(range(1, n))
    P, Q = [], []
    for _ in range(n - 1):
        arr = [0] + others
        P.append([arr[i] for i in range(n // 2)])
        Q.append([arr[n - 1 - i] for i in range(n // 2)])
        others = others[-1:] + others[:-1]
    return P, Q


def jacobi_eigh(a: torch.Tensor, sweeps: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigen-decompose symmetric ``a`` [N, n, n] with parallel cyclic Jacobi (no host syncs).

    Returns (eigenvalues [N, n] descending, eigenvectors [N, n, n] as columns). Fixed sweep
    count instead of a convergence test, because a data-dependent stop would need a sync;
    fp32 Jacobi converges quadratically, 6-8 sweeps reach rounding for n <= 64.
    """
    N, n, _ = a.shape
    odd = n % 2
    if odd:  # pad to even with an isolated zero eigenvalue, dropped at the end
        a = torch.nn.functional.pad(a, (0, 1, 0, 1))
    m = n + odd
    Ps, Qs = _round_robin_idx(m, str(a.device))
    eye = torch.eye(m, device=a.device, dtype=a.dtype).expand(N, m, m)
    v = eye.clone()
    a = a.clone()
    for _ in range(sweeps):
        for k in range(m - 1):
            P, Q = Ps[k], Qs[k]
            d = a.diagonal(dim1=1, dim2=2)
            app, aqq, apq = d[:, P], d[:, Q], a[:, P, Q]
            small = apq.abs() <= 1e-30
            tau = (aqq - app) / (2 * torch.where(small, torch.ones_like(apq), apq))
            sgn = torch.where(tau >= 0, 1.0, -1.0).to(a.dtype)
            t = sgn / (tau.abs() + torch.sqrt(1 + tau * tau))
            t = torch.where(small, torch.zeros_like(t), t)
            c = torch.rsqrt(1 + t * t)
            s = t * c
            J = torch.zeros_like(a)
            J[:, P, P] = c
            J[:, Q, Q] = c
            J[:, P, Q] = s
            J[:, Q, P] = -s
            a = J.transpose(1, 2) @ a @ J
            v = v @ J
    w = a.diagonal(dim1=1, dim2=2)
    if odd:  # the padded coordinate never rotates (its a_pq are 0), so column n is e_n
        w, v = w[:, :n], v[:, :n, :n]
    order = torch.argsort(w, dim=1, descending=True)
    w = torch.gather(w, 1, order)
    v = torch.gather(v, 2, order[:, None, :].expand(-1, v.shape[1], -1))
    return w, v


def randomized_svd_lowrank(
    x: torch.Tensor,
    rank: int,
    oversample: int = 8,
    power_iters: int = 2,
    seed: int = 0,
    sketch: torch.Tensor | None = None,
    jacobi_sweeps: int = 6,
    eigh=None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank-``rank`` factorization x ~= coeffs @ basis, capturable in a CUDA graph.

    Parameters
    ----------
    x : float32 [N, T, D], N independent matrices (e.g. layers x KV heads of one block).
    rank : r <= min(T, D).
    oversample : p extra sketch columns; l = min(r + p, min(T, D)).
    power_iters : subspace iterations, each re-orthonormalized with CholeskyQR2.
    seed : seeds a torch.Generator on x.device for the Gaussian sketch (deterministic).
    sketch : optional pre-drawn float32 [N, D, l] test matrix; pass it when capturing a
        graph so that no generator is used inside the capture.
    jacobi_sweeps : fixed sweep count of the small eigensolver.
    eigh : the small symmetric eigensolver, ``(a, sweeps) -> (w desc, v)``; default
        :func:`jacobi_eigh` (torch ops); `kernels.jacobi.jacobi_eigh_triton` is one launch.

    Returns
    -------
    coeffs : float32 [N, T, r] = U S (columns ordered by decreasing singular value).
    basis : float32 [N, r, D] = V^T, orthonormal rows.
    """
    N, T, D = x.shape
    l = min(rank + oversample, min(T, D))
    omega = sketch if sketch is not None else _sketch(x, l, seed)
    xt = x.transpose(1, 2)
    q = cholesky_qr2(x @ omega)  # [N, T, l]
    for _ in range(power_iters):
        z = cholesky_qr2(xt @ q)  # [N, D, l]
        q = cholesky_qr2(x @ z)
    bm = q.transpose(1, 2) @ x  # [N, l, D]: x ~= q @ bm
    gram = bm @ bm.transpose(1, 2)  # [N, l, l]
    # Normalize so Jacobi works on O(1) numbers whatever the data scale.
    tr = gram.diagonal(dim1=1, dim2=2).sum(-1).clamp_min(1e-30)[:, None, None]
    _, w = (eigh or jacobi_eigh)(gram / tr, jacobi_sweeps)
    vt = w[:, :, :rank].transpose(1, 2) @ bm  # [N, r, D], rows ~ sigma_i v_i^T
    # Normalize rows and remove residual non-orthogonality (Gram eigvecs lose ~cond digits).
    vt = vt * torch.rsqrt((vt * vt).sum(-1, keepdim=True).clamp_min(1e-30))
    basis = cholesky_qr2(vt.transpose(1, 2)).transpose(1, 2)
    coeffs = x @ basis.transpose(1, 2)  # optimal coefficients for this basis: U S
    return coeffs, basis


def randomized_svd_lowrank_reference(
    x: torch.Tensor,
    rank: int,
    oversample: int = 8,
    power_iters: int = 2,
    seed: int = 0,
    sketch: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same randomized algorithm with Householder QR and an exact small SVD (not capturable).

    Shapes as :func:`randomized_svd_lowrank`.
    """
    N, T, D = x.shape
    l = min(rank + oversample, min(T, D))
    omega = sketch if sketch is not None else _sketch(x, l, seed)
    xt = x.transpose(1, 2)
    q = torch.linalg.qr(x @ omega).Q
    for _ in range(power_iters):
        z = torch.linalg.qr(xt @ q).Q
        q = torch.linalg.qr(x @ z).Q
    bm = q.transpose(1, 2) @ x
    u, s, vh = torch.linalg.svd(bm, full_matrices=False)
    basis = vh[:, :rank]
    coeffs = (q @ u[:, :, :rank]) * s[:, None, :rank]
    return coeffs, basis
