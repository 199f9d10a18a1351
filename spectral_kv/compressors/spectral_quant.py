"""Learned-basis spectral quantization (``spectral_quant``): a per-row PCA basis, bits per segment.

Per batch row and KV head, `fit` learns an orthonormal basis ``B [D, D]`` (rows = components,
by decreasing energy: eigenvectors of ``XᵀX`` over the row's first compressed tokens). Every
block of that row is stored as codes of ``C = X Bᵀ`` in that shared basis, components cut into
segments of one width each (`spectral_kv.codes.CodeLayout`): the high-energy components get
many bits, the tail few or none (dropped, a trailing 0-bit segment). This is the original
design's idea (a few spectral components per block) with the bytes spent where they matter
(KVTC, arXiv 2511.01815; SVDq, arXiv 2502.15304): one basis per row instead of one per block,
and mixed-precision codes instead of uniform int8.

Stored parts of a block (the grouped layouts' shapes, so the fused kernel reads them):

* ``codes`` uint8 ``[N, layout.nbytes]`` (`CodeLayout.pack` of the kept components' codes);
* keys: ``scale`` / ``zero`` float16 ``[N, T/gk, Dk]``: per kept component over ``gk =
  min(quant_group, T)`` tokens (asymmetric min/max);
* values: ``scale`` / ``zero`` float16 ``[N, T, S]``: per token per kept segment (with
  ``value_stats="byte"``: uint8 scale code / int8 zero point, `spectral_kv.quant.quantize_groups`);
* unquantized (``bits=None``, no segments): ``coeffs`` float32 ``[N, T, r]``.

Shared per-row state (`shared_specs` / `fit`): ``basis`` ``[D, D]`` in ``basis_dtype``
(float16 by default: 2 D² bytes per row, head and role, counted as cold bytes).

The layout is static per layer and role (kernel constants): ``key_segments`` /
``value_segments`` give it explicitly (e.g. ``((16, 6), (16, 4), (32, 2))``; channels not listed
are dropped); otherwise ``coeff_bits`` / ``value_bits`` is one width for the first ``rank``
components. ``k_rank_keys`` / ``k_rank_values`` cap the kept components in both cases.
Widths must not increase along the components. Keys are post-RoPE (as the cache receives
them); a pre-RoPE variant would need the model's RoPE applied at attend time.

longer than ~350 lines because the compressor's three faces belong together: the static layout
(segments, rank cap, shares of head_dim), the per-row fit, and the codec with its factored view.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from ..codes import CodeLayout
from ..config import DTYPES, SpectralConfig
from ..quant import STATS_DTYPES, group_stats, quantize_groups
from .base import FactoredCompressor, check_value_stats, register_compressor

__all__ = ["SpectralQuantCompressor", "pca_basis", "check_segments"]


def pca_basis(x: torch.Tensor) -> torch.Tensor:
    """Orthonormal basis of decreasing energy.

    Parameters
    ----------
    x : Tensor float32 [..., L, D]
        Tokens of one row and head.

    Returns
    -------
    basis : Tensor float32 [..., D, D]
        Rows are the eigenvectors of ``xᵀx`` (uncentered: a dropped component loses its mean
        too, so energy, not variance, is what ranks them), largest eigenvalue first, each
        signed so its largest entry is positive (deterministic).
    """
    xd = x.double()
    gram = xd.transpose(-1, -2) @ xd
    _, vecs = torch.linalg.eigh(gram)  # ascending eigenvalues, vectors in columns
    b = vecs.flip(-1).transpose(-1, -2)  # [..., D, D], rows by decreasing energy
    idx = b.abs().argmax(dim=-1, keepdim=True)
    b = b * torch.sign(torch.gather(b, -1, idx)).clamp(min=0).mul(2).sub(1)
    return b.float()


def resolve_segments(name: str, segments, head_dim: int) -> tuple[tuple[int, int], ...]:
    """``segments`` with fractional channel counts (a float in (0, 1]: that share of ``head_dim``,
    so one preset serves head_dim 64 and 128 alike) turned into channels; ``ValueError`` naming
    ``name`` when a share is not a whole number of channels."""
    out = []
    for c, b in segments:
        if isinstance(c, float):
            n = c * head_dim
            if abs(n - round(n)) > 1e-9 or round(n) <= 0:
                raise ValueError(f"{name}={segments!r}: {c} of head_dim={head_dim} is not a whole number of channels")
            c = int(round(n))
        out.append((c, b))
    return tuple(out)


def check_segments(name: str, segments) -> None:
    """Raise ``ValueError`` naming ``name`` unless ``segments`` is ``((channels, bits 0..8), ...)``
    with non-increasing widths (so the 0-bit, dropped segments are trailing); ``channels`` is a
    positive int or a share of head_dim in (0, 1] (`resolve_segments`)."""
    if not isinstance(segments, (tuple, list)) or not segments:
        raise ValueError(f"{name} must be a non-empty tuple of (channels, bits) pairs, got {segments!r}")
    prev = 8
    for seg in segments:
        if not isinstance(seg, (tuple, list)) or len(seg) != 2:
            raise ValueError(f"{name}={segments!r}: every entry must be a (channels, bits) pair, got {seg!r}")
        c, b = seg
        share = isinstance(c, float) and 0 < c <= 1
        if not share and (isinstance(c, bool) or not isinstance(c, int) or c <= 0):
            raise ValueError(f"{name}={segments!r}: channels must be positive ints or shares of head_dim in (0, 1], "
                             f"got {c!r}")
        if isinstance(b, bool) or not isinstance(b, int) or not 0 <= b <= 8:
            raise ValueError(f"{name}={segments!r}: bits must be ints in 0..8, got {b!r}")
        if b > prev:
            raise ValueError(f"{name}={segments!r}: widths must not increase along the components")
        prev = b


@register_compressor("spectral_quant")
class SpectralQuantCompressor(FactoredCompressor):
    """Codes in a per-row learned PCA basis, one width per segment (see the module docstring)."""

    supported_bits: ClassVar[tuple] = (1, 2, 3, 4, 5, 6, 7, 8, None)
    config_fields: ClassVar[tuple] = ("rank", "bits", "segments", "quant_group", "basis_dtype", "value_stats")

    def __init__(self, config: SpectralConfig, role: str, rank: int | None) -> None:
        super().__init__(config, role, rank)
        self.group = config.quant_group
        self.stats = config.value_stats if role == "values" else "fp16"  # keys: always float16
        self._layouts: dict[int, CodeLayout | None] = {}

    # ------------------------------------------------------------------ config
    @classmethod
    def reads(cls, config: SpectralConfig, role: str) -> frozenset[str]:
        fields = set(super().reads(config, role))
        if config.segments(role) is not None:  # explicit segments carry the widths
            fields -= {"coeff_bits", "value_bits"} if role == "values" else {"coeff_bits"}
            if role == "values" and config.value_bits == "same":
                fields.discard("value_bits")
        return frozenset(fields)

    @classmethod
    def check_config(cls, config: SpectralConfig, role: str) -> None:
        segs = config.segments(role)
        name = f"{'key' if role == 'keys' else 'value'}_segments"
        if segs is None:
            super().check_config(config, role)
            bits = config.bits(role)
            if bits is not None:
                CodeLayout(config.block_size, ((1, bits),))  # block_size must fill whole bytes
        else:
            check_segments(name, segs)
            for _, b in segs:  # block_size must fill whole bytes in every plane
                if b:
                    CodeLayout(config.block_size, ((1, b),))
        check_value_stats(config, role, config.bits(role) if segs is None else 0)
        if role == "keys":
            g = min(config.quant_group, config.block_size)
            if config.block_size % g:
                raise ValueError(f"block_size={config.block_size} is not a multiple of quant_group={config.quant_group}")

    @classmethod
    def check_head_dim(cls, config: SpectralConfig, role: str, head_dim: int) -> None:
        rname = "k_rank_keys" if role == "keys" else "k_rank_values"
        rank = config.rank(role)
        if rank is not None and rank > head_dim:
            raise ValueError(f"{rname}={rank} exceeds the model's head_dim={head_dim}")
        segs = config.segments(role)
        name = f"{'key' if role == 'keys' else 'value'}_segments"
        if segs is not None and sum(c for c, _ in resolve_segments(name, segs, head_dim)) > head_dim:
            n = sum(c for c, _ in resolve_segments(name, segs, head_dim))
            raise ValueError(f"{name}={segs!r} lists {n} channels, more than head_dim={head_dim}")

    @classmethod
    def describe(cls, config: SpectralConfig, role: str) -> str:
        segs = config.segments(role)
        rank = config.rank(role)
        cap = "" if rank is None else f" r{rank}"
        stats = " byte stats" if role == "values" and config.value_stats != "fp16" else ""
        if segs is not None:
            return f"spectral_quant{cap} " + "+".join(f"{c}x{b}b" for c, b in segs) + stats
        bits = config.bits(role)
        return f"spectral_quant{cap} {'fp' if bits is None else f'int{bits}'}{stats}"

    # ------------------------------------------------------------------ layout
    def layout(self, head_dim: int) -> CodeLayout | None:
        """The static `CodeLayout` of one block (``None``: unquantized coefficients)."""
        if head_dim not in self._layouts:
            self._layouts[head_dim] = self._make_layout(head_dim)
        return self._layouts[head_dim]

    def kept(self, head_dim: int) -> int:
        """Components stored per token (a prefix of the basis)."""
        layout = self.layout(head_dim)
        return min(self.rank or head_dim, head_dim) if layout is None else layout.kept

    def _make_layout(self, head_dim: int) -> CodeLayout | None:
        self.check_head_dim(self.config, self.role, head_dim)
        cap = min(self.rank or head_dim, head_dim)
        segs = self.config.segments(self.role)
        if segs is not None:
            segs = resolve_segments(f"{'key' if self.role == 'keys' else 'value'}_segments", segs, head_dim)
        if segs is None:
            if self.bits is None:
                return None
            g = min(self.group, cap)
            if self.role == "keys" or cap % g:  # key scales are per channel: segments do not matter
                segs = ((cap, self.bits),)
            else:
                segs = ((g, self.bits),) * (cap // g)
        out, at = [], 0
        for c, b in segs:  # apply the rank cap: channels past it get 0 bits
            keep = max(0, min(c, cap - at))
            if keep:
                out.append((keep, b))
            if c - keep:
                out.append((c - keep, 0))
            at += c
        if at < head_dim:
            out.append((head_dim - at, 0))
        if not any(b for _, b in out):
            raise ValueError(f"{self.role}: the layout {tuple(out)} keeps no component")
        return CodeLayout(self.config.block_size, tuple(out))

    # ------------------------------------------------------------------ what the fused kernel reads
    def code_layout(self, head_dim: int, tokens: int | None = None) -> CodeLayout:
        """The `CodeLayout` of a block (`spectral_kv.attention.quant_fused`); quantized layouts only."""
        layout = self.layout(head_dim)
        if layout is None or (tokens is not None and tokens != layout.tokens):
            raise ValueError(f"spectral_quant {self.role}: no code layout for {tokens} tokens at bits={self.bits}")
        return layout

    def rotation_on(self, d: int, device: torch.device) -> None:
        """None: the basis is per row (the shared state), handed to the kernel glue by the strategy."""
        return None

    # ------------------------------------------------------------------ shared state
    def shared_specs(self, head_dim: int) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """``basis`` ``[D, D]`` in ``basis_dtype`` per row and head."""
        return {"basis": ((head_dim, head_dim), DTYPES[self.config.basis_dtype])}

    def fit(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Learn each row's basis from its tokens.

        Parameters
        ----------
        x : Tensor float32 [P, H, L, D]
            The ``L`` tokens (whole blocks, sinks excluded) row ``p`` compresses first.

        Returns
        -------
        dict
            ``basis``: ``[P, H, D, D]`` in ``basis_dtype`` (rows: components by decreasing energy).
        """
        if x.dim() != 4:
            raise ValueError(f"fit expects [P, H, L, D] tokens, got shape {tuple(x.shape)}")
        if not torch.isfinite(x).all():
            raise ValueError("fit: non-finite values in the tokens a basis is learned from")
        return {"basis": pca_basis(x.float()).to(DTYPES[self.config.basis_dtype])}

    def part_specs(self, head_dim: int) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """Per-block parts, computed from the layout (no probe block: compress needs a basis)."""
        t = self.config.block_size
        layout = self.layout(head_dim)
        if layout is None:
            return {"coeffs": ((t, self.kept(head_dim)), torch.float32)}
        stats = (t // min(self.group, t), layout.kept) if self.role == "keys" else (t, len(layout.kept_segments))
        scale_dtype, zero_dtype = STATS_DTYPES[self.stats]
        return {"codes": ((layout.nbytes,), torch.uint8), "scale": (stats, scale_dtype), "zero": (stats, zero_dtype)}

    @staticmethod
    def _basis_rows(shared, lead: tuple[int, ...], kept: int) -> torch.Tensor:
        """The first ``kept`` basis rows float32, broadcast to the parts' leading dims ``lead``
        (shared tensors either gathered per block, ``[*lead, D, D]``, or per row, ``[*lead[:-1], D, D]``)."""
        if shared is None or "basis" not in shared:
            raise ValueError("spectral_quant needs the row's fitted basis: pass shared={'basis': ...} (from fit)")
        b = shared["basis"].float()[..., :kept, :]
        if b.dim() - 2 == len(lead) - 1:
            b = b.unsqueeze(-3)
        if b.dim() - 2 != len(lead):
            raise ValueError(f"shared basis of shape {tuple(shared['basis'].shape)} does not match parts led by {lead}")
        return b.expand(*lead, *b.shape[-2:])

    # ------------------------------------------------------------------ codec
    def compress(self, x: torch.Tensor, shared: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """``x`` float32 ``[N, T, D]`` and each block's row basis ``shared['basis'] [N, D, D]`` -> parts."""
        n, t, d = x.shape
        kept = self.kept(d)
        c = x.float() @ self._basis_rows(shared, (n,), kept).transpose(-1, -2)  # [N, T, kept]
        layout = self.layout(d)
        if layout is None:
            return {"coeffs": c}
        codes, scales, zeros, c0 = [], [], [], 0
        for ch, bits in layout.kept_segments:
            seg = c[..., c0 : c0 + ch]
            if self.role == "keys":
                g = min(self.group, t)
                if t % g:
                    raise ValueError(f"spectral_quant keys: a block of {t} tokens is not a multiple of quant_group={g}")
                q, s, z = quantize_groups(seg.reshape(n, t // g, g, ch), bits, dim=2)
                codes.append(q.reshape(n, t, ch))
                scales.append(s.squeeze(2))
                zeros.append(z.squeeze(2))
            else:
                q, s, z = quantize_groups(seg, bits, dim=-1, stats=self.stats)  # one scale per token per segment
                codes.append(q)
                scales.append(s)
                zeros.append(z)
            c0 += ch
        return {"codes": layout.pack(torch.cat(codes, -1)), "scale": torch.cat(scales, -1), "zero": torch.cat(zeros, -1)}

    def _head_dim(self, shared) -> int:
        if shared is None or "basis" not in shared:
            raise ValueError("spectral_quant needs the row's fitted basis: pass shared={'basis': ...} (from fit)")
        return shared["basis"].shape[-1]

    def coefficients(self, parts: dict[str, torch.Tensor], shared=None) -> torch.Tensor:
        """Dequantized coefficients float32 ``[..., T, kept]`` in the row's basis."""
        if "coeffs" in parts:
            return parts["coeffs"].float()
        layout = self.layout(self._head_dim(shared))
        codes = layout.unpack(parts["codes"]).float()  # [..., T, kept]
        scale, zero = group_stats(parts["scale"], parts["zero"])  # float16, or the byte form
        *lead, t, kept = codes.shape
        if self.role == "keys":
            g = t // scale.shape[-2]
            x = codes.reshape(*lead, t // g, g, kept) * scale.unsqueeze(-2) + zero.unsqueeze(-2)
            return x.reshape(*lead, t, kept)
        widths = torch.tensor([ch for ch, _ in layout.kept_segments], device=codes.device)
        s = scale.repeat_interleave(widths, dim=-1)  # [..., T, kept]
        z = zero.repeat_interleave(widths, dim=-1)
        return codes * s + z

    def basis(self, parts: dict[str, torch.Tensor], shared=None) -> torch.Tensor:
        """Every block's basis ``[..., kept, D]`` float32 (a broadcast view of its row's)."""
        ref = parts["coeffs"] if "coeffs" in parts else parts["codes"]
        lead = tuple(ref.shape[:-2]) if "coeffs" in parts else tuple(ref.shape[:-1])
        return self._basis_rows(shared, lead, self.kept(self._head_dim(shared)))

    def shared_basis(self, parts: dict[str, torch.Tensor], shared=None) -> torch.Tensor | None:
        """The rows' bases ``[*row dims, kept, D]`` float32 (shared by all blocks of a row)."""
        if shared is None:
            return None
        return shared["basis"].float()[..., : self.kept(self._head_dim(shared)), :]

    def decompress(self, parts: dict[str, torch.Tensor], dtype: torch.dtype, shared=None) -> torch.Tensor:
        return (self.coefficients(parts, shared) @ self.basis(parts, shared)).to(dtype)

    # ------------------------------------------------------------------ tuning
    def measure_distortion(self, x: torch.Tensor, shared, unit: int = 16, max_bits: int = 8) -> list[list[float]]:
        """Measured squared error of every ``unit``-channel slice of components at every width.

        Parameters
        ----------
        x : Tensor float32 [N, T, D]
        shared : dict with ``basis`` [N, D, D]

        Returns
        -------
        dist : [D / unit][max_bits + 1] floats
            ``dist[u][b]``: summed squared error of components ``u*unit .. (u+1)*unit`` at
            ``b`` bits (``b = 0``: their energy), each slice quantized as one segment;
            `spectral_kv.allocate.allocate`'s input.
        """
        n, t, d = x.shape
        if d % unit:
            raise ValueError(f"head_dim={d} is not a multiple of unit={unit}")
        c = x.float() @ self._basis_rows(shared, (n,), d).transpose(-1, -2)
        out = []
        for u in range(d // unit):
            seg = c[..., u * unit : (u + 1) * unit]
            row = [float((seg.double() ** 2).sum())]
            for bits in range(1, max_bits + 1):
                if self.role == "keys":
                    g = min(self.group, t)
                    grouped = seg.reshape(n, t // g, g, unit)
                    q, s, z = quantize_groups(grouped, bits, dim=2)
                    err = (q.float() * s.float() + z.float() - grouped).double()
                else:
                    q, s, z = quantize_groups(seg, bits, dim=-1, stats=self.stats)
                    s, z = group_stats(s, z)
                    err = (q.float() * s + z - seg).double()
                row.append(float((err**2).sum()))
            out.append(row)
        return out
