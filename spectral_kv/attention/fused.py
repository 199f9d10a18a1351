"""`fused`: the Triton decode kernel that reads the compressed bytes once (GPU decode path)."""

from __future__ import annotations

import os

import torch

from ..compressors import LowRankCompressor
from ..kernels.fused_decode import HAS_TRITON, fused_decode
from .base import register_attention
from .spectral import SpectralAttention

__all__ = ["FusedAttention"]


def _kernel_runs_on(t: torch.Tensor) -> bool:
    # CPU tensors only under triton's interpreter (how CI tests this path).
    return HAS_TRITON and (t.is_cuda or os.environ.get("TRITON_INTERPRET") == "1")


@register_attention("fused")
class FusedAttention(SpectralAttention):
    """`spectral` with decode steps (``Tq == 1``) routed to ``spectral_kv::fused_decode``.

    The kernel serves int8 coefficients with an fp16 basis, rows whose exact tokens are a
    prefix of the exact buffer (no padding inside it) and a query that sees all of them
    (``exact_mask is None``).
    Anything else (prefill, int4 or unquantized coefficients, ragged padded rows, CPU
    without the interpreter) runs the inherited torch `spectral` math, which computes the
    same function; `kernel_calls` / `fallback_calls` count which path ran.
    """

    def __init__(self, config, key_compressor, value_compressor):
        super().__init__(config, key_compressor, value_compressor)
        self.kernel_calls = 0
        self.fallback_calls = 0
        # The kernel reads int8 coefficients with per-component scales and a stored basis.
        self._int8_svd = all(isinstance(c, LowRankCompressor) and c.bits == 8 for c in (key_compressor, value_compressor))

    def _kernel_ok(self, q, cold_k, exact_mask) -> bool:
        return (
            q.shape[2] == 1
            and _kernel_runs_on(q)
            and self._int8_svd
            and self.config.basis_dtype == "float16"
            # Static check only: inspecting the mask's values would sync the host and break a
            # torch.compile graph. SpectralLayer passes None whenever no exact token is masked.
            and exact_mask is None
        )

    def attend_counts(self, q, cold_k, cold_v, n_cold, exact_k, exact_v, n_exact, scaling):
        # The kernel takes the per-row counts directly (blocks past n_cold are never read).
        if not self._kernel_ok(q, cold_k, None) or not cold_k:
            return super().attend_counts(q, cold_k, cold_v, n_cold, exact_k, exact_v, n_exact, scaling)
        self.kernel_calls += 1
        return self._launch(q, cold_k, cold_v, n_cold, exact_k, exact_v, n_exact, scaling)

    def _launch(self, q, cold_k, cold_v, n_cold, exact_k, exact_v, n_exact, scaling):
        out = fused_decode(
            q[:, :, 0].contiguous(),
            cold_k["coeffs"], cold_k["scales"], cold_k["basis"],
            cold_v["coeffs"], cold_v["scales"], cold_v["basis"],
            n_cold.to(torch.int32),
            exact_k, exact_v,
            n_exact.to(torch.int32),
            scaling,
        )
        return out.unsqueeze(2)

    def attend(self, q, cold_k, cold_v, cold_valid, exact_k, exact_v, exact_mask, scaling):
        if not self._kernel_ok(q, cold_k, exact_mask):
            self.fallback_calls += 1
            return super().attend(q, cold_k, cold_v, cold_valid, exact_k, exact_v, exact_mask, scaling)
        self.kernel_calls += 1
        b, hq, _, d = q.shape
        h, te = exact_k.shape[1], exact_k.shape[2]
        dev = q.device
        if cold_k:
            nb = cold_k["coeffs"].shape[2]
            n_cold = cold_valid.sum(1) if cold_valid is not None else torch.full((b,), nb, device=dev)
        else:
            t, rk, rv = self.config.block_size, self.config.k_rank_keys, self.config.k_rank_values
            empty = lambda *s, dt: torch.empty(b, h, 0, *s, dtype=dt, device=dev)  # noqa: E731
            cold_k = {"coeffs": empty(t, rk, dt=torch.int8), "scales": empty(rk, dt=torch.float32), "basis": empty(rk, d, dt=torch.float16)}
            cold_v = {"coeffs": empty(t, rv, dt=torch.int8), "scales": empty(rv, dt=torch.float32), "basis": empty(rv, d, dt=torch.float16)}
            n_cold = torch.zeros(b, device=dev)
        return self._launch(q, cold_k, cold_v, n_cold, exact_k, exact_v, torch.full((b,), te, device=dev), scaling)
