"""`fused`: the Triton decode kernel that reads the compressed bytes once (GPU decode path)."""

from __future__ import annotations

import os

import torch

from ..compressors.base import LowRankCompressor
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

    The kernel serves int8 coefficients with an fp16 basis and views whose validity is a
    per-row prefix (`AttendView.exact_prefix`: static storage, or a decode step of an unpadded
    batch), read as device counts (`AttendView.counts`).
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

    def _kernel_ok(self, q, view) -> bool:
        return (
            q.shape[2] == 1
            and _kernel_runs_on(q)
            and self._int8_svd
            and self.config.basis_dtype == "float16"
            # Static check only (no host sync, no graph break): static views carry counts, and
            # a dynamic view leaves exact_mask None whenever no exact token is masked.
            and view.exact_prefix
        )

    def attend(self, q, view, scaling):
        if not self._kernel_ok(q, view):
            self.fallback_calls += 1
            return super().attend(q, view, scaling)
        self.kernel_calls += 1
        b, d = q.shape[0], q.shape[3]
        h, dev = view.exact_k.shape[1], q.device
        n_cold, n_exact = view.counts()  # blocks past n_cold / tokens past n_exact are never read
        # The compressors hand over their parts as the kernel's operands (no part names here).
        k_ops = self.key_compressor.kernel_operands(view.cold_k, b, h, d, dev)
        v_ops = self.value_compressor.kernel_operands(view.cold_v, b, h, d, dev)
        out = fused_decode(q[:, :, 0].contiguous(), *k_ops, *v_ops, n_cold, view.exact_k, view.exact_v, n_exact, scaling)
        return out.unsqueeze(2)
