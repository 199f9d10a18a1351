"""`fused`: decode steps on a Triton kernel that reads the compressed bytes once (GPU decode path).

Two kernels, chosen by the layout the compressors declare:

* ``svd``: per-block SVD layouts with int8 coefficients and an fp16 basis (``fast``,
  ``original``): `spectral_kv.kernels.fused_decode` over `LowRankCompressor.kernel_operands`;
* ``quant``: codes in one shared orthonormal basis with per-segment widths (``hadamard``,
  ``kivi*``, the learned ``spectral_quant``): `spectral_kv.attention.quant_fused.quant_fused_decode`
  (`spectral_kv.kernels.quant_decode`, which rotates the query and maps the output back itself).

`layout_kernel` says which (or None). A decode step the kernel cannot take (several queries,
padded rows whose exact tokens are not a prefix, a CPU tensor without Triton's interpreter, a
layout with no kernel) runs the inherited torch `spectral` math, the same function, and is
counted in ``fallback_calls``; a layout with no kernel is also reported once, at construction.
"""

from __future__ import annotations

import os
import warnings

import torch

from ..compressors.base import LowRankCompressor
from ..kernels.fused_decode import HAS_TRITON, fused_decode
from .base import register_attention
from .quant_fused import quant_fused_decode, serves_quant_fused
from .spectral import SpectralAttention

__all__ = ["FusedAttention", "layout_kernel", "default_decode_attention"]

_REPORTED: set = set()


def _kernel_runs_on(t: torch.Tensor) -> bool:
    # CPU tensors only under triton's interpreter (how CI tests this path).
    return HAS_TRITON and (t.is_cuda or os.environ.get("TRITON_INTERPRET") == "1")


def layout_kernel(config, key_compressor, value_compressor) -> str | None:
    """``"svd"``, ``"quant"`` or None: the fused kernel that reads these compressors' blocks."""
    comps = (key_compressor, value_compressor)
    if all(isinstance(c, LowRankCompressor) and c.bits == 8 for c in comps) and config.basis_dtype == "float16":
        return "svd"
    if serves_quant_fused(*comps):
        return "quant"
    return None


def default_decode_attention(config, key_compressor, value_compressor, device: torch.device) -> str:
    """The strategy ``attention=None`` means on ``device``: ``"fused"`` on CUDA (Triton importable)
    for a layout with a kernel, else ``"spectral"``; a CUDA layout without one is reported once."""
    if device.type != "cuda" or not config.use_spectral_attention:
        return config.attention_name
    kernel = layout_kernel(config, key_compressor, value_compressor) if HAS_TRITON else None
    if kernel is not None:
        return "fused"
    label = ("default", key_compressor.describe(config, "keys"), value_compressor.describe(config, "values"))
    if label not in _REPORTED:
        _REPORTED.add(label)
        why = "triton does not import" if not HAS_TRITON else "no fused kernel reads this layout"
        warnings.warn(f"spectral_kv: keys {label[1]} / values {label[2]} decode with the torch 'spectral' strategy on "
                      f"CUDA ({why})", RuntimeWarning, stacklevel=3)
    return config.attention_name


def _squeeze_blocks(basis: torch.Tensor | None) -> torch.Tensor | None:
    # A per-row basis comes as [B, H, 1, r, D] (the block axis broadcast); the kernel glue takes [B, H, r, D].
    return basis.squeeze(2) if basis is not None and basis.dim() == 5 else basis


@register_attention("fused")
class FusedAttention(SpectralAttention):
    """`spectral` with decode steps (``Tq == 1``) on the fused kernel of the layout (see the module).

    ``kernel_calls`` / ``fallback_calls`` count which path each decode step took.
    """

    def __init__(self, config, key_compressor, value_compressor):
        super().__init__(config, key_compressor, value_compressor)
        self.kernel_calls = 0
        self.fallback_calls = 0
        self.kernel = layout_kernel(config, key_compressor, value_compressor)
        self._specs: dict = {}
        if self.kernel is None:
            label = (key_compressor.describe(config, "keys"), value_compressor.describe(config, "values"))
            if label not in _REPORTED:
                _REPORTED.add(label)
                warnings.warn(
                    f"attention='fused': no fused kernel reads the layout keys {label[0]} / values {label[1]} "
                    "(the kernels read int8 SVD coefficients with an fp16 basis, or quantized codes in a shared "
                    "basis); its decode steps run the torch 'spectral' math (counted in fallback_calls)",
                    RuntimeWarning, stacklevel=3,
                )

    def _kernel_ok(self, q, view) -> bool:
        return (
            self.kernel is not None
            and q.shape[2] == 1
            and _kernel_runs_on(q)
            # Static check only (no host sync, no graph break): static views carry counts, and
            # a dynamic view leaves exact_mask None whenever no exact token is masked.
            and view.exact_prefix
        )

    def attend(self, q, view, scaling):
        # Not counted while torch.compile traces (`StaticDecoder(compile=True)`): Dynamo would guard
        # on the count and recompile every step; the driver's first, plain step is counted.
        counting = not torch.compiler.is_compiling()
        if not self._kernel_ok(q, view):
            if counting:
                self.fallback_calls += 1
            return super().attend(q, view, scaling)
        if counting:
            self.kernel_calls += 1
        n_cold, n_exact = view.counts()  # blocks past n_cold / tokens past n_exact are never read
        b, h, d, dev = q.shape[0], view.exact_k.shape[1], q.shape[3], q.device
        if self.kernel == "svd":
            # The compressors hand over their parts as the kernel's operands (no part names here).
            k_ops = self.key_compressor.kernel_operands(view.cold_k, b, h, d, dev)
            v_ops = self.value_compressor.kernel_operands(view.cold_v, b, h, d, dev)
            out = fused_decode(q[:, :, 0].contiguous(), *k_ops, *v_ops, n_cold, view.exact_k, view.exact_v, n_exact,
                               scaling)
            return out.unsqueeze(2)
        cold_k = view.cold_k or self._empty_pool(self.key_compressor, b, h, d, dev)
        cold_v = view.cold_v or self._empty_pool(self.value_compressor, b, h, d, dev)
        shared_k = view.shared_for_blocks("k")
        shared_v = view.shared_for_blocks("v")
        # Stateless layouts (hadamard, kivi) keep their rotation in the compressor: None lets
        # the glue read it; a learned per-row basis comes from the shared state.
        rk = _squeeze_blocks(self.key_compressor.shared_basis(cold_k, shared_k)) if shared_k else None
        rv = _squeeze_blocks(self.value_compressor.shared_basis(cold_v, shared_v)) if shared_v else None
        return quant_fused_decode(q, self.key_compressor, self.value_compressor, cold_k, cold_v, n_cold,
                                  view.exact_k.to(q.dtype), view.exact_v.to(q.dtype), n_exact, scaling,
                                  shared_k=rk, shared_v=rv, cold_blocks=view.cold_in_use or 0)

    def _empty_pool(self, comp, b, h, d, dev):
        """NB = 0 parts of the shapes ``comp`` stores (the kernel reads no block of them)."""
        key = (id(comp), d)
        if key not in self._specs:  # part_specs compresses a probe block: once per layout, not per step
            self._specs[key] = comp.part_specs(d)
        return {name: torch.empty(b, h, 0, *shape, dtype=dtype, device=dev)
                for name, (shape, dtype) in self._specs[key].items()}
