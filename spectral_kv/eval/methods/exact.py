"""``exact``: transformers' ``DynamicCache``, the reference every other method is measured against."""

from __future__ import annotations

from .base import CacheMethod

__all__ = ["ExactMethod", "build_exact"]


class ExactMethod(CacheMethod):
    """``DynamicCache``: everything :class:`CacheMethod` does by default."""


def build_exact(spec: str, name: str, opts: dict[str, str]) -> ExactMethod:
    return ExactMethod(spec, "exact", {"cache": "DynamicCache"})
