"""Exact truncated SVD (`torch.linalg.svd`): the best rank-k approximation (Eckart–Young)."""

from __future__ import annotations

import torch

from .base import LowRankCompressor, register_compressor

__all__ = ["ExactSVD"]


@register_compressor("exact_svd")
class ExactSVD(LowRankCompressor):
    """Rank-k truncation of the thin SVD, batched over blocks."""

    def factorize(self, x: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        u, s, vh = torch.linalg.svd(x.float(), full_matrices=False)
        return u[..., :rank] * s[..., None, :rank], vh[..., :rank, :]
