"""Randomized SVD (Halko et al.) as a compressor: the algorithm of `spectral_kv.kernels.rsvd`.

There is one randomized SVD in the library, `kernels/rsvd.py`: the CUDA-graph-capturable form
(`randomized_svd_lowrank`, used by ``triton_rsvd``) beside its reference twin with Householder
QR and a small exact SVD (`randomized_svd_lowrank_reference`), which this compressor runs (the
same outputs, bit for bit, as the separate implementation it replaces; tests/test_compressors.py
pins that the compressor equals the kernel module's reference).
"""

from __future__ import annotations

import torch

from ..kernels.rsvd import randomized_svd_lowrank_reference
from .base import LowRankCompressor, register_compressor

__all__ = ["RandomizedSVD", "randomized_svd"]


def randomized_svd(
    x: torch.Tensor, rank: int, oversample: int = 8, power_iters: int = 2, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Batched randomized truncated SVD (`randomized_svd_lowrank_reference` on float32 ``x``).

    Parameters
    ----------
    x : Tensor [N, T, D] float32
    rank : int
    oversample, power_iters : int
        Extra sketch columns and subspace iterations; 8 and 2 put the error within a few
        percent of the exact SVD's on the decaying spectra of K/V blocks.
    seed : int
        The Gaussian test matrix is drawn from a generator seeded here, on ``x``'s device,
        so the result is a deterministic function of ``x``.

    Returns
    -------
    coeffs : Tensor [N, T, rank] float32 (``U S``)
    basis : Tensor [N, rank, D] float32 (``Vᵀ``, orthonormal rows)
    """
    return randomized_svd_lowrank_reference(x.float(), rank, oversample, power_iters, seed)


@register_compressor("randomized_svd")
class RandomizedSVD(LowRankCompressor):
    """Randomized SVD with the config's oversampling, power iterations and seed."""

    config_fields = ("rank", "bits", "basis_dtype", "seed", "rsvd_oversample", "rsvd_power_iters")

    def factorize(self, x: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        c = self.config
        return randomized_svd(x, rank, c.rsvd_oversample, c.rsvd_power_iters, c.seed)
