"""``spectral`` (this library) and ``kivi4`` / ``kivi2`` (the KIVI reference quantizer on the
same tiers): methods that patch the model with the "spectral_kv" attention and use its cache."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

import torch

from .base import CacheMethod

__all__ = ["SpectralMethod", "build_spectral", "build_kivi", "spectral_settings"]

# spec option -> SpectralConfig field
SPECTRAL_OPTIONS = {
    "k": "k_rank_keys", "v": "k_rank_values", "sink": "sink_tokens", "bits": "coeff_bits",
    "vbits": "value_bits", "group": "quant_group", "block": "block_size", "hot": "hot_buffer_size",
    "compressor": "compressor", "vstats": "value_stats",
}


def _option_value(field: str, text: str):
    if field in ("compressor", "value_stats"):
        return text
    if text.lower() == "none":
        return None
    if field == "value_bits" and text == "same":
        return text
    return int(text)


def spectral_settings(opts: dict[str, str], base_fields: dict[str, Any], spectral_attention: bool) -> dict[str, Any]:
    """Resolved settings of a spectral-tier method: ``preset=`` (default: the library default
    `SpectralConfig()`), then ``base_fields``, then the spec's options (``SPECTRAL_OPTIONS``),
    which are popped from ``opts``."""
    from spectral_kv import SpectralConfig

    preset = opts.pop("preset", None)
    config = SpectralConfig.preset(preset) if preset else SpectralConfig()
    changes = dict(base_fields)
    for key, field_name in SPECTRAL_OPTIONS.items():
        if key in opts:
            text = opts.pop(key)
            try:
                changes[field_name] = _option_value(field_name, text)
            except ValueError:
                raise ValueError(f"option {key}={text!r}: want an integer or 'none'") from None
    config = config.replace(**changes, use_spectral_attention=spectral_attention, verbose=False)
    fields = {k: v for k, v in asdict(config).items() if isinstance(v, (int, float, str, bool, tuple, type(None)))}
    return {"preset": preset or "default", **fields, "_config": config}


class SpectralMethod(CacheMethod):
    """A `SpectralCache` under the "spectral_kv" attention (``settings["_config"]``)."""

    _handle: Any = None

    def setup(self, model) -> None:
        from spectral_kv import patch_unsloth_attention

        self._handle = patch_unsloth_attention(model, config=self.settings["_config"], verbose=False)

    def teardown(self, model) -> None:
        if self._handle is not None:
            self._handle.unpatch()
            self._handle = None

    def new_cache(self, model):
        if self._handle is None:
            raise RuntimeError(f"method {self.spec!r}: call setup(model) before new_cache")
        return self._handle.new_cache()

    def seed_cache(self, model, kv: list[tuple[torch.Tensor, torch.Tensor]]):
        """The tiers attend the prompt exactly and then append it (``tiers.append``, done here
        directly), so seeding equals prefilling."""
        cache = self.new_cache(model)
        for i, (k, v) in enumerate(kv):
            layer = cache.layers[i]
            if hasattr(layer, "tiers"):
                layer.lazy_initialization(k, v)
                layer.tiers.append(k, v)
            else:
                cache.update(k, v, i)
        return cache

    def dense_kv(self, cache, layer_idx: int):
        if self.evicts:
            return None
        layer = cache.layers[layer_idx]
        if hasattr(layer, "tiers"):
            k, v, _ = layer.tiers.materialize()
            return k, v
        return layer.keys, layer.values


def build_spectral(spec: str, name: str, opts: dict[str, str]) -> SpectralMethod:
    return SpectralMethod(spec, "spectral", spectral_settings(opts, {}, True))


def build_kivi(spec: str, name: str, opts: dict[str, str]) -> SpectralMethod:
    import spectral_kv.compressors.kivi  # noqa: F401  (registers kivi4 / kivi2)

    base = dict(compressor=name, value_compressor=None)  # KIVI reads no rank (setting one is refused)
    return SpectralMethod(spec, "kivi", spectral_settings(opts, base, False))
