"""The `Compressor` plug point: turns a block of keys or values into a few small tensors."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import torch

from ..config import DTYPES, LAYOUT_FIELDS, SpectralConfig
from ..quant import dequantize, quantize
from ..registry import COMPRESSORS

__all__ = ["Compressor", "FactoredCompressor", "LowRankCompressor", "COMPRESSORS", "register_compressor", "check_value_stats"]


def register_compressor(name: str):
    """Class decorator: make a `Compressor` selectable as ``SpectralConfig(compressor=name)``."""
    return COMPRESSORS.register(name)


def check_value_stats(config: SpectralConfig, role: str, bits: int | None) -> None:
    """Raise ``ValueError`` if ``value_stats`` is set for values stored without statistics
    (``bits`` None: unquantized coefficients), naming the field and the compressor."""
    if role == "values" and config.value_stats != "fp16" and bits is None:
        raise ValueError(f"value_stats={config.value_stats!r} has no effect: the values compressor "
                         f"{config.compressor_name('values')!r} stores them unquantized (value_bits=None)")


class Compressor(ABC):
    """Compresses blocks of one role (``"keys"`` or ``"values"``) of one layer.

    Subclasses implement :meth:`compress` and :meth:`decompress`. Every tensor that
    ``compress`` returns must have the block batch ``N`` as its leading dim: the cold tier
    stores them in pools of shape ``[batch, kv_heads, n_blocks, *rest]`` and accounts their
    bytes exactly.

    Shared per-row state (optional): a compressor that learns something from a sequence (a
    basis, a mean) declares it in :meth:`shared_specs` and computes it in :meth:`fit`. The
    tier manager calls ``fit`` once per batch row, at that row's first compression, with all
    the blocks that row compresses in that call, stores the result per row (``[B, H, ...]``,
    counted as cold bytes, saved, reordered with the rows) and passes it back as ``shared``
    to every later call: ``compress(x [N, T, D], shared)`` gets ``[N, ...]`` (each block its
    row's state); ``decompress`` / ``coefficients`` / ``basis`` / ``shared_basis`` get
    tensors with the parts' leading dims where the block axis may be 1 (broadcast), e.g.
    parts ``[B, H, NB, ...]`` with shared ``[B, H, 1, ...]``. Stateless compressors (the
    default: ``shared_specs`` is empty) get ``shared=None`` or no argument, and ignore it.

    Class attributes a compressor declares: ``factored`` (its blocks are ``coefficients @
    basis``, so attention can run in the compressed space), ``low_rank`` (it keeps fewer
    components than head_dim), ``supported_bits``.

    Parameters
    ----------
    config : SpectralConfig
    role : {"keys", "values"}
    rank : int
        The rank (or any size knob) for this role, from the config.
    """

    name: ClassVar[str]
    factored: ClassVar[bool] = False
    low_rank: ClassVar[bool] = False
    # Coefficient bit widths this compressor accepts (``None`` = unquantized); empty = it
    # ignores the config's bits (e.g. KIVI, whose width is in its name).
    supported_bits: ClassVar[tuple] = ()
    # The role-dependent `SpectralConfig` fields this compressor reads, by generic name:
    # "rank" (k_rank_keys / k_rank_values), "bits" (coeff_bits / value_bits), "segments"
    # (key_segments / value_segments), "value_stats" (values only), or a field's own name. A field no role's compressor
    # reads must keep its default (SpectralConfig raises otherwise: nothing is silently ignored).
    # ``None`` (a compressor that declares nothing, e.g. an older plug-in): treated as reading all.
    config_fields: ClassVar[tuple | None] = None

    def __init__(self, config: SpectralConfig, role: str, rank: int) -> None:
        self.config = config
        self.role = role
        self.rank = rank
        self.bits = self.effective_bits(config, role)

    def part_specs(self, head_dim: int) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """Names, per-block shapes and dtypes of the parts :meth:`compress` stores for one block
        of ``block_size`` tokens (found by compressing a seeded random block on the CPU)."""
        probe = torch.randn(1, self.config.block_size, head_dim, generator=torch.Generator().manual_seed(0))
        shared = None
        if self.shared_specs(head_dim):
            shared = {n: t.reshape(1, *t.shape[2:]) for n, t in self.fit(probe[None]).items()}
        parts = self.compress(probe, shared) if shared else self.compress(probe)
        return {name: (tuple(t.shape[1:]), t.dtype) for name, t in parts.items()}

    def shared_specs(self, head_dim: int) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """Names, per-(row, KV head) shapes and dtypes of the shared state `fit` returns
        (default: none, a stateless compressor)."""
        return {}

    def fit(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Shared state from a row's first blocks: ``x`` float32 ``[P, H, L, D]`` (``P`` rows,
        ``L`` = blocks x block_size tokens, sinks excluded) -> dict of ``[P, H, *shape]``
        (`shared_specs`). Only called when `shared_specs` is not empty."""
        raise NotImplementedError(f"{type(self).__name__} declares shared state but does not implement fit()")

    @classmethod
    def effective_bits(cls, config: SpectralConfig, role: str) -> int | None:
        """Coefficient bits this compressor stores for ``role`` (``None``: unquantized)."""
        return config.bits(role)

    @classmethod
    def describe(cls, config: SpectralConfig, role: str) -> str:
        """Short label for one-line summaries, e.g. ``hadamard int4``."""
        bits = cls.effective_bits(config, role)
        return f"{config.compressor_name(role)} {'fp' if bits is None else f'int{bits}'}"

    @classmethod
    def check_head_dim(cls, config: SpectralConfig, role: str, head_dim: int) -> None:
        """Raise ``ValueError`` if heads of ``head_dim`` channels cannot be stored for ``role``."""

    @classmethod
    def reads(cls, config: SpectralConfig, role: str) -> frozenset[str]:
        """The `SpectralConfig` field names this compressor reads for ``role`` (from `config_fields`)."""
        if cls.config_fields is None:
            return frozenset(LAYOUT_FIELDS)
        out = set()
        for f in cls.config_fields:
            if f == "rank":
                out.add("k_rank_keys" if role == "keys" else "k_rank_values")
            elif f == "segments":
                out.add("key_segments" if role == "keys" else "value_segments")
            elif f == "value_stats":  # the values' statistics: read by the values' compressor only
                if role == "values":
                    out.add(f)
            elif f == "bits":
                if role == "keys" or config.value_bits == "same":
                    out.add("coeff_bits")
                if role == "values":
                    out.add("value_bits")
            else:
                out.add(f)
        return frozenset(out)

    @classmethod
    def check_config(cls, config: SpectralConfig, role: str) -> None:
        """Raise ``ValueError`` if ``config`` asks ``role`` for something this compressor can't do."""
        bits = config.bits(role)
        if cls.supported_bits and bits not in cls.supported_bits:
            field = "coeff_bits" if role == "keys" or config.value_bits == "same" else "value_bits"
            raise ValueError(
                f"{field}={bits!r} is not supported by compressor {config.compressor_name(role)!r} "
                f"({role}); choose one of {list(cls.supported_bits)}"
            )

    @abstractmethod
    def compress(self, x: torch.Tensor, shared: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """Compress ``x``: float32 ``[N, T, D]`` -> named tensors with leading dim ``N``
        (``shared``: each block's row state, ``[N, ...]``, for stateful compressors)."""

    @abstractmethod
    def decompress(self, parts: dict[str, torch.Tensor], dtype: torch.dtype,
                   shared: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """Rebuild ``[..., T, D]`` in ``dtype`` from tensors with any leading dims."""


class FactoredCompressor(Compressor):
    """A compressor whose blocks are ``coefficients @ basis``, so attention can run in the
    compressed space (the ``spectral`` strategy): scores ``(q @ basisᵀ) @ coefficientsᵀ``,
    outputs ``(p @ coefficients) @ basis``."""

    factored: ClassVar[bool] = True

    @abstractmethod
    def coefficients(self, parts: dict[str, torch.Tensor], shared: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """Dequantized coefficients, float32 ``[..., T, r]``."""

    @abstractmethod
    def basis(self, parts: dict[str, torch.Tensor], shared: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """The basis ``[..., r, D]`` (float32; may be an expanded view of a shared matrix)."""

    def shared_basis(self, parts: dict[str, torch.Tensor], shared: dict[str, torch.Tensor] | None = None) -> torch.Tensor | None:
        """The basis if every block of a row shares it, else ``None`` (the default): ``[r, D]``
        float32 when one matrix serves all rows, or the parts' leading dims with a block axis
        of 1 (``[B, H, 1, r, D]`` for parts ``[B, H, NB, ...]``) for a per-row basis.

        A shared basis lets attention apply it once per step (``q @ basisᵀ``, and the value
        output's ``@ basis`` after summing over blocks) instead of once per block.
        """
        return None

    def decompress(self, parts: dict[str, torch.Tensor], dtype: torch.dtype,
                   shared: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        return (self.coefficients(parts, shared) @ self.basis(parts, shared)).to(dtype)


class LowRankCompressor(FactoredCompressor):
    """A block as ``coeffs @ basis``: coefficients quantized per component, basis in ``basis_dtype``.

    Stored parts: ``coeffs`` (int8 ``[N, T, r]``, or uint8 ``[N, T, r/2]`` for 4 bits, or
    unquantized float32 when the role's bits are None), ``scales`` float32 ``[N, r]`` (absent
    when unquantized) and ``basis`` ``[N, r, D]`` with orthonormal rows, so the singular
    values live in the coefficients and one scale per component fits them.
    Subclasses implement :meth:`factorize`.
    """

    low_rank: ClassVar[bool] = True
    supported_bits: ClassVar[tuple] = (8, 4, None)
    config_fields: ClassVar[tuple] = ("rank", "bits", "basis_dtype")

    @classmethod
    def check_config(cls, config: SpectralConfig, role: str) -> None:
        super().check_config(config, role)
        name = "k_rank_keys" if role == "keys" else "k_rank_values"
        if config.rank(role) is None:
            raise ValueError(f"{name} must be set for compressor {config.compressor_name(role)!r} ({role}): its rank")
        if config.rank(role) > config.block_size:
            raise ValueError(f"{name}={config.rank(role)} exceeds block_size={config.block_size}")
        if config.bits(role) == 4 and config.rank(role) % 2:
            raise ValueError(f"{name}={config.rank(role)} must be even with 4-bit coefficients (two per byte)")

    @classmethod
    def check_head_dim(cls, config: SpectralConfig, role: str, head_dim: int) -> None:
        if config.rank(role) > head_dim:
            name = "k_rank_keys" if role == "keys" else "k_rank_values"
            raise ValueError(f"{name}={config.rank(role)} exceeds the model's head_dim={head_dim}")

    @classmethod
    def describe(cls, config: SpectralConfig, role: str) -> str:
        name, _, bits = super().describe(config, role).rpartition(" ")
        return f"{name} r{config.rank(role)} {bits}"

    @abstractmethod
    def factorize(self, x: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``x`` float32 ``[N, T, D]`` -> (``coeffs`` ``[N, T, r] = U S``, ``basis`` ``[N, r, D] = Vᵀ``)."""

    def compress(self, x: torch.Tensor, shared: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        coeffs, basis = self.factorize(x, self.rank)
        basis = basis.to(DTYPES[self.config.basis_dtype])
        if self.bits is None:
            return {"coeffs": coeffs.float(), "basis": basis}
        codes, scales = quantize(coeffs, self.bits)
        return {"coeffs": codes, "scales": scales, "basis": basis}

    def coefficients(self, parts: dict[str, torch.Tensor], shared: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """Dequantized coefficients, float32 ``[..., T, r]``."""
        if self.bits is None:
            return parts["coeffs"].float()
        return dequantize(parts["coeffs"], parts["scales"], self.bits)

    def basis(self, parts: dict[str, torch.Tensor], shared: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        return parts["basis"].float()

    def kernel_operands(self, parts: dict[str, torch.Tensor], batch: int, heads: int, head_dim: int,
                        device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """What the fused SVD decode kernel reads (`kernels.fused_decode`): ``(codes int8
        [B, H, NB, T, r], scales float32 [B, H, NB, r], basis [B, H, NB, r, D])``; with no cold
        block (``parts`` empty), empty ``NB = 0`` tensors of those shapes."""
        if not parts:
            t = self.config.block_size
            empty = lambda *s, dt: torch.empty(batch, heads, 0, *s, dtype=dt, device=device)  # noqa: E731
            return empty(t, self.rank, dt=torch.int8), empty(self.rank, dt=torch.float32), empty(
                self.rank, head_dim, dt=DTYPES[self.config.basis_dtype])
        return parts["coeffs"], parts["scales"], parts["basis"]
