"""A tiny name -> class registry filled by a decorator; one per plug point.

The registry objects live here (this module imports nothing of the package), and the plug-in
modules register into them: `spectral_kv.config` can look names up without importing the
compressors or the attention strategies (no import circle). The built-in plug-ins are
registered when the package is imported (``spectral_kv/__init__`` imports them first).
"""

from __future__ import annotations

from typing import Callable, Generic, TypeVar

__all__ = ["Registry", "COMPRESSORS", "ATTENTION_STRATEGIES"]

T = TypeVar("T")


class Registry(Generic[T]):
    """A plain dict of named classes with a registering decorator.

    Examples
    --------
    >>> COMPRESSORS = Registry("compressor")
    >>> @COMPRESSORS.register("mine")
    ... class Mine: ...
    >>> COMPRESSORS["mine"] is Mine
    True
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, type[T]] = {}

    def register(self, name: str) -> Callable[[type[T]], type[T]]:
        if not isinstance(name, str) or not name:
            raise ValueError(f"{self.kind} name must be a non-empty str, got {name!r}")

        def decorator(cls: type[T]) -> type[T]:
            if name in self._entries and self._entries[name] is not cls:
                raise ValueError(f"{self.kind} {name!r} is already registered to {self._entries[name].__name__}")
            self._entries[name] = cls
            cls.name = name
            return cls

        return decorator

    def check(self, name: str) -> None:
        if name not in self._entries:
            raise ValueError(f"unknown {self.kind} {name!r}; registered: {sorted(self._entries)}")

    def __getitem__(self, name: str) -> type[T]:
        self.check(name)
        return self._entries[name]

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def names(self) -> list[str]:
        return sorted(self._entries)


# Filled by `spectral_kv.compressors` / `spectral_kv.attention` (`register_compressor`,
# `register_attention`) and by user plug-ins.
COMPRESSORS: Registry = Registry("compressor")
ATTENTION_STRATEGIES: Registry = Registry("attention strategy")
