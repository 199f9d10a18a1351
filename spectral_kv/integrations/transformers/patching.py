"""`patch_model`: route one transformers model's attention and ``generate`` cache through spectral_kv."""

from __future__ import annotations

import functools
from typing import Any

from ...config import SpectralConfig
from .attention import ATTENTION_NAME
from .cache import SpectralCache
from .tensor_parallel import check_split, tp_size

__all__ = ["SpectralPatch", "patch_model"]


class SpectralPatch:
    """What `patch_model` returns: makes plain ``model.generate`` use a fresh `SpectralCache`.

    Attributes
    ----------
    config : SpectralConfig
    last_cache : SpectralCache or None
        The cache of the latest ``generate`` (or `new_cache`).
    """

    def __init__(self, model, config: SpectralConfig) -> None:
        self.model = model
        self.config = config
        self.last_cache: SpectralCache | None = None
        self._previous_attn = model.config._attn_implementation
        self._had_instance_generate = "generate" in model.__dict__
        self._previous_generate = model.generate
        self.active = False

    def new_cache(self) -> SpectralCache:
        """A fresh `SpectralCache` for this model (also remembered as `last_cache`)."""
        self.last_cache = SpectralCache(self.config.replace(verbose=False), self.model.config)
        return self.last_cache

    def memory_report(self) -> dict[str, Any]:
        """`SpectralCache.memory_report` of the latest generate's cache."""
        if self.last_cache is None:
            raise RuntimeError("memory_report: no generate has run with this patch yet")
        return self.last_cache.memory_report()

    def unpatch(self) -> None:
        """Restore the model's attention implementation and ``generate``."""
        if not self.active:
            return
        _set_attn(self.model, self._previous_attn)
        if self._had_instance_generate:
            self.model.generate = self._previous_generate
        else:
            del self.model.generate
        self.active = False


def _set_attn(model, name: str) -> None:
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(name)
    if model.config._attn_implementation != name:  # models that refuse dynamic switching
        model.config._attn_implementation = name


def patch_model(model, config: SpectralConfig, *, verbose: bool | None = None) -> SpectralPatch:
    """Route a transformers model's attention and ``generate`` cache through spectral_kv.

    Only this model instance changes: its config's attention implementation and an
    instance-level ``generate`` that supplies a fresh `SpectralCache` whenever the caller
    passes no ``past_key_values`` (and ``use_cache`` is not False).
    """
    verbose = config.verbose if verbose is None else verbose
    check_split(model.config, tp_size(model), "patch_unsloth_attention")
    SpectralCache(config.replace(verbose=False), model.config)  # validate against the model now
    handle = SpectralPatch(model, config)
    _set_attn(model, ATTENTION_NAME)
    original = handle._previous_generate

    @functools.wraps(original)
    def generate(*args, **kwargs):
        if kwargs.get("past_key_values") is None and kwargs.get("use_cache", True) is not False:
            kwargs["past_key_values"] = handle.new_cache()
        return original(*args, **kwargs)

    model.generate = generate
    handle.active = True
    if verbose:
        probe = SpectralCache(config.replace(verbose=False), model.config)
        n = len(probe.spectral_layers)
        print(
            f"spectral_kv: patched {type(model).__name__}: {n}/{len(probe.layers)} layers compressed "
            f"({config.summary()})"
        )
    return handle
