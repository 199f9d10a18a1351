"""``<press>+<spectral>``: eviction first, then spectral compression of what is kept, e.g.
``snapkv:ratio=0.5+spectral:preset=balanced``.

The press runs in its forward hook right after each layer's prefill attention and rewrites
``layer.keys`` / ``layer.values`` (`SpectralLayer`'s assignable properties); the "spectral_kv"
attention sees the hook and leaves that prompt uncompressed for it
(`TierManager.defer_next_compression`). When the prefill context closes, the kept tokens are
compressed (`TierManager.settle`), so bytes measured after the prefill are the composition's.
"""

from __future__ import annotations

import contextlib
from typing import Any

from .base import CacheMethod
from .presses import PressMethod
from .spectral import SpectralMethod

__all__ = ["ComposedMethod", "compose"]


class ComposedMethod(SpectralMethod):
    """A `SpectralCache` whose prefill runs under a kvpress press."""

    press: PressMethod | None = None
    _last_cache: Any = None

    def new_cache(self, model):
        self._last_cache = super().new_cache(model)
        return self._last_cache

    @contextlib.contextmanager
    def prefill_context(self, model):
        cache = self._last_cache
        with self.press.prefill_context(model):
            yield
        if cache is not None:
            for layer in cache.spectral_layers:
                layer.tiers.settle()


def compose(spec: str, parts: list[CacheMethod]) -> ComposedMethod:
    """One press part and one spectral part (either order) -> :class:`ComposedMethod`."""
    presses = [p for p in parts if isinstance(p, PressMethod)]
    spectral = [p for p in parts if type(p) is SpectralMethod]
    if len(parts) != 2 or len(presses) != 1 or len(spectral) != 1:
        raise ValueError(
            f"composed method {spec!r}: want one kvpress press and one spectral/kivi method joined by '+', "
            f"got {[p.spec for p in parts]}"
        )
    press, tiers = presses[0], spectral[0]
    settings = {**{k: v for k, v in tiers.settings.items()}, "press": press.settings["press"],
                "ratio": press.settings["ratio"], "parts": [press.spec, tiers.spec]}
    method = ComposedMethod(spec, f"kvpress+{tiers.family}", settings, evicts=True)
    method.press = press
    return method
