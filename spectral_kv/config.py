"""`SpectralConfig`: every knob of the spectral KV cache, validated once at construction."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from .layer_overrides import describe_layers, normalize_layer_overrides
from .registry import ATTENTION_STRATEGIES, COMPRESSORS

__all__ = ["SpectralConfig", "DTYPES", "LAYOUT_FIELDS", "OVERRIDABLE_FIELDS", "VALUE_STATS"]

# Fields whose meaning depends on the compressor: each must be read by a role's compressor
# (`Compressor.reads`) or keep its default.
LAYOUT_FIELDS = (
    "k_rank_keys", "k_rank_values", "coeff_bits", "value_bits", "quant_group", "basis_dtype", "seed",
    "rsvd_oversample", "rsvd_power_iters", "key_segments", "value_segments", "value_stats",
)
# What `layer_overrides` may change per layer: the cold layout only (`spectral_kv.layer_overrides`).
OVERRIDABLE_FIELDS = ("compressor", "value_compressor", *LAYOUT_FIELDS)
# Storage forms of the values' per-token statistics (`spectral_kv.quant.STATS_FORMS`; config
# imports nothing of the package, a test keeps the two equal).
VALUE_STATS = ("fp16", "byte")
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def _positive_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


@dataclass(frozen=True)
class SpectralConfig:
    """Configuration of the spectral KV cache.

    The first six fields and their defaults are the original design's; the compression
    defaults are the ``balanced`` preset (`spectral_kv.presets`): Hadamard-rotated grouped
    quantization, 4-bit keys and 3-bit values, which on the embedded SmolLM2 loses far less
    perplexity per byte saved than the original rank-16/32 SVD with int8 coefficients
    (``SpectralConfig.preset("original")``; numbers in the README). The rank fields apply to
    the SVD compressors. ``sink_tokens`` defaults to 4 rather than the original 0: the first
    tokens of a sequence receive a large share of attention in every layer ("attention sinks"), so the error of a
    low-rank approximation there is amplified; keeping them exact roughly halves the
    perplexity cost of the original defaults on the embedded SmolLM2 for 4 x 64 x 2 x 2
    bytes per head. ``sink_tokens=0`` reproduces the original design exactly.

    Parameters
    ----------
    block_size : int
        Tokens per cold block; the warm tier compresses one block when it holds this many.
    k_rank_keys, k_rank_values : int or None
        Rank of the low-rank factors of key / value blocks (``<= head_dim``, ``<= block_size``):
        required by the SVD compressors, a cap on the kept components for ``spectral_quant``,
        ``None`` (not set, the default) otherwise. The original design's 16 / 32 are in the
        ``original`` and ``fast`` presets.
    hot_buffer_size : int
        Newest tokens always kept exact (``< block_size``).
    use_spectral_attention : bool
        Attend in the compressed space (``"spectral"``) instead of materialising cold
        blocks (``"reconstruct"``). Ignored when ``attention`` is given.
    verbose : bool
        Print one confirmation line when patching and notices for layers kept exact.
    compressor : str
        Name in the compressor registry (``hadamard``, the default; ``exact_svd``,
        ``randomized_svd``, ``triton_rsvd``, ``kivi4``, ``kivi2``, or your own).
    attention : str or None
        Name in the attention-strategy registry; ``None`` derives it from
        ``use_spectral_attention``.
    coeff_bits : int or None
        Bits per quantized coefficient of keys (and of values unless ``value_bits`` says
        otherwise). SVD compressors take 8 or 4 (symmetric, one scale per component per
        block); ``hadamard`` takes 2, 3, 4 or 8 (asymmetric, grouped). ``None`` keeps
        coefficients unquantized (for lossless checks).
    value_compressor : str or None
        Compressor of the values; ``None`` uses ``compressor`` for both.
    value_bits : int, None or "same"
        Bits of the value coefficients (default 3); ``"same"`` follows ``coeff_bits``.
    quant_group : int
        Group size of grouped quantizers (``hadamard``): keys share a scale and zero point
        per channel over ``quant_group`` tokens, values per token over ``quant_group`` channels.
    sink_tokens : int
        First tokens of each sequence kept exact forever (0 = original design).
    basis_dtype : str
        Storage dtype of the bases: ``"float16"`` (design), ``"bfloat16"``, ``"float32"``.
    seed : int
        Seed of randomized compressors, so runs are reproducible.
    rsvd_oversample, rsvd_power_iters : int
        Randomized SVD's oversampling and power iterations.
    key_segments, value_segments : tuple of (channels, bits) pairs, or None
        ``spectral_quant`` only: the block layout of keys / values in the learned basis, one
        width 0..8 per segment of components (non-increasing; channels not listed are dropped),
        e.g. ``((16, 6), (16, 4), (32, 2))``. ``None``: one width (``coeff_bits`` /
        ``value_bits``) for every kept component.
    compress_lag : int
        Static (frozen) caches only (`SpectralCache.freeze`): ``0`` compresses a block on the
        decode step that fills it; ``n > 0`` compresses it in the background (a side CUDA
        stream on GPUs) and swaps it into the cold tier ``n`` steps later, its tokens served
        exactly meanwhile. Must be smaller than ``block_size``.
    value_stats : str
        Storage of the values' per-token statistics in the grouped layouts (``hadamard``,
        ``kivi*``, ``spectral_quant``; any other values compressor refuses a non-default):
        ``"fp16"`` (default) a float16 scale and zero per token and segment (4 bytes);
        ``"byte"`` a uint8 scale code (5 exponent and 3 mantissa bits, 2**-16..57344, the
        needed scale rounded up) and an int8 zero point, ``x ~= (code - zp) * scale`` (2 bytes;
        `spectral_kv.quant.quantize_groups`). At head_dim 64 and 3-bit values that is 2 of
        ~51 bytes a token costs at 5x. Every strategy reads both forms (the fused kernel
        decodes the byte form in its value loads).
    layer_overrides : mapping or None
        Per-layer cold layouts: ``{layers: {field: value}}``, ``layers`` an int, a ``range`` or
        a sequence of ints, the fields among `OVERRIDABLE_FIELDS` (the compressors and the
        layout fields; the tiers and the attention stay global). E.g.
        ``SpectralConfig.preset("max-compression", value_stats="byte", quant_group=256,
        hot_buffer_size=256, layer_overrides={(6, 7, 8, *range(15, 27)): dict(coeff_bits=4,
        value_bits=3)})``: 15 of SmolLM2's 30 layers at 4/3 bits, 5.02x cold. Stored in a
        canonical hashable form (`spectral_kv.layer_overrides`); `layer_config` gives one layer's
        config. Each distinct layout compiles its own fused-kernel variant on CUDA: keep to 2-3.
        Indices are checked against the model's layers when `SpectralCache` gets its config.
    compile : bool
        Run each layer's decode attention through ``torch.compile(fullgraph=True,
        dynamic=True)`` (`spectral_kv.attention.compiled.compile_attend`): two graphs per
        strategy (without / with cold blocks), no recompiles as the cache grows.
    """

    block_size: int = 512
    k_rank_keys: int | None = None
    k_rank_values: int | None = None
    hot_buffer_size: int = 64
    use_spectral_attention: bool = True
    verbose: bool = True
    compressor: str = "hadamard"
    attention: str | None = None
    coeff_bits: int | None = 4
    value_compressor: str | None = None
    value_bits: int | None | str = 3
    quant_group: int = 128
    sink_tokens: int = 4
    basis_dtype: str = "float16"
    seed: int = 0
    rsvd_oversample: int = 8
    rsvd_power_iters: int = 2
    compile: bool = False
    compress_lag: int = 0
    key_segments: tuple | None = None
    value_segments: tuple | None = None
    value_stats: str = "fp16"
    layer_overrides: tuple | None = None

    def __post_init__(self) -> None:
        for name in ("block_size", "k_rank_keys", "k_rank_values", "quant_group"):
            if getattr(self, name) is not None or name in ("block_size", "quant_group"):
                _positive_int(name, getattr(self, name))
        for name in ("key_segments", "value_segments"):  # lists (JSON, CLI) become hashable tuples
            if isinstance(getattr(self, name), list):
                object.__setattr__(self, name, tuple(tuple(s) if isinstance(s, list) else s for s in getattr(self, name)))
        for name in ("hot_buffer_size", "sink_tokens", "seed", "rsvd_oversample", "rsvd_power_iters", "compress_lag"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be a non-negative int, got {value!r}")
        if self.hot_buffer_size >= self.block_size:
            raise ValueError(
                f"hot_buffer_size={self.hot_buffer_size} must be smaller than block_size={self.block_size}"
            )
        if self.compress_lag >= self.block_size:
            raise ValueError(f"compress_lag={self.compress_lag} must be smaller than block_size={self.block_size}")
        if isinstance(self.value_bits, str) and self.value_bits != "same":
            raise ValueError(f"value_bits must be an int, None or 'same', got {self.value_bits!r}")
        if self.value_stats not in VALUE_STATS:
            raise ValueError(f"value_stats must be one of {list(VALUE_STATS)}, got {self.value_stats!r}")
        if self.basis_dtype not in DTYPES:
            raise ValueError(f"basis_dtype must be one of {sorted(DTYPES)}, got {self.basis_dtype!r}")
        for name in ("use_spectral_attention", "verbose", "compile"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")
        # Registry names are checked here (not at first use) so a typo fails at once. The
        # registries live in `spectral_kv.registry` (the plug-in modules register into them
        # when the package is imported), so this needs no import of the plug-ins themselves.
        COMPRESSORS.check(self.compressor)
        if self.value_compressor is not None:
            COMPRESSORS.check(self.value_compressor)
        for role in ("keys", "values"):
            COMPRESSORS[self.compressor_name(role)].check_config(self, role)
        self._check_fields_read()
        self._check_layer_overrides()
        kc, vc = (COMPRESSORS[self.compressor_name(r)] for r in ("keys", "values"))
        if self.attention is not None:
            ATTENTION_STRATEGIES.check(self.attention)
            strategy = ATTENTION_STRATEGIES[self.attention]
            if not strategy.serves(kc, vc):
                raise ValueError(
                    f"attention={self.attention!r} needs {strategy.needs} compressors, "
                    f"{self.compressor_name('keys')!r}/{self.compressor_name('values')!r} are not"
                )
        elif self.use_spectral_attention and not ATTENTION_STRATEGIES["spectral"].serves(kc, vc):
            raise ValueError(
                f"compressors {self.compressor_name('keys')!r}/{self.compressor_name('values')!r} are not "
                "factored: set use_spectral_attention=False (attention='reconstruct')"
            )

    def _check_fields_read(self) -> None:
        """Nothing silently ignored: a layout-specific field set to a non-default value that
        neither role's compressor reads (`Compressor.reads`) raises, naming field and layout."""
        read = COMPRESSORS[self.compressor_name("keys")].reads(self, "keys") | COMPRESSORS[
            self.compressor_name("values")
        ].reads(self, "values")
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        for name in LAYOUT_FIELDS:
            value = getattr(self, name)
            if name not in read and value != defaults[name]:
                raise ValueError(
                    f"{name}={value!r} has no effect under the layout keys={self.compressor_name('keys')!r}, "
                    f"values={self.compressor_name('values')!r} (it reads {sorted(read & set(LAYOUT_FIELDS))}); "
                    "leave it unset or choose a compressor that uses it"
                )

    def _check_layer_overrides(self) -> None:
        """Canonical form, then every overridden layer's config built once, so a layout that
        cannot exist fails here, naming its layers."""
        names = {f.name for f in dataclasses.fields(self)}
        canon = normalize_layer_overrides(self.layer_overrides, names, OVERRIDABLE_FIELDS)
        object.__setattr__(self, "layer_overrides", canon)
        for layers, fields in canon or ():
            try:
                self.layer_config(layers[0])
            except ValueError as exc:
                raise ValueError(f"layer_overrides for layers {describe_layers(layers)}: {exc}") from None

    def layer_config(self, layer_idx: int) -> "SpectralConfig":
        """The config layer ``layer_idx`` runs with: this one with its `layer_overrides` entry
        applied (``layer_overrides=None`` in the result); this config itself (less the overrides)
        for a layer not listed."""
        if isinstance(layer_idx, bool) or not isinstance(layer_idx, int) or layer_idx < 0:
            raise ValueError(f"layer_idx must be a non-negative int, got {layer_idx!r}")
        if self.layer_overrides is None:
            return self
        changes = next((dict(f) for layers, f in self.layer_overrides if layer_idx in layers), {})
        return dataclasses.replace(self, layer_overrides=None, **changes)

    def overridden_layers(self) -> tuple[int, ...]:
        """Every layer index `layer_overrides` names, sorted."""
        return tuple(sorted(i for layers, _ in self.layer_overrides or () for i in layers))

    @property
    def attention_name(self) -> str:
        """The attention strategy named by the config. With ``attention=None`` a layer on CUDA
        runs the layout's fused kernel instead of ``spectral`` when there is one
        (`spectral_kv.attention.fused.default_decode_attention`)."""
        if self.attention is not None:
            return self.attention
        return "spectral" if self.use_spectral_attention else "reconstruct"

    def segments(self, role: str) -> tuple | None:
        """``key_segments`` / ``value_segments`` for ``role``."""
        self.rank(role)
        return self.key_segments if role == "keys" else self.value_segments

    def rank(self, role: str) -> int | None:
        """Rank for ``role`` in ``{"keys", "values"}`` (``None``: not set)."""
        if role == "keys":
            return self.k_rank_keys
        if role == "values":
            return self.k_rank_values
        raise ValueError(f"role must be 'keys' or 'values', got {role!r}")

    def compressor_name(self, role: str) -> str:
        """Registry name of the compressor for ``role`` in ``{"keys", "values"}``."""
        self.rank(role)  # validates role
        return self.value_compressor or self.compressor if role == "values" else self.compressor

    def bits(self, role: str) -> int | None:
        """Coefficient bits for ``role`` (``None``: unquantized)."""
        self.rank(role)
        return self.coeff_bits if role == "keys" or self.value_bits == "same" else self.value_bits

    def summary(self) -> str:
        """One line: what each role is compressed with."""

        def roles(c: "SpectralConfig") -> str:
            return ", ".join(f"{r} {COMPRESSORS[c.compressor_name(r)].describe(c, r)}" for r in ("keys", "values"))

        line = (f"{roles(self)}; block {self.block_size}, {self.sink_tokens} sinks, hot {self.hot_buffer_size}, "
                f"attention={self.attention_name}")
        for layers, _ in self.layer_overrides or ():
            line += f"; layers {describe_layers(layers)}: {roles(self.layer_config(layers[0]))}"
        return line

    def check_head_dim(self, head_dim: int) -> None:
        """Raise if a role's compressor cannot store heads of ``head_dim`` channels (an SVD rank
        above it, packed codes that do not fill whole bytes); every layer's layout."""
        for layers, _ in self.layer_overrides or ():
            self.layer_config(layers[0]).check_head_dim(head_dim)
        for role in ("keys", "values"):
            COMPRESSORS[self.compressor_name(role)].check_head_dim(self, role, head_dim)

    @classmethod
    def preset(cls, name: str, **overrides) -> "SpectralConfig":
        """The named preset (``original``, ``fast``, ``balanced``, ``compact``, ``max-compression``,
        ``spectral-5x``, ``spectral-8x``; see `spectral_kv.presets`) with ``overrides`` applied."""
        from .presets import preset_fields

        return cls(**{**preset_fields(name), **overrides})

    @classmethod
    def resolve(cls, preset: "str | SpectralConfig | None" = None, **overrides) -> "SpectralConfig":
        """A config from user arguments: ``preset`` (a preset name, a whole `SpectralConfig`, or
        None for the library default), then ``overrides`` (any fields) on top, validated once.

        The one place that turns user arguments into a config (`SpectralCache(config,
        **overrides)`, `patch_unsloth_attention`, the eval harness and CLI); an unknown field or
        preset raises a ValueError naming it.
        """
        if preset is None:
            base = cls()
        elif isinstance(preset, SpectralConfig):
            base = preset
        elif isinstance(preset, str):
            base = cls.preset(preset)
        else:
            raise ValueError(f"preset must be a preset name, a SpectralConfig or None, got {preset!r}")
        return base.replace(**overrides) if overrides else base

    def replace(self, **changes) -> "SpectralConfig":
        """A copy with ``changes`` applied (validated again)."""
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise ValueError(f"unknown SpectralConfig field(s): {sorted(unknown)}")
        return dataclasses.replace(self, **changes)
