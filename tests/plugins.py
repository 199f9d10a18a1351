"""Test-only plug-ins, registered on import (tests/test_contract.py runs them through the matrix).

``test_raw``: a compressor that is not factored (strategies other than ``reconstruct`` must
refuse it). ``test_pca``: a stateful compressor for the per-row shared-state contract. `fit` learns, per
(batch row, KV head), the mean and an orthonormal PCA basis of that row's first blocks; every
block is stored as float32 coefficients ``(x - mean) @ basisᵀ``. Lossless up to float rounding
(full rank), factored with a per-row shared basis, so it exercises every shared-state path:
fit, gather per block at compress, broadcast per row at attend (`shared_basis` per row),
row operations, static storage, save / load and the memory report.
"""

from __future__ import annotations

import torch

from spectral_kv.compressors import Compressor, FactoredCompressor, register_compressor


@register_compressor("test_raw")
class Raw(Compressor):
    """Not factored: a block stored as it is (float32). Only ``reconstruct`` serves it."""

    supported_bits = (None,)

    def compress(self, x, shared=None):
        return {"block": x.float()}

    def decompress(self, parts, dtype, shared=None):
        return parts["block"].to(dtype)


@register_compressor("test_pca")
class RowPCA(FactoredCompressor):
    """Mean-centred PCA per row: shared ``mean`` [D] and ``basis`` [D, D] float32 per (row, head)."""

    supported_bits = (None,)

    def shared_specs(self, head_dim):
        return {"mean": ((head_dim,), torch.float32), "basis": ((head_dim, head_dim), torch.float32)}

    def fit(self, x):  # [P, H, L, D] -> [P, H, D], [P, H, D, D]
        mean = x.mean(dim=2)
        centred = (x - mean[:, :, None]).double()
        _, vecs = torch.linalg.eigh(centred.transpose(-1, -2) @ centred)
        return {"mean": mean, "basis": vecs.flip(-1).transpose(-1, -2).float()}  # rows by decreasing energy

    def compress(self, x, shared=None):  # x [N, T, D]; shared [N, ...]
        mean, basis = shared["mean"], shared["basis"]
        return {"coeffs": (x - mean[:, None]) @ basis.transpose(-1, -2)}

    def coefficients(self, parts, shared=None):  # parts [..., T, D]; shared [..., D] (block axis may be 1)
        offset = (shared["mean"][..., None, :] @ shared["basis"].transpose(-1, -2))  # [..., 1, D]
        return parts["coeffs"] + offset

    def basis(self, parts, shared=None):
        return shared["basis"].expand(*parts["coeffs"].shape[:-2], *shared["basis"].shape[-2:])

    def shared_basis(self, parts, shared=None):
        return shared["basis"]  # per row: [..., 1, D, D] beside parts [..., NB, T, D]
