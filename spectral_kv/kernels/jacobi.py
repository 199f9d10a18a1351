"""Triton parallel-cyclic Jacobi eigensolver: one program per small symmetric matrix.

`rsvd.jacobi_eigh` in torch ops launches ~12 kernels per rotation round, (n-1) rounds per
sweep, 6 sweeps: ~2,000 launches whose serial chain dominated the captured rSVD graph (11 ms
for 256 matrices, NOTES_kernels.md). Here each program keeps its matrix A and eigenvector
accumulator V ([M, M] fp32, M = next power of two >= max(n, 32)) in registers for all sweeps,
so the whole eigensolve is one launch.

A round applies M/2 disjoint rotations (p_i, q_i) at once. With one-hot pair matrices
OP, OQ [M/2, M] (row i selects p_i / q_i) everything is dense algebra Triton can express:
  a_pp = OP . diag(A), a_pq = rowsum((OP @ A) * OQ),
  J = OPᵀ c OP + OQᵀ c OQ + OPᵀ s OQ - OQᵀ s OP,   A <- Jᵀ A J,   V <- V J.
Padding coordinates have zero couplings, so their rotations are the identity. All dots use
IEEE fp32 (not tf32): the eigenvectors feed the basis.

Public: ``jacobi_eigh_triton(a, sweeps)`` -> (eigenvalues [N, n] descending, vectors [N, n, n]),
the same contract as `rsvd.jacobi_eigh`; ``torch.ops.spectral_kv.jacobi_eigh`` is the raw op
(unsorted, padded to M).
"""
from __future__ import annotations

import functools

import torch

from .fused_decode import _TRITON_IMPORT_ERROR, HAS_TRITON, _is_fake, _pow2
from .rsvd import _round_robin

__all__ = ["jacobi_eigh_triton", "HAS_TRITON"]

if HAS_TRITON:
    import triton
    import triton.language as tl
    from torch.library import triton_op, wrap_triton

    @triton.jit
    def _jacobi_kernel(a_ptr, w_ptr, v_ptr, p_ptr, q_ptr, n, SWEEPS: tl.constexpr, M: tl.constexpr,
                       HALF: tl.constexpr):
        pid = tl.program_id(0).to(tl.int64)
        rows = tl.arange(0, M)
        ok = (rows[:, None] < n) & (rows[None, :] < n)
        a = tl.load(a_ptr + pid * n * n + rows[:, None] * n + rows[None, :], mask=ok, other=0.0)
        eye = tl.where(rows[:, None] == rows[None, :], 1.0, 0.0)
        v = eye
        half = tl.arange(0, HALF)
        for _ in range(SWEEPS):
            for k in range(M - 1):
                P = tl.load(p_ptr + k * HALF + half)
                Q = tl.load(q_ptr + k * HALF + half)
                op = tl.where(P[:, None] == rows[None, :], 1.0, 0.0)  # [HALF, M]
                oq = tl.where(Q[:, None] == rows[None, :], 1.0, 0.0)
                diag = tl.sum(a * eye, axis=1)  # [M]
                app = tl.sum(op * diag[None, :], axis=1)
                aqq = tl.sum(oq * diag[None, :], axis=1)
                apq = tl.sum(tl.dot(op, a, input_precision="ieee") * oq, axis=1)
                small = tl.abs(apq) <= 1e-30
                tau = (aqq - app) / (2.0 * tl.where(small, 1.0, apq))
                sgn = tl.where(tau >= 0, 1.0, -1.0)
                t = sgn / (tl.abs(tau) + tl.sqrt(1.0 + tau * tau))
                t = tl.where(small, 0.0, t)
                c = 1.0 / tl.sqrt(1.0 + t * t)
                s = t * c
                j = (tl.dot(tl.trans(op * c[:, None]), op, input_precision="ieee")
                     + tl.dot(tl.trans(oq * c[:, None]), oq, input_precision="ieee")
                     + tl.dot(tl.trans(op * s[:, None]), oq, input_precision="ieee")
                     - tl.dot(tl.trans(oq * s[:, None]), op, input_precision="ieee"))
                a = tl.dot(tl.trans(j), tl.dot(a, j, input_precision="ieee"), input_precision="ieee")
                v = tl.dot(v, j, input_precision="ieee")
        tl.store(w_ptr + pid * M + rows, tl.sum(a * eye, axis=1))
        tl.store(v_ptr + pid * M * M + rows[:, None] * M + rows[None, :], v)

    @triton_op("spectral_kv::jacobi_eigh", mutates_args=())
    def _jacobi_op(a: torch.Tensor, p: torch.Tensor, q: torch.Tensor, sweeps: int) -> tuple[torch.Tensor, torch.Tensor]:
        N, n, _ = a.shape
        m = p.shape[1] * 2
        w = torch.empty((N, m), dtype=torch.float32, device=a.device)
        v = torch.empty((N, m, m), dtype=torch.float32, device=a.device)
        if N == 0 or (_interpreted_jacobi() and _is_fake(a)):
            return w, v
        wrap_triton(_jacobi_kernel)[(N,)](a, w, v, p, q, n, SWEEPS=sweeps, M=m, HALF=m // 2, num_warps=4)
        return w, v

    def _interpreted_jacobi() -> bool:
        return type(_jacobi_kernel).__name__ == "InterpretedFunction"


@functools.lru_cache(maxsize=16)
def _schedule(m: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    # The torch Jacobi's round-robin tournament, as int32 tensors for the kernel.
    P, Q = _round_robin(m)
    return (torch.tensor(P, dtype=torch.int32, device=device), torch.tensor(Q, dtype=torch.int32, device=device))


def jacobi_eigh_triton(a: torch.Tensor, sweeps: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigen-decompose symmetric float32 ``a`` [N, n, n] (n <= 64) in one Triton launch.

    Returns (eigenvalues [N, n] descending, eigenvectors [N, n, n] as columns), like
    `rsvd.jacobi_eigh`. No host syncs: capturable in a CUDA graph after one warm-up call.
    """
    if not HAS_TRITON:
        raise RuntimeError(f"jacobi_eigh_triton needs triton; import failed with {_TRITON_IMPORT_ERROR!r}")
    N, n, n2 = a.shape
    if n != n2 or n > 64:
        raise ValueError(f"jacobi_eigh_triton takes square matrices with n <= 64, got {tuple(a.shape)}")
    m = _pow2(n, 32)
    p, q = _schedule(m, str(a.device))
    w, v = torch.ops.spectral_kv.jacobi_eigh(a.float().contiguous(), p, q, sweeps)
    w, v = w[:, :n], v[:, :n, :n]  # padding coordinates never rotate into the real block
    order = torch.argsort(w, dim=1, descending=True)
    return torch.gather(w, 1, order), torch.gather(v, 2, order[:, None, :].expand(-1, n, -1))
